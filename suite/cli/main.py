"""The `mpbench` command: run | fidelity | numerics | gemms | sensitivity | check | report | compare | baseline |
models | modes | calibrate | env | doctor.

Exit codes of `run`: 0 all cases ok or skipped; 1 some case failed (oom, diverged, error,
timeout); 2 bad input (nothing was run); 130 / 143 / 129 interrupted by SIGINT / SIGTERM / SIGHUP,
74 a record could not be written (disk full, read-only file): finished records are kept; --resume finishes the run.
`check`: 0 every mode within tolerance (over seeds: its 95% interval), 1 a mode failed or nothing could be checked,
2 bad input, 3 nothing failed but some verdict is inconclusive (the interval straddles the tolerance: more seeds).
`compare`: 0 nothing regressed beyond its noise, 1 something did or nothing could be compared, 2 bad input,
3 nothing regressed but some verdict is inconclusive (its runs' noise is past records.noise.NOISY_SPREAD).
`numerics`: 0 statistics computed (formats that cannot run here are named in the record's numerics_skipped),
1 nothing could be computed (training failed or no format ran), 2 bad input, 74 the record could not be written.
`gemms`: 0 the table was printed (arithmetics that cannot run here skipped with reasons), 2 bad input.
`sensitivity`: 0 the ranking was printed, 1 some case failed (its record kept), 2 bad input, 130 / 143 / 129
interrupted, 74 a record could not be written (suite/cli/sensitivity.py).
`doctor`: 0 no check failed (pass, warn or cannot check), 1 a check failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch
from rich.console import Console

from models import GPT, GPTConfig
from suite.cli import doctor
from suite.cli.check import add_arguments as add_check_arguments
from suite.cli.check import cmd_check
from suite.cli.fidelity import add_arguments as add_fidelity_arguments
from suite.cli.fidelity import cmd_fidelity
from suite.cli.gemms import add_arguments as add_gemms_arguments
from suite.cli.gemms import cmd_gemms, load_warning
from suite.cli.numerics import add_arguments as add_numerics_arguments
from suite.cli.numerics import cmd_numerics
from suite.cli.run import add_arguments as add_run_arguments
from suite.cli.run import cmd_run, default_modes
from suite.cli.sensitivity import add_arguments as add_sensitivity_arguments
from suite.cli.sensitivity import cmd_sensitivity
from suite.hardware import environment, resolve_device
from suite.metrics import calibration, peaks
from suite.metrics.window import nvml_device
from suite.modes import MODES
from suite.modes.base import decide
from suite.quiet import quiet_dependencies
from suite.records import outputs, store
from suite.reporting import baseline, procurement
from suite.reporting.compare import compare_runs, format_comparison, nothing_compared
from suite.reporting.compare import exit_code as compare_exit_code
from suite.reporting.report import REPORT_FILES, build_report
from suite.text import fit_table, show, shown, table


def cmd_report(args: argparse.Namespace) -> int:
    """HTML page, PNGs, Markdown and CSV from records; procurement figures with --price."""
    prices = procurement.parse_prices(args.price) if args.price else None
    if args.target_loss is not None and not args.target_loss > 0:
        raise ValueError(f"target_loss={args.target_loss}: must be a positive loss in nats/token")
    df = store.load(args.records)
    out = outputs.check_folder(args.out, set(df["source"]), writes=lambda n: n in REPORT_FILES or n.endswith(".png"))
    written = build_report(df, out, prices=prices, target_loss=args.target_loss)
    print(f"report of {len(df)} record(s): {shown(written.get('index.html', out / 'index.html'))}")
    for name, path in sorted(written.items()):
        if name != "index.html":
            print(f"  {shown(path)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Ratios per mode and metric of B against A; exit 1 when B regressed beyond the noise, 3 when nothing
    regressed but some verdict is inconclusive (too noisy to judge): a gate must not pass on no verdict."""
    from suite.reporting.compare import SEEDS_METRIC  # here: cmd_compare is this part's only change to this file

    a, b = store.read_all(args.a), store.read_all(args.b)
    rows = compare_runs(a, b)
    print(format_comparison(rows))
    why = nothing_compared(rows, a, b)
    if why:  # a gate that compared nothing must not pass
        print(f"\nnothing was compared: {why}")
        return 1
    regressed = [r.message for r in rows if r.verdict == "regressed"]
    doubtful = sum(r.verdict == "inconclusive" for r in rows)
    seeded = sum(r.metric == SEEDS_METRIC for r in rows)  # modes both runs have on 2+ seeds
    why = "too noisy to judge" + (", or a verdict over seeds got worse within their spread" if seeded else "")
    over_seeds = f"; {seeded} mode(s) compared over seeds (mean delta vs fp32, 95% interval)" if seeded else ""
    changed = sum(r.verdict == "changed" for r in rows)  # a tensor's SQNR fell: shown, never a failed gate
    over_seeds += f"; {changed} line(s) of SQNR drops shown (numerics changed: not a failure)" if changed else ""
    print(f"\n{len(regressed)} regression(s), {doubtful} inconclusive ({why}){over_seeds}"
          + (":\n" + "\n".join(regressed) if regressed else ""))  # fmt: skip
    return compare_exit_code(rows)


def cmd_baseline(args: argparse.Namespace) -> int:
    """Store the ok records of one machine as its committed baseline."""
    records = store.read_all(args.records)
    if not records:
        raise ValueError(f"records: {', '.join(args.records)} hold(s) no records; give the records file of a run")
    made = baseline.make_baseline(records)
    path = Path(args.out) if args.out else baseline.BASELINE_DIR / f"{made['machine']}.json"
    outputs.check_replaced(path, "baseline", ("machine", "entries"), inputs={r["source"] for r in records})
    store.check_writable(path)
    baseline.save(made, path)
    entries = ", ".join(made["entries"])
    print(f"baseline for {made['machine']}: {len(made['entries'])} entries ({entries}) in {shown(path)}")
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
    print(table(rows, ["model", "layers", "heads", "width", "vocab", "block", "params", "train FLOPs/token @block"]))
    return 0


def cmd_modes(args: argparse.Namespace) -> int:
    """Which modes run here, one short row each; why not (or why emulated) under the table; what each
    mode is and needs with --verbose. Narrow on purpose: a row never wraps on an 80-column terminal."""
    device = resolve_device(args.device)
    default = set(default_modes(device.type))
    rows, why = [], []
    for name, mode in MODES.items():
        skip, emulated = decide(mode, device, bool(args.emulate))
        here = "no" if skip else "emulated" if emulated else "yes"
        peak = mode(device).compute if skip is None else "-"
        rows.append([name, here, "yes" if name in default else "-", peak])
        if skip or emulated:
            why.append(f"{name}: {skip or emulated}")
    out = Console(highlight=False)
    width = out.width if out.is_terminal else None
    fit = fit_table(rows, ["mode", "runs here", "default run", "peak dtype"], width, ascii=width is None)
    where = "on this CPU those that fit its minute" if device.type == "cpu" else "every mode"
    notes = [
        "",
        f"default run: what `mpbench run` runs here without --modes ({where})",
        *(["", "not here or emulated:", *why] if why else []),
        "",
        "weights, grads and AdamW state stay fp32 in the fp8, mxfp8, int8-mixed and 4-bit modes: their casts happen "
        "inside each matmul. An emulated mode's numerics are real; its step time is not a speed.",
    ]
    if args.verbose:
        notes += ["", *(f"{name}: {mode.summary}; needs {mode.needs}" for name, mode in MODES.items())]
    else:
        notes.append("what each mode is and needs: mpbench modes --verbose")
    print(f"device: {device.describe()}", file=out.file)
    show(out, fit.table, notes)
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
        calibration.check_dtype(d)
    path = Path(args.out) if args.out else calibration.calibration_path(device)
    outputs.check_replaced(path, "calibration", ("device", "results"))
    store.check_writable(path.with_suffix(".tmp"))
    print(f"mpbench: calibrating matmul FLOP/s and memory bandwidth on {device.describe()}", file=sys.stderr)
    if busy := load_warning(device):  # a ceiling measured on a busy CPU is too low, and every mamf too high
        print(f"mpbench calibrate: warning: {busy}", file=sys.stderr)
    result = calibration.measure(device, dtypes, log=lambda line: print(line, file=sys.stderr))
    calibration.save(result, path)
    rows = []
    for dtype, entry in result["results"].items():
        if entry["flops"] is None:
            rows.append([dtype, "-", "-", "-", "-"])
            continue
        peak, _ = peaks.peak_flops(device.name, dtype) if device.type == "cuda" else (None, None)
        share = f"{entry['flops'] / peak:.0%}" if peak else "-"
        rows.append([dtype, f"{entry['flops'] / 1e12:.2f}", entry["n"], f"{peak / 1e12:.1f}" if peak else "-", share])
    print(table(rows, ["dtype", "best TFLOP/s", "n", "datasheet TFLOP/s", "of datasheet"]))
    for dtype, entry in result["results"].items():
        if entry["flops"] is None:
            print(f"{dtype}: not timed: {entry['reason']}")
    copied = result["bandwidth"]
    if copied["bytes_per_s"]:
        print(f"memory bandwidth: {copied['bytes_per_s'] / 1e9:.1f} GB/s ({copied['method']})")
    else:
        print(f"memory bandwidth: not measured: {copied['reason']}")
    print(f"\ncalibration: {shown(path)}")
    return 0


def _int(text: str) -> int:
    """argparse type; range checks happen in Case, which names the field."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


class _Parser(argparse.ArgumentParser):
    """argparse with mpbench's bad-input line: one line, exit 2, no usage block above it (its subcommands'
    parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpbench", description="Mixed-precision training benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train the precision matrix and write records")
    add_run_arguments(run, _int)
    run.set_defaults(func=cmd_run)

    fid = sub.add_parser("fidelity", help="each mode's gradients and update against a float64 reference step")
    add_fidelity_arguments(fid, _int)
    fid.set_defaults(func=cmd_fidelity)

    num = sub.add_parser("numerics", help="what each number format would lose on fp32's tensors, per layer and role")
    add_numerics_arguments(num, _int)
    num.set_defaults(func=cmd_numerics)

    gem = sub.add_parser("gemms", help="the model's GEMMs one by one in each mode's arithmetic, measured vs predicted")
    add_gemms_arguments(gem, _int)
    gem.set_defaults(func=cmd_gemms)

    sen = sub.add_parser("sensitivity", help="which layers a low-precision mode must keep in bf16: the loss each "
                         "candidate policy recovers, over seeds")  # fmt: skip
    add_sensitivity_arguments(sen, _int)
    sen.set_defaults(func=cmd_sensitivity)

    chk = sub.add_parser(
        "check", help="convergence gate over seeds: exit 1 if a mode's loss drifted from fp32, 3 if inconclusive"
    )
    add_check_arguments(chk)
    chk.set_defaults(func=cmd_check)
    rep = sub.add_parser("report", help="HTML report, PNGs, Markdown and CSV from records")
    rep.add_argument("records", nargs="+", help="JSON Lines record files or globs")
    rep.add_argument("--out", default="results/report", help="output folder (default: results/report)")
    rep.add_argument("--price", help='USD per GPU-hour, e.g. "H100=2.99,A100=1.29": tokens per dollar, cost to target')
    rep.add_argument("--target-loss", type=float, help="loss (nats/token) for time and cost to reach it")
    rep.set_defaults(func=cmd_report)
    cmp_ = sub.add_parser(
        "compare", help="compare two sets of records; exit 1 on a regression beyond the noise, 3 if too noisy to judge"
    )
    cmp_.add_argument("a", help="records of the reference (file or glob)")
    cmp_.add_argument("b", help="records to judge against it (file or glob)")
    cmp_.set_defaults(func=cmd_compare)
    base = sub.add_parser("baseline", help="store ok records as this machine's baseline for the benchmarks")
    base.add_argument("records", nargs="+", help="JSON Lines record files from one machine")
    base.add_argument("--out", help="baseline file (default: results/baselines/MACHINE.json)")
    base.set_defaults(func=cmd_baseline)
    models = sub.add_parser("models", help="list model presets with exact parameter counts")
    models.set_defaults(func=cmd_models)
    modes = sub.add_parser("modes", help="list precision modes and whether each can run here")
    modes.add_argument("--device", default="auto")
    modes.add_argument("--emulate", action="store_true", help="as `mpbench run --emulate`: emulate below capability")
    modes.add_argument("--verbose", "-v", action="store_true", help="also say what each mode is and what it needs")
    modes.set_defaults(func=cmd_modes)
    cal = sub.add_parser(
        "calibrate", help="measure this machine's best matmul FLOP/s per dtype (for mamf) and its memory bandwidth"
    )
    cal.add_argument("--device", default="auto")
    cal.add_argument(
        "--dtypes", help="comma-separated from fp32, tf32, fp16, bf16, fp8, int8 (default: what the device has)"
    )
    cal.add_argument("--out", help="JSON file (default: results/calibration/DEVICE-HOST.json)")
    cal.set_defaults(func=cmd_calibrate)
    env = sub.add_parser("env", help="print the environment, the peak FLOP/s row and NVML status")
    env.add_argument("--device", default="auto")
    env.set_defaults(func=cmd_env)
    doctor.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_dependencies()  # this process may import torchao too (a mode's availability, a torchrun rank)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: one line, exit 2, nothing run
        print(f"mpbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
