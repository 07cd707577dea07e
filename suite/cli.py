"""The `mpbench` command: run | check | baseline | models | modes | calibrate | env.

Exit codes of `run`: 0 all cases ok or skipped; 1 some case failed (oom, diverged, error,
timeout); 2 bad input (nothing was run); 130 interrupted (finished records are kept).
`check`: 0 every mode within tolerance, 1 a mode failed or nothing could be checked, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from models import GPT, GPTConfig
from suite import baseline, calibration, convergence, peaks, results
from suite.case import Case
from suite.hardware import environment, resolve_device
from suite.metrics.window import nvml_device
from suite.modes import MODES
from suite.plots import plot_loss_curves
from suite.runner import run_cases, validate

# What `mpbench run` does with no arguments, by device: tiny finishes in about a minute on
# two CPU cores; on a GPU, GPT-2 small at its full context.
RUN_DEFAULTS = {
    "cpu": dict(model="tiny", batch_size=8, seq_len=128, steps=40, warmup=5),
    "cuda": dict(model="gpt2-small", batch_size=16, seq_len=1024, steps=100, warmup=10),
}
FAILED = ("oom", "diverged", "error", "timeout")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes: {m!r} is unknown; choose from {', '.join(MODES)} (comma-separated)")
    if not modes:
        raise ValueError("modes: empty; give a comma-separated list such as fp32,bf16")
    return modes


def cases_from_args(args: argparse.Namespace) -> list[Case]:
    """Fill unset options with the defaults of the resolved device; build one Case per mode."""
    device = resolve_device(args.device)
    defaults = RUN_DEFAULTS[device.type]
    model = args.model or defaults["model"]
    block = GPTConfig.preset(model).block_size if model in GPTConfig.presets() else None
    seq_len = args.seq_len or min(defaults["seq_len"], block or defaults["seq_len"])
    modes = _parse_modes(args.modes) if args.modes else list(MODES)
    steps = args.steps if args.steps is not None else defaults["steps"]
    # default warm-up never takes more than half the steps, so a short run still times some
    warmup = args.warmup if args.warmup is not None else min(defaults["warmup"], steps // 2)
    return [
        Case(
            model=model,
            mode=mode,
            device=args.device,
            batch_size=args.batch_size if args.batch_size is not None else defaults["batch_size"],
            seq_len=seq_len,
            steps=steps,
            warmup=warmup,
            seed=args.seed,
            eval_every=args.eval_every,
            compile=args.compile,
            data=args.data,
            lr=args.lr,
            weight_decay=args.weight_decay,
        )
        for mode in modes
    ]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(records: list[dict]) -> str:
    """Per-mode table: step time with spread, speed-up, MFU, memory, loss and its delta vs fp32."""
    # fp32 of the same group, for the speed-up (the delta is in the record)
    ref = {
        (r["model"], r["batch_size"], r["seq_len"]): r for r in records if r["mode"] == "fp32" and r["status"] == "ok"
    }
    rows = []
    for r in records:
        base = ref.get((r["model"], r["batch_size"], r["seq_len"]))
        ok = r["status"] == "ok"
        speedup = base["step_time_ms"] / r["step_time_ms"] if ok and base else None
        spread = f"{r['step_time_p10_ms']:.2f}-{r['step_time_p90_ms']:.2f}" if ok else "-"
        rows.append([
            r["mode"], r["model"], r["status"], _fmt(r["step_time_ms"], ".2f"), spread,
            _fmt(r["tokens_per_s"], ",.0f"), _fmt(speedup, ".2f"), _fmt(r["mfu"], ".1%"),
            _fmt(r["peak_mem_mb"], ",.0f"), _fmt(r["final_loss"], ".4f"), _fmt(r["loss_delta_vs_fp32"], "+.4f"),
            (r["reason"] or "")[:70],
        ])  # fmt: skip
    header = ["mode", "model", "status", "step ms", "p10-p90 ms", "tokens/s", "x fp32", "MFU", "peak MiB",
              "final loss", "vs fp32", "reason"]  # fmt: skip
    return _table(rows, header)


def cmd_run(args: argparse.Namespace) -> int:
    cases = cases_from_args(args)
    out = Path(args.out) if args.out else Path("results") / "runs" / f"{results.new_run_id()}.jsonl"
    validate(cases)  # bad input ends here, before anything is written
    results.check_writable(out)
    print(f"mpbench: {len(cases)} case(s), records go to {out}", file=sys.stderr)
    try:
        done = run_cases(cases, out=out)
    except KeyboardInterrupt:
        kept = len(results.read(out)) if out.exists() else 0
        print(f"mpbench: interrupted; {kept} finished record(s) kept in {out}", file=sys.stderr)
        return 130
    print(summary_table(done))
    print(f"\nrecords: {out} ({len(done)} written)")
    if args.plot:
        print(f"loss curves: {plot_loss_curves(done, out.with_suffix('.png'))}")
    loss_floor = next((r["loss_floor"] for r in done if r["loss_floor"] is not None), None)
    if loss_floor is not None:
        print(f"loss floor of the synthetic corpus (optimal loss): {loss_floor:.4f} nats/token")
    return 1 if any(r["status"] in FAILED for r in done) else 0


def cmd_check(args: argparse.Namespace) -> int:
    """Convergence gate: exit 1 when a mode's loss ends above fp32's by more than its tolerance."""
    tolerances = convergence.parse_tolerances(args.tolerance)
    records = []
    for path in args.records:
        if not Path(path).is_file():
            raise ValueError(f"records={path!r}: no such file")
        records += results.read(path)
    verdicts = convergence.check(records, tolerances)
    rows = [
        [v.mode, v.model, v.outcome, _fmt(v.delta, "+.4f"), _fmt(v.tolerance and v.tolerance.max_delta, ".4f"),
         v.detail[:80]]
        for v in verdicts
    ]  # fmt: skip
    print(_table(rows, ["mode", "model", "verdict", "delta vs fp32", "tolerance", "detail"]))
    failed = [v for v in verdicts if v.outcome == "FAIL"]
    checked = [v for v in verdicts if v.outcome in ("pass", "FAIL", "lags (expected)")]
    if not checked:
        print("\nnothing was checked: no record has loss_delta_vs_fp32 (run fp32 in the same run)")
        return 1
    print(f"\n{len(failed)} failed, {len(checked) - len(failed)} passed or lag as expected")
    return 1 if failed else 0


def cmd_baseline(args: argparse.Namespace) -> int:
    """Store the ok records of one machine as its committed baseline."""
    records = []
    for path in args.records:
        if not Path(path).is_file():
            raise ValueError(f"records={path!r}: no such file")
        records += results.read(path)
    made = baseline.make_baseline(records)
    path = Path(args.out) if args.out else baseline.BASELINE_DIR / f"{made['machine']}.json"
    results.check_writable(path)
    baseline.save(made, path)
    print(f"baseline for {made['machine']}: {len(made['entries'])} entries ({', '.join(made['entries'])}) in {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for name in GPTConfig.presets():
        cfg = GPTConfig.preset(name)
        with torch.device("meta"):
            model = GPT(cfg)
        rows.append(
            [
                name,
                cfg.n_layer,
                cfg.n_head,
                cfg.n_embd,
                cfg.vocab_size,
                cfg.block_size,
                f"{model.num_params():,}",
                f"{model.flops_per_token(cfg.block_size):,}",
            ]
        )
    print(_table(rows, ["model", "layers", "heads", "width", "vocab", "block", "params", "train FLOPs/token @block"]))
    return 0


def cmd_modes(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    rows = []
    for name, mode in MODES.items():
        reason = mode.unavailable_reason(device)
        rows.append([name, mode.summary, mode.needs, "yes" if reason is None else f"no: {reason}"])
    print(f"device: {device.describe()}")
    print(_table(rows, ["mode", "what", "needs", "runs here"]))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    report: dict = {"device": str(device.torch_device), **environment(device)}
    if device.type == "cuda":
        row = peaks.peak_row(device.name)
        report["peak_flops_row"] = row or f"unknown GPU {device.name!r}: mfu will be null"
        _, _, report["nvml"] = nvml_device(device.index)
        report["nvml"] = report["nvml"] or "ok"
    else:
        report["peak_flops_row"] = "none for CPUs: mfu is null; mamf uses `mpbench calibrate`"
    path = calibration.calibration_path(device)
    report["calibration"] = str(path) if path.is_file() else f"none (run `mpbench calibrate`; would be {path})"
    print(json.dumps(report, indent=2))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else None
    for d in dtypes or []:
        if d not in calibration.DTYPES:
            raise ValueError(f"dtypes: {d!r} is unknown; choose from {', '.join(calibration.DTYPES)}")
    path = Path(args.out) if args.out else calibration.calibration_path(device)
    results.check_writable(path.with_suffix(".tmp"))
    print(f"mpbench: calibrating matmul FLOP/s on {device.describe()}", file=sys.stderr)
    result = calibration.measure(device, dtypes, log=lambda line: print(line, file=sys.stderr))
    calibration.save(result, path)
    rows = []
    for dtype, entry in result["results"].items():
        peak, _ = peaks.peak_flops(device.name, dtype) if device.type == "cuda" else (None, None)
        share = f"{entry['flops'] / peak:.0%}" if peak else "-"
        rows.append([dtype, f"{entry['flops'] / 1e12:.2f}", entry["n"], f"{peak / 1e12:.1f}" if peak else "-", share])
    print(_table(rows, ["dtype", "best TFLOP/s", "n", "datasheet TFLOP/s", "of datasheet"]))
    print(f"\ncalibration: {path}")
    return 0


def _int(text: str) -> int:
    """argparse type; range checks happen in Case, which names the field."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpbench", description="Mixed-precision training benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train the precision matrix and write records")
    run.add_argument(
        "--model", help=f"preset: {', '.join(GPTConfig.presets())} (default: tiny on CPU, gpt2-small on GPU)"
    )
    run.add_argument("--modes", help=f"comma-separated, from {', '.join(MODES)} (default: all)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    run.add_argument("--batch-size", type=_int, help="sequences per step (default: 8 CPU, 16 GPU)")
    run.add_argument("--seq-len", type=_int, help="tokens per sequence (default: 128 CPU, 1024 GPU)")
    run.add_argument("--steps", type=_int, help="optimizer steps, warm-up included (default: 40 CPU, 100 GPU)")
    run.add_argument("--warmup", type=_int, help="steps left out of timing (default: 5 CPU, 10 GPU)")
    run.add_argument("--seed", type=_int, default=0, help="weights and batch order (default: 0)")
    run.add_argument("--lr", type=float, help="AdamW learning rate (default: by model size)")
    run.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (default: 0.1)")
    run.add_argument("--eval-every", type=_int, default=0, help="held-out loss every N steps (default: at the end)")
    run.add_argument("--plot", action="store_true", help="also write the loss curves as a PNG beside the records")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is in warm-up)")
    run.add_argument("--data", help="text file (byte tokens) or .bin of uint16 tokens (default: synthetic corpus)")
    run.add_argument("--out", help="JSON Lines file to append records to (default: results/runs/RUN_ID.jsonl)")
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check", help="convergence gate: exit 1 if a mode's loss drifted from fp32")
    chk.add_argument("records", nargs="+", help="JSON Lines record files")
    chk.add_argument("--tolerance", help="override bounds, e.g. bf16=0.05,amp-fp16=0.01 (nats/token)")
    chk.set_defaults(func=cmd_check)
    base = sub.add_parser("baseline", help="store ok records as this machine's baseline for the benchmarks")
    base.add_argument("records", nargs="+", help="JSON Lines record files from one machine")
    base.add_argument("--out", help="baseline file (default: results/baselines/MACHINE.json)")
    base.set_defaults(func=cmd_baseline)
    models = sub.add_parser("models", help="list model presets with exact parameter counts")
    models.set_defaults(func=cmd_models)
    modes = sub.add_parser("modes", help="list precision modes and whether each can run here")
    modes.add_argument("--device", default="auto")
    modes.set_defaults(func=cmd_modes)
    cal = sub.add_parser("calibrate", help="measure this machine's best matmul FLOP/s per dtype (for mamf)")
    cal.add_argument("--device", default="auto")
    cal.add_argument("--dtypes", help="comma-separated from fp32, tf32, fp16, bf16 (default: what the device has)")
    cal.add_argument("--out", help="JSON file (default: results/calibration/DEVICE-HOST.json)")
    cal.set_defaults(func=cmd_calibrate)
    env = sub.add_parser("env", help="print the environment, the peak FLOP/s row and NVML status")
    env.add_argument("--device", default="auto")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: one line, exit 2, nothing run
        print(f"mpbench {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
