"""Convergence against strict fp32: per-mode tolerances, the deltas, and the gate.

Every mode trains on the same batches from the same weights as `fp32` in the same run, so
`loss_delta_vs_fp32 = final_loss - final_loss(fp32)` isolates what the precision did. The
gate fails a mode whose held-out loss ends more than its tolerance above fp32's. Modes marked
"expected to lag" are shown with their figures but never fail the gate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    max_delta: float  # nats/token above fp32's final_loss
    expected_to_lag: bool = False
    why: str = ""


# The documented table (docs/convergence-and-fidelity.md, "Convergence"). Deltas below are seen after short runs;
# the bounds leave room for run-to-run numerics, not for a real regression.
TOLERANCES: dict[str, Tolerance] = {
    "tf32": Tolerance(0.02, why="10-bit mantissa matmuls, fp32 everywhere else"),
    "amp-fp16": Tolerance(0.02, why="fp32 master weights; fp16 activations with loss scaling"),
    "bf16": Tolerance(0.03, why="fp32 master weights; bf16 has 8 mantissa bits"),
    "int8-weight": Tolerance(0.05, expected_to_lag=True, why="int8 weights with stochastic rounding"),
    "pure-fp16": Tolerance(0.10, expected_to_lag=True, why="no master copy: small updates round away"),
    # issue 14; measured on tiny, 60 CPU steps (docs/convergence-and-fidelity.md): pure-bf16 +0.084, pure-bf16-sr
    # +0.003, int8-mixed -0.000, fp8-tensorwise +0.000, fp8-rowwise +0.002, mxfp8 +0.003
    "pure-bf16": Tolerance(0.10, expected_to_lag=True, why="no master copy, round to nearest: small updates lost"),
    "pure-bf16-sr": Tolerance(0.03, why="no master copy; stochastic rounding keeps small updates on average"),
    "int8-mixed": Tolerance(0.03, why="fp32 master; int8 matmuls with per-row dynamic scales"),
    "fp8-tensorwise": Tolerance(0.03, why="fp32 master; float8 matmuls, one scale per tensor"),
    "fp8-rowwise": Tolerance(0.03, why="fp32 master; float8 matmuls, one scale per row"),
    "mxfp8": Tolerance(0.03, why="fp32 master; MXFP8 matmuls, one scale per 32 elements"),
}
REFERENCE = "fp32"


def parse_tolerances(text: str | None) -> dict[str, Tolerance]:
    """'bf16=0.05,amp-fp16=0.01' -> the default table with those bounds replaced."""
    table = dict(TOLERANCES)
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        mode, sep, value = item.partition("=")
        mode = mode.strip()
        if not sep:
            raise ValueError(f"tolerance={item!r}: expected MODE=NATS, e.g. bf16=0.05")
        if mode not in table:
            raise ValueError(f"tolerance={item!r}: mode {mode!r} has no tolerance; choose from {', '.join(table)}")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"tolerance={item!r}: {value.strip()!r} is not a number of nats, e.g. 0.05") from None
        if not bound >= 0:
            raise ValueError(f"tolerance={item!r}: must be zero or positive")
        old = table[mode]
        table[mode] = Tolerance(bound, old.expected_to_lag, old.why)
    return table


def delta_fields(record: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """`loss_delta_vs_fp32` (or None + `loss_delta_reason`) and `excess_loss` for one record."""
    out: dict[str, Any] = {}
    final, floor = record.get("final_loss"), record.get("loss_floor")
    if final is not None and floor is not None:
        out["excess_loss"] = final - floor
    if final is None:
        out["loss_delta_reason"] = f"this case has no final_loss (status {record.get('status')})"
    elif reference is None:
        out["loss_delta_reason"] = "fp32 is not in this run with the same model, sizes, steps, seed and data"
    elif reference.get("final_loss") is None:
        out["loss_delta_reason"] = f"the fp32 reference ended as {reference.get('status')}: {reference.get('reason')}"
    else:
        out["loss_delta_vs_fp32"] = final - reference["final_loss"]
    return out


@dataclass(frozen=True)
class Verdict:
    mode: str
    model: str
    delta: float | None
    tolerance: Tolerance | None
    outcome: str  # "pass", "FAIL", "lags (expected)", "reference", "not checked"
    detail: str


def check(records: Iterable[dict[str, Any]], tolerances: dict[str, Tolerance]) -> list[Verdict]:
    """One verdict per record; a mode that diverged or errored fails unless expected to lag."""
    verdicts = []
    for r in records:
        mode, delta = r["mode"], r.get("loss_delta_vs_fp32")
        tol = tolerances.get(mode)
        if mode == REFERENCE:
            verdicts.append(Verdict(mode, r["model"], None, None, "reference", r["status"]))
            continue
        if r["status"] == "skipped" or tol is None:
            why = r.get("reason") if r["status"] == "skipped" else f"no tolerance for mode {mode!r}"
            verdicts.append(Verdict(mode, r["model"], delta, tol, "not checked", why or ""))
            continue
        if delta is None:
            failed = r["status"] != "ok"
            detail = r.get("reason") if failed else r.get("loss_delta_reason")
            outcome = ("lags (expected)" if tol.expected_to_lag else "FAIL") if failed else "not checked"
            verdicts.append(Verdict(mode, r["model"], None, tol, outcome, f"{r['status']}: {detail}"))
            continue
        within = delta <= tol.max_delta
        outcome = "pass" if within else ("lags (expected)" if tol.expected_to_lag else "FAIL")
        detail = f"{delta:+.4f} nats vs tolerance {tol.max_delta:.4f}"
        verdicts.append(Verdict(mode, r["model"], delta, tol, outcome, detail))
    return verdicts
