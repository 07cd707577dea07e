"""Convergence against strict fp32: per-mode tolerances, the deltas, and the gate.

Every mode trains on the same batches from the same weights as `fp32` in the same run, so
`loss_delta_vs_fp32 = final_loss - final_loss(fp32)` isolates what the precision did. The
gate fails a mode whose held-out loss ends more than its tolerance above fp32's. Modes marked
"expected to lag" are shown with their figures but never fail the gate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    max_delta: float  # nats/token above fp32's final_loss
    expected_to_lag: bool = False
    why: str = ""


# Bounds set by hand before any multi-seed measurement (docs/convergence-and-fidelity.md, "Tolerances"): the
# bounds of a model that no measurement covers yet (gpt2-small and up: no GPU has run them) and of tf32 (GPU only).
HAND_SET: dict[str, Tolerance] = {
    "tf32": Tolerance(0.02, why="10-bit mantissa matmuls, fp32 everywhere else"),
    "amp-fp16": Tolerance(0.02, why="fp32 master weights; fp16 activations with loss scaling"),
    "bf16": Tolerance(0.03, why="fp32 master weights; bf16 has 8 mantissa bits"),
    "int8-weight": Tolerance(0.05, expected_to_lag=True, why="int8 weights with stochastic rounding"),
    "pure-fp16": Tolerance(0.10, expected_to_lag=True, why="no master copy: small updates round away"),
    "pure-bf16": Tolerance(0.10, expected_to_lag=True, why="no master copy, round to nearest: small updates lost"),
    "pure-bf16-sr": Tolerance(0.03, why="no master copy; stochastic rounding keeps small updates on average"),
    "int8-mixed": Tolerance(0.03, why="fp32 master; int8 matmuls with per-row dynamic scales"),
    "fp8-tensorwise": Tolerance(0.03, why="fp32 master; float8 matmuls, one scale per tensor"),
    "fp8-rowwise": Tolerance(0.03, why="fp32 master; float8 matmuls, one scale per row"),
    "mxfp8": Tolerance(0.03, why="fp32 master; MXFP8 matmuls, one scale per 32 elements"),
    # issue 26: lag on tiny (MEASURED_4BIT below); elsewhere unmeasured, so wide (more steps, gpt2-small on a GPU)
    "nvfp4": Tolerance(
        0.10,
        expected_to_lag=True,
        why="fp32 master; NVFP4 matmuls (e2m1, e4m3 scale per 16 "
        "under an fp32 one; sr, rht, 2-D weights), last 15% of blocks and LM head in bf16",
    ),
    "mxfp4": Tolerance(
        0.10,
        expected_to_lag=True,
        why="fp32 master; MXFP4 matmuls (e2m1, e8m0 scale per 32; sr, rht), last 15% of blocks and LM head in bf16",
    ),
}


def _measured(bound: float, at_8x64: str, at_8x128: str, of: str) -> Tolerance:
    lag = HAND_SET[of].expected_to_lag
    why = f"measured over 10 seeds (tiny, CPU): {at_8x64} nats at 8 x 64, {at_8x128} at 8 x 128; {HAND_SET[of].why}"
    return Tolerance(bound, lag, why)


# Measured (issue 23): `bash ci/measure-tolerances.sh` on tiny on a CPU at the CPU defaults' 40 steps with the
# cosine schedule, batch 8 x 64 and 8 x 128, every mode over seeds 0-9; the records are in results/tolerances/.
# bound = the 95% upper end of the mean paired delta + 2 sd, rounded up to 0.005, at least 0.01, the widest over
# the two sizes (suite/reporting/tolerances.py; tests/test_tolerances.py re-derives these from the records).
# A measured bound holds for what was measured: the model, the device type, the steps and the schedule
# (`measured_as`); any other case (more steps, a GPU, a constant rate, an old record) gets the hand-set bound.
# Each `why` quotes the mean paired delta [95% interval] at each size.
# fmt: off
MEASURED: dict[tuple[str, str, int, str], dict[str, Tolerance]] = {
    ("tiny", "cpu", 40, "cosine"): {
        "amp-fp16": _measured(0.01, "+0.0000 [-0.0000, +0.0001]", "+0.0000 [-0.0000, +0.0001]", "amp-fp16"),
        "bf16": _measured(0.01, "+0.0002 [+0.0001, +0.0003]", "+0.0001 [-0.0001, +0.0002]", "bf16"),
        "int8-weight": _measured(0.01, "+0.0024 [+0.0016, +0.0032]", "+0.0018 [+0.0015, +0.0022]", "int8-weight"),
        "pure-fp16": _measured(0.15, "+0.0582 [+0.0515, +0.0649]", "+0.0912 [+0.0758, +0.1065]", "pure-fp16"),
        "pure-bf16": _measured(0.10, "+0.0812 [+0.0798, +0.0827]", "+0.0931 [+0.0919, +0.0944]", "pure-bf16"),
        "pure-bf16-sr": _measured(0.01, "+0.0040 [+0.0033, +0.0047]", "+0.0046 [+0.0042, +0.0051]", "pure-bf16-sr"),
        "int8-mixed": _measured(0.01, "+0.0001 [-0.0004, +0.0006]", "+0.0001 [-0.0002, +0.0004]", "int8-mixed"),
        "fp8-tensorwise": _measured(0.01, "+0.0005 [-0.0006, +0.0016]", "+0.0009 [+0.0002, +0.0016]",
                                    "fp8-tensorwise"),
        "fp8-rowwise": _measured(0.01, "+0.0000 [-0.0012, +0.0012]", "+0.0003 [-0.0008, +0.0014]", "fp8-rowwise"),
        "mxfp8": _measured(0.01, "+0.0006 [-0.0003, +0.0014]", "+0.0004 [-0.0007, +0.0015]", "mxfp8"),
    },
}
# fmt: on
# Measured (issue 26), the 4-bit modes alone with their own fp32 pairs, by the same rule as MEASURED over seeds 0-9
# at both sizes (tests/test_modes_fp4.py re-derives them from the records in results/tolerances/*-fp4.jsonl):
#   SEEDS=10 MPBENCH_DEVICE=cpu MPBENCH_TOL_ARGS="--model tiny --batch-size 8 --seq-len 64 --modes fp32,nvfp4,mxfp4" \
#       bash ci/measure-tolerances.sh results/tolerances/tiny-cpu-8x64-fp4.jsonl      (and --seq-len 128, 8x128)
# Both lag fp32 (their intervals exclude 0): expected to lag, shown with their figures, never failing the gate.
# fmt: off
MEASURED_4BIT: dict[tuple[str, str, int, str], dict[str, Tolerance]] = {
    ("tiny", "cpu", 40, "cosine"): {
        "nvfp4": _measured(0.035, "+0.0175 [+0.0130, +0.0220]", "+0.0154 [+0.0132, +0.0176]", "nvfp4"),
        "mxfp4": _measured(0.040, "+0.0240 [+0.0203, +0.0277]", "+0.0259 [+0.0234, +0.0284]", "mxfp4"),
    },
}
# fmt: on
# The gate's table: a mode's measured bound for a configuration where one exists (key (measured_as, mode)), else
# the hand-set one (key mode). Read it through `tolerance_of`.
Tolerances = dict[Any, Tolerance]
TOLERANCES: Tolerances = {
    **HAND_SET,
    **{(config, mode): tol for config, table in MEASURED.items() for mode, tol in table.items()},
    **{(config, mode): tol for config, table in MEASURED_4BIT.items() for mode, tol in table.items()},
}


REFERENCE = "fp32"


def measured_as(record: dict[str, Any]) -> tuple[str, str, int, str]:
    """What a measured bound is keyed by: model, device type, steps, schedule (records from before the schedule
    trained at a constant rate)."""
    device = str(record.get("device") or "").split(":")[0]
    return (record.get("model"), device, record.get("steps"), record.get("lr_schedule") or "constant")


def tolerance_of(table: Tolerances, record: dict[str, Any], mode: str) -> Tolerance | None:
    """The bound of `mode` for `record`'s case: measured for its configuration if the table has it, else hand-set."""
    key = (measured_as(record), mode)
    return table[key] if key in table else table.get(mode)


def parse_tolerances(text: str | None) -> Tolerances:
    """'bf16=0.05,amp-fp16=0.01' -> the default table with those bounds replaced, for every model."""
    table = dict(TOLERANCES)
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        mode, sep, value = item.partition("=")
        mode = mode.strip()
        if not sep:
            raise ValueError(f"tolerance={item!r}: expected MODE=NATS, e.g. bf16=0.05")
        if mode not in HAND_SET:
            raise ValueError(f"tolerance={item!r}: mode {mode!r} has no tolerance; choose from {', '.join(HAND_SET)}")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"tolerance={item!r}: {value.strip()!r} is not a number of nats, e.g. 0.05") from None
        if not bound >= 0:
            raise ValueError(f"tolerance={item!r}: must be zero or positive")
        for key in [k for k in table if k == mode or (isinstance(k, tuple) and k[-1] == mode)]:
            table[key] = Tolerance(bound, table[key].expected_to_lag, f"--tolerance {mode}={bound:g}")
    return table


def delta_fields(record: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of one record paired with its seed's fp32 record (`reference`; fp32's own record
    is paired with itself): `loss_delta_vs_fp32` (or None + `loss_delta_reason`), `excess_loss`, and
    the curve figures of `paired_fields`."""
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
    return out | paired_fields(record, reference, out.get("loss_delta_reason"))


# Time to quality (MLPerf's metric, on fp32's own scale): the target lies this far from fp32's smoothed
# first loss to its smoothed last one, so every mode that trains like fp32 reaches it before the end.
TARGET_FRACTION = 0.9
TARGET_WINDOW = 5  # steps in the trailing mean that smooths a training-loss curve (fewer on short runs)


def smoothing_window(steps: int) -> int:
    """The trailing-mean window for a curve of `steps` losses: TARGET_WINDOW, at most a quarter of the run."""
    return min(TARGET_WINDOW, max(1, steps // 4))


def _finite(values: list) -> list[float] | None:
    """The losses as floats, or None when one is missing, NaN or infinite."""
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def target_loss(reference_curve: list) -> float | None:
    """The loss TARGET_FRACTION of the way from fp32's smoothed start to its smoothed end; None if not finite."""
    curve = _finite(reference_curve or [])
    if not curve:
        return None
    w = smoothing_window(len(curve))
    start, end = sum(curve[:w]) / w, sum(curve[-w:]) / w
    return start + TARGET_FRACTION * (end - start)


def paired_fields(record: dict[str, Any], reference: dict[str, Any] | None, why: str | None) -> dict[str, Any]:
    """Curve figures against the seed's fp32: `loss_delta_last_quarter`, `target_loss`, `steps_to_target`,
    `seconds_to_target`, `excess_fraction`; each None with its reason (`curve_reason`,
    `seconds_to_target_reason`, `excess_fraction_reason`). `why`: the pairing failed (no delta), and why."""
    if why is not None or reference is None:
        why = why or "no fp32 record to pair with"
        return {"curve_reason": why, "seconds_to_target_reason": why, "excess_fraction_reason": why}
    out: dict[str, Any] = {}
    curve_why: list[str] = []
    mine, ref = record.get("loss_curve") or [], reference.get("loss_curve") or []
    if not mine or len(mine) != len(ref):
        curve_why.append(f"loss curves of {len(mine)} and fp32's {len(ref)} steps cannot be paired")
    else:
        q = max(1, len(mine) // 4)  # the last quarter of the steps, at least one
        tail, ref_tail = _finite(mine[-q:]), _finite(ref[-q:])
        if tail is None or ref_tail is None:
            curve_why.append("a NaN or infinite loss in the last quarter of the steps")
        else:
            out["loss_delta_last_quarter"] = sum(a - b for a, b in zip(tail, ref_tail, strict=True)) / q
    target = target_loss(ref)
    step_ms = record.get("step_time_ms")
    reached = None
    if target is None:
        curve_why.append("fp32's loss curve is missing or not finite: no target loss")
    else:
        out["target_loss"] = target
        reached = time_to_loss(mine, step_ms or 0.0, target, smoothing_window(len(ref)))
        if reached is None:
            curve_why.append(f"fp32's target loss {target:.4f} not reached in {len(mine)} steps")
        else:
            out["steps_to_target"] = reached[0]
    if record.get("emulated"):
        out["seconds_to_target_reason"] = f"emulated kernels, not a speed: {record.get('emulated_reason')}"
    elif reached is None:
        what = "no target loss" if target is None else "the target loss was not reached"
        out["seconds_to_target_reason"] = f"{what} (see curve_reason)"
    elif step_ms is None:
        out["seconds_to_target_reason"] = "no step time was measured"
    else:
        out["seconds_to_target"] = reached[1]
    if curve_why:
        out["curve_reason"] = "; ".join(curve_why)
    return out | _excess_fraction(record, reference)


def _excess_fraction(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """This mode's excess loss over the corpus' floor as a fraction of fp32's."""
    floor = record.get("loss_floor")
    if floor is None:
        return {"excess_fraction_reason": "the corpus has no known loss floor (a data file)"}
    excess, ref_excess = record["final_loss"] - floor, reference["final_loss"] - floor
    if not ref_excess > 0:
        return {"excess_fraction_reason": f"fp32 ended {ref_excess:+.4f} from the loss floor: no excess to divide by"}
    return {"excess_fraction": excess / ref_excess}


def time_to_loss(loss_curve: list, step_time_ms: float, target: float, window: int = 5) -> tuple[int, float] | None:
    """(first step, seconds) at which the mean training loss of the last `window` steps is <= target.

    Only full windows count, and a window holding a NaN/inf loss never counts. Seconds are
    step x `step_time_ms`, where the recorded step time is the median of the timed steps: the
    warm-up steps are priced at that median too, and compilation (in warm-up with --compile),
    model build, data loading and evaluation are not included. None if never reached.
    """
    if window < 1:
        raise ValueError(f"window={window}: must be at least 1 step")
    losses = [None if v is None or not math.isfinite(v) else float(v) for v in loss_curve or []]
    for end in range(window, len(losses) + 1):
        last = losses[end - window : end]
        if None not in last and sum(last) / window <= target:  # type: ignore[arg-type]
            return end, end * step_time_ms / 1000
    return None


@dataclass(frozen=True)
class Verdict:
    mode: str
    model: str
    delta: float | None
    tolerance: Tolerance | None
    outcome: str  # "pass", "FAIL", "lags (expected)", "reference", "not checked"
    detail: str


def check(records: Iterable[dict[str, Any]], tolerances: Tolerances) -> list[Verdict]:
    """One verdict per record; a mode that diverged or errored fails unless expected to lag."""
    verdicts = []
    for r in records:
        mode, delta = r["mode"], r.get("loss_delta_vs_fp32")
        tol = tolerance_of(tolerances, r, mode)
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
