"""`mpbench gemms`: the model's GEMMs one by one in each mode's arithmetic, measured against the roofline.

One table per mode: each Linear kind's three GEMMs (forward, grad_input, grad_weight) with their shape
(m x k x n), how many the step runs, the arithmetic, the measured time (median and p10-p90 over --repeats
timed batches), TFLOP/s, measured / predicted (the roofline's least time with this device's ceilings), and
the time to cast its 8-bit operands from bf16. Under it the mode's totals and, per arithmetic, its biggest
GEMM against the calibrated matmul ceiling. Timings go through suite.metrics.calibration's one timer.
Exit codes: 0 the table was printed (arithmetics that cannot run here are skipped with their reasons),
2 bad input (nothing timed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models import GPTConfig
from suite.cli.gpu_checks import WARN
from suite.cli.quiet_checks import Host, cpu_load
from suite.hardware import DeviceInfo, resolve_device
from suite.metrics import gemms
from suite.modes import get_mode
from suite.records import outputs, store
from suite.text import fmt, log_to_stderr, shown, table

DEFAULTS = {"cpu": dict(model="tiny", batch_size=4, seq_len=64), "cuda": dict(model="gpt2-small", batch_size=8,
            seq_len=1024)}  # fmt: skip
DEFAULT_MODES = {"cpu": "fp32,bf16,int8-mixed,fp8-tensorwise,fp8-rowwise,mxfp8",
                 "cuda": "fp32,tf32,bf16,int8-mixed,fp8-tensorwise,fp8-rowwise,mxfp8"}  # fmt: skip
HEADER = ["layer", "gemm", "m x k x n", "count", "arith", "ms", "p10-p90 ms", "TFLOP/s", "meas/pred", "cast ms"]


def add_arguments(p: argparse.ArgumentParser, int_type: Any) -> None:
    """The flags of `mpbench gemms`."""
    p.add_argument("--model", help="preset (default: tiny on CPU, gpt2-small on a GPU)")
    p.add_argument("--modes", help="comma-separated modes (default: fp32, bf16, the 8-bit modes; tf32 on a GPU)")
    p.add_argument("--batch-size", type=int_type, help="sequences per step (default: 4 CPU, 8 GPU)")
    p.add_argument("--seq-len", type=int_type, help="tokens per sequence (default: 64 CPU, 1024 GPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--repeats", type=int_type, default=5, help="timed batches per GEMM, median and p10-p90 "
                   "(default: 5)")  # fmt: skip
    p.add_argument("--out", help="JSON file with every row (default: none)")


def _options(args: argparse.Namespace, device: DeviceInfo) -> tuple[GPTConfig, list[str], int, int]:
    """(model config, modes, batch size, seq len) from the flags; ValueError naming a bad one."""
    defaults = DEFAULTS[device.type]
    config = GPTConfig.preset(args.model or defaults["model"])  # ValueError naming an unknown model
    names = [m.strip() for m in (args.modes or DEFAULT_MODES[device.type]).split(",") if m.strip()]
    if not names:
        raise ValueError(f"modes={args.modes!r}: empty; give a comma-separated list such as fp32,bf16")
    for name in names:
        get_mode(name)  # ValueError naming the unknown mode
    batch = defaults["batch_size"] if args.batch_size is None else args.batch_size
    seq_len = defaults["seq_len"] if args.seq_len is None else args.seq_len
    if batch < 1:
        raise ValueError(f"batch_size={batch}: must be at least 1 sequence; give --batch-size 1 or more")
    if not 1 <= seq_len <= config.block_size:
        raise ValueError(f"seq_len={seq_len}: must be 1 to the model's block size {config.block_size}; "
                         f"give --seq-len in that range")  # fmt: skip
    if args.repeats < 1:
        raise ValueError(f"repeats={args.repeats}: must be at least 1; give --repeats 5 for a p10-p90 spread")
    return config, list(dict.fromkeys(names)), batch, seq_len


def load_warning(device: DeviceInfo, host: Host | None = None) -> str | None:
    """`mpbench doctor`'s load check on a CPU, when it warns: torch's threads then wait for cores a time slice
    at a time, and a GEMM of 0.05 ms reads 10 ms. None on a GPU or a quiet CPU."""
    if device.type != "cpu":
        return None
    check = cpu_load(host or Host())
    return check.detail if check.status == WARN else None


def cmd_gemms(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    config, names, batch, seq_len = _options(args, device)
    out = Path(args.out) if args.out else None
    if out is not None:
        outputs.check_replaced(out, "gemms", ("model", "rows"))
        store.check_writable(out)
    model = args.model or DEFAULTS[device.type]["model"]
    log_to_stderr(f"mpbench gemms: {model}, batch {batch} x {seq_len}, on {device.describe()}")
    busy = load_warning(device)
    if busy:
        log_to_stderr(f"mpbench gemms: warning: {busy}")
    ceil = gemms.Ceilings(device)
    timer = gemms.Timer(device, args.repeats, log=log_to_stderr)
    rows, failed = [], {}
    for name in names:
        try:
            step = gemms.mode_gemms(name, device, config, batch, seq_len)
        except Exception as exc:  # a mode that cannot be prepared here (torchao missing) must not end the others
            failed[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        rows += gemms.rows_of(name, step, timer, ceil)
    top = gemms.biggest(rows, device)
    print(f"GEMMs of one {model} training step, batch {batch} x {seq_len} ({batch * seq_len} tokens), on "
          f"{device.describe()}; predicted with {ceil.source}")  # fmt: skip
    for name in names:
        if name in failed:
            print(f"\n{name}: not shown: {failed[name]}")
        else:
            _print_mode(name, [r for r in rows if r["mode"] == name], [t for t in top if t["mode"] == name])
    print(f"\nleft out: {gemms.LEFT_OUT}; {len(timer.gemms)} distinct GEMM(s) timed, each once")
    if out is not None:
        _save(out, dict(model=model, device=device.describe(), batch_size=batch, seq_len=seq_len,
                        repeats=args.repeats, ceilings=ceil.source, bandwidth=ceil.bandwidth,
                        bandwidth_reason=ceil.bandwidth_reason, left_out=gemms.LEFT_OUT, rows=rows,
                        biggest=top, not_shown=failed, cpu_load=busy))  # fmt: skip
        print(f"rows: {shown(out)}")
    return 0


def _print_mode(name: str, rows: list[dict[str, Any]], top: list[dict[str, Any]]) -> None:
    """The mode's table, its skipped arithmetics and missing predictions (each reason once), its totals
    (count x time) and its biggest GEMM per arithmetic against the calibrated ceiling."""
    lines, notes = [], {}
    for r in rows:
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}" if r["measured_ms"] is not None else "-"
        ratio = fmt(r["measured_over_predicted"], ".2f")
        lines.append([r["layer"], r["gemm"], f"{r['m']}x{r['k']}x{r['n']}", r["count"], r["arithmetic"],
                      fmt(r["measured_ms"], ".3f"), spread, fmt(r["tflops"], ".3f"), ratio,
                      fmt(r["cast_ms"], ".3f")])  # fmt: skip
        if r["skipped_reason"]:
            notes[f"{r['arithmetic']} not timed: {r['skipped_reason']}"] = None
        elif r["predicted_ms"] is None:
            notes[f"no prediction for {r['arithmetic']}: {r['predicted_reason']}"] = None
    print(f"\n{name}")
    print(table(lines, HEADER))
    timed = [r for r in rows if r["measured_ms"] is not None]
    if timed:
        gemm_ms = sum(r["count"] * r["measured_ms"] for r in timed)
        cast_ms = sum(r["count"] * (r["cast_ms"] or 0.0) for r in timed)
        pred = [r["count"] * r["predicted_ms"] for r in timed if r["predicted_ms"] is not None]
        whole = len(pred) == len(timed)
        print(
            f"total: GEMMs {gemm_ms:.3f} ms + casts {cast_ms:.3f} ms per step; predicted GEMMs "
            + (f"{sum(pred):.3f} ms (measured / predicted {gemm_ms / sum(pred):.2f})" if whole and pred else "-")
            + (f"; {len(rows) - len(timed)} row(s) not timed, not in the totals" if len(timed) < len(rows) else "")
        )
    for t in top:
        shape = "x".join(map(str, t["shape"]))
        head = f"biggest {t['arithmetic']} GEMM ({t['layer']} {t['gemm']} {shape}): {t['tflops']:.3f} TFLOP/s"
        if t["of_ceiling"] is None:
            print(f"{head}; no calibrated ceiling: {t['reason']}")
        else:
            print(f"{head} = {t['of_ceiling']:.2f} x the calibrated {t['arithmetic']} ceiling "
                  f"({t['ceiling_tflops']:.3f} TFLOP/s, square matmuls)")  # fmt: skip
    for note in notes:
        print(note)


def _save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
