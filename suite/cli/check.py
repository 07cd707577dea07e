"""`mpbench check`: the convergence gate over seeds, per (model, mode).

Each mode's final held-out loss is paired with the same seed's fp32 record; over two seeds or more
the verdict is `pass` (the 95% interval of the mean delta lies at or below the mode's tolerance),
`FAIL` (above it), or `inconclusive` with the seeds that would settle it; one seed is judged as
before (the delta against the tolerance) and marked single-seed. Exit codes: 0 every mode passed
(or lags as expected), 1 a mode failed or nothing could be checked, 3 no mode failed but some
verdict is inconclusive (never silently passed), 2 bad input.
"""

from __future__ import annotations

import argparse

from suite.records import store
from suite.reporting import convergence
from suite.reporting.seeds import ModeVerdict, NoiseFloor, judge, noise_floors
from suite.text import fmt, table

HEADER = ["model", "mode", "seeds", "mean delta", "sd", "95% interval", "tolerance", "verdict", "detail"]
CHECKED = ("pass", "FAIL", "lags (expected)", "inconclusive")


def add_arguments(chk: argparse.ArgumentParser) -> None:
    """The arguments of `mpbench check`."""
    chk.add_argument("records", nargs="+", help="JSON Lines record files")
    chk.add_argument("--tolerance", help="override bounds, e.g. bf16=0.05,amp-fp16=0.01 (nats/token)")


def _row(v: ModeVerdict) -> list[str]:
    d = v.delta
    reference = v.outcome == "reference"  # fp32 against itself: its spread is the noise floor's line
    interval = f"{d.ci_low:+.4f}..{d.ci_high:+.4f}" if d.ci_low is not None and not reference else "-"
    return [
        v.model, v.mode, str(len(v.seeds)) if v.seeds else "-", "-" if reference else fmt(d.mean, "+.4f"),
        "-" if reference else fmt(d.sd, ".4f"), interval, fmt(v.tolerance and v.tolerance.max_delta, ".4f"),
        v.outcome, v.detail,
    ]  # fmt: skip


def _floor(f: NoiseFloor) -> str:
    seeds = ", ".join(str(s) for s in f.seeds)
    fp32 = f"fp32's final loss {f.fp32_final.mean:.4f}, sd {f.fp32_final.sd:.4f}"
    paired = f"; paired deltas' sd {f.delta_sd:.4f} (median over modes)" if f.delta_sd is not None else ""
    return f"noise floor, {f.model} (seeds {seeds}): {fp32}{paired}"


def cmd_check(args: argparse.Namespace) -> int:
    """Convergence gate: exit 1 on a FAIL, 3 when nothing failed but some verdict is inconclusive."""
    tolerances = convergence.parse_tolerances(args.tolerance)
    records = store.read_all(args.records)
    verdicts = judge(records, tolerances)  # the latest record of each case counts, across runs too
    print(table([_row(v) for v in verdicts], HEADER))
    floors = noise_floors(records)
    if floors:
        print("\n" + "\n".join(_floor(f) for f in floors))
    outcomes = [v.outcome for v in verdicts]
    if not any(o in CHECKED for o in outcomes):
        print("\nnothing was checked: no record has loss_delta_vs_fp32 (run fp32 in the same run)")
        return 1
    failed, doubtful = outcomes.count("FAIL"), outcomes.count("inconclusive")
    better = sum(v.better for v in verdicts)
    look = f", {better} better than fp32 beyond noise (look)" if better else ""
    passed = sum(o in ("pass", "lags (expected)") for o in outcomes)
    print(f"\n{failed} failed, {doubtful} inconclusive, {passed} passed or lag as expected{look}")
    return 1 if failed else 3 if doubtful else 0
