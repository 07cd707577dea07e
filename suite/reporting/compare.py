"""Run A against run B, case by case, with the noise rules of the committed baselines.

A metric of `baseline.RULES` regresses when B is worse than A by more than that metric's
allowance (its floor plus both runs' measured p10-p90 spread, exactly as `baseline.compare`
judges a run against a baseline), and improves when B is better by more than the same
allowance. The fidelity figures (vs float64) have no noise to measure: like the loss, each has
a bounded difference (`FIDELITY_BOUNDS`). Throughput and utilization figures are shown as
ratios only ("info"). A figure that broke a self-check rule in A or B (`suspect`) gets the
verdict "suspect": never a clean regression or improvement, and it does not change the exit code. A case on
emulated kernels (either side) is judged on memory, loss and fidelity only: its timings are not speeds.

A noise-allowed metric (step time, energy per step) whose runs are too noisy to judge gets the verdict
"inconclusive" instead of "same" (see `NOISY_SPREAD`); `exit_code` gives it its own code, 3. A tensor whose
SQNR fell by more than a bound (numerics_compare) is "changed": shown, never a failed gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from suite.records.cases import case_key, differences
from suite.records.checks import suspect_fields
from suite.records.noise import NOISY_SPREAD, step_spread
from suite.records.store import FAILED
from suite.reporting import baseline


@dataclass(frozen=True)
class Bound:
    """A bounded-difference rule for a fidelity figure, as `final_loss` has: B may be worse than A by
    max(rel x A's distance, abs) and no more. `distance` maps the figure to a lower-is-better one."""

    rel: float
    abs: float
    distance: str = "value"  # "value", "one_minus" (a cosine), "magnitude" (a signed difference)


# Deterministic figures at a fixed seed (no timing noise); the margins cover kernel-order and
# atomic-add differences between runs, where a 2x larger error is a real change.
FIDELITY_BOUNDS: dict[str, Bound] = {
    "grad_rel_err_vs_fp64": Bound(rel=0.25, abs=1e-6),
    "update_rel_err_vs_fp64": Bound(rel=0.25, abs=1e-5),
    "grad_cos_vs_fp64": Bound(rel=0.5, abs=1e-10, distance="one_minus"),  # 1 - cos ~ rel_err^2 / 2
    "update_cos_vs_fp64": Bound(rel=0.5, abs=1e-8, distance="one_minus"),
    "grad_underflow_frac": Bound(rel=0.25, abs=1e-6),
    "grad_overflow_frac": Bound(rel=0.0, abs=0.0),  # any new inf/NaN in applied gradients
    "fidelity_loss_diff": Bound(rel=0.5, abs=1e-6, distance="magnitude"),
}
INFO_METRICS = ("tokens_per_s", "mfu", "tensor_core_util", "tokens_per_joule")
SPEED_METRICS = ("tokens_per_s", "mfu", "tokens_per_joule")  # left out for emulated kernels, like step time

# NOISY_SPREAD (suite/records/noise.py, the threshold the summary and the report mark a noisy step time
# with) is also the largest relative p10-p90 spread of the step time (of A or B) at which "same" still
# means something.
# A "same" says B is within the allowance of A, and a noise-allowed metric's allowance grows with the
# spread (step time: 2% + spread), so past 20% a "same" could hide a 1.2x slowdown: more than most of
# what this suite measures (fp8 over bf16 is a few percent, bf16 over fp32 1.1-3x). A quiet GPU's step
# spread is a few percent; 20% and more means something else shares the machine (`mpbench doctor`).
# A difference beyond even the wide allowance is still judged: it beat the noise it was measured with.
SEEDS_METRIC = "loss delta vs fp32 over seeds"  # compare_seeds' rows: every one is said in words
INCONCLUSIVE_EXIT = 3  # nothing regressed, but some verdict could not be given: never a silent pass


@dataclass(frozen=True)
class Comparison:
    """One metric of one case in A and B, or a note about a case that could not be compared."""

    model: str
    mode: str
    metric: str  # a record field, "status", or "-" for an unmatched case
    a: float | None
    b: float | None
    ratio: float | None  # b / a
    allowed: float | None  # the largest B that is not a regression
    verdict: str  # "regressed", "improved", "same", "inconclusive" (noise past NOISY_SPREAD), "info", "unmatched",
    # "suspect" (a figure broke a self-check), "changed" (a tensor's SQNR fell: shown, not failed)
    message: str


def _label(r: dict[str, Any]) -> str:
    sizes = f"batch {r.get('batch_size')} x {r.get('seq_len')}, {r.get('steps')} steps, seed {r.get('seed')}"
    return f"{r.get('model')}/{r.get('mode')} ({sizes})"


def _index(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Case (the resume key: every setting) -> record; an ok record wins over a failed one, a later
    one over an earlier one."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in records:
        k = case_key(r)
        if k not in out or r.get("status") == "ok" or out[k].get("status") != "ok":
            out[k] = r
    return out


def _unmatched(r: dict[str, Any], side: str, others: list[dict[str, Any]]) -> Comparison:
    """A case only one side has, with the settings that set the other side's nearest case apart."""
    other = "B" if side == "A" else "A"
    near = [o for o in others if (o.get("model"), o.get("mode")) == (r.get("model"), r.get("mode"))]
    a_b = (lambda o: differences(r, o)) if side == "A" else (lambda o: differences(o, r))
    why = min((a_b(o) for o in near), key=len, default=None)
    nearest = f"; {other} has it with other settings (A vs B: {', '.join(why)})" if why else ""
    message = f"{_label(r)}: only in {side}, no matching case in {other}{nearest}: unmatched"
    return Comparison(r.get("model"), r.get("mode"), "-", None, None, None, None, "unmatched", message)


def _num(value: float | None) -> str:
    """4 significant digits; large counts (tokens/s) in full with thousands separators."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"


def _ratio(a: float, b: float) -> float | None:
    return b / a if a else None


def _metric_rows(ra: dict[str, Any], rb: dict[str, Any]) -> list[Comparison]:
    """Verdict rows through `baseline.compare` (A as the baseline), then the ratio-only rows."""
    model, mode = ra["model"], ra["mode"]
    entry = baseline.make_baseline([ra])["entries"][f"{model}/{mode}"]
    bad_a, bad_b = suspect_fields(ra), suspect_fields(rb)
    spreads = step_spread(ra), step_spread(rb)
    rows = []
    for f in baseline.compare(rb, entry):
        allowance = f.allowed - f.old  # the same margin on the better side makes "improved"
        verdict = "regressed" if f.regressed else "improved" if f.new < f.old - allowance else "same"
        ratio = _ratio(f.old, f.new)
        better = f", better than {_num(f.old - allowance)}" if verdict == "improved" else ""
        why = ""
        if verdict == "same" and baseline.RULES[f.metric].spread_factor and too_noisy(*spreads):
            verdict, why = "inconclusive", f": {noise_note(*spreads)}"
        shown, doubt = _doubt(verdict + why, f.metric, bad_a, bad_b)
        verdict = "suspect" if doubt else verdict
        message = (
            f"{model}/{mode} {f.metric}: {_num(f.old)} -> {_num(f.new)} ({_x(ratio)}), "
            f"allowed up to {_num(f.allowed)}{better}: {shown}{doubt}"
        )
        rows.append(Comparison(model, mode, f.metric, f.old, f.new, ratio, f.allowed, verdict, message))
    rows += _fidelity_rows(ra, rb)
    from suite.reporting import numerics_compare  # here: it builds on this module's Comparison

    rows += numerics_compare.rows(ra, rb)
    emulated = bool(ra.get("emulated") or rb.get("emulated"))
    for metric in INFO_METRICS:
        if emulated and metric in SPEED_METRICS:
            continue  # emulated kernels: speed ratios would mean nothing
        a, b = ra.get(metric), rb.get(metric)
        if a is None or b is None:
            continue
        ratio = _ratio(a, b)
        verdict, doubt = _doubt("info", metric, bad_a, bad_b)
        message = f"{model}/{mode} {metric}: {_num(a)} -> {_num(b)} ({_x(ratio)}): {verdict}{doubt}"
        rows.append(Comparison(model, mode, metric, a, b, ratio, None, verdict, message))
    return rows


def too_noisy(spread_a: float | None, spread_b: float | None) -> bool:
    """Whether either run's step-time spread is past NOISY_SPREAD: a "same" then cannot rule out a change
    larger than the ones worth finding, so it is no verdict at all."""
    return any(s is not None and s > NOISY_SPREAD for s in (spread_a, spread_b))


def noise_note(spread_a: float | None, spread_b: float | None) -> str:
    """Why a verdict is inconclusive, with both runs' spreads and the bound, and what to do."""
    shown = ", ".join(f"{side} {'-' if s is None else f'{s:.0%}'}" for side, s in (("A", spread_a), ("B", spread_b)))
    return (f"noise too large to judge (step-time p10-p90 spread {shown}; bound {NOISY_SPREAD:.0%}); "
            "rerun on a quiet machine (mpbench doctor)")  # fmt: skip


def _doubt(verdict: str, metric: str, bad_a: dict[str, list], bad_b: dict[str, list]) -> tuple[str, str]:
    """("suspect", why) when A's or B's figure broke a self-check rule, else (verdict, "").

    A suspect figure is never a clean regression or improvement: it neither fails nor passes
    the gate, and the message says which run's figure broke which rule and what the verdict
    would have been.
    """
    sides = [(side, bad[metric]) for side, bad in (("A", bad_a), ("B", bad_b)) if metric in bad]
    if not sides:
        return verdict, ""
    which = "; ".join(f"{side}: {e.get('note')} [{e.get('rule')}]" for side, entries in sides for e in entries)
    return "suspect", f" (would be {verdict}; suspect figure in {which})"


def _float(value: Any) -> float | None:
    """A figure as a float (the reader has decoded 'nan' / 'inf'); None (not measured) kept."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _distance(value: float, how: str) -> float:
    return 1.0 - value if how == "one_minus" else abs(value) if how == "magnitude" else value


def _verdict(da: float, db: float, margin: float) -> str:
    """Lower distance is better; an inf/NaN distance (broken numerics) is worse than any finite one."""
    fa, fb = math.isfinite(da), math.isfinite(db)
    if not (fa and fb):
        return "same" if fa == fb else "regressed" if fa else "improved"
    return "regressed" if db > da + margin else "improved" if db < da - margin else "same"


def _fidelity_rows(ra: dict[str, Any], rb: dict[str, Any]) -> list[Comparison]:
    """Fidelity figures present in both: regressed beyond the bound, improved beyond it, or the same."""
    model, mode = ra["model"], ra["mode"]
    rows = []
    for metric, bound in FIDELITY_BOUNDS.items():
        a, b = _float(ra.get(metric)), _float(rb.get(metric))
        if a is None or b is None:
            continue
        da, db = _distance(a, bound.distance), _distance(b, bound.distance)
        margin = max(da * bound.rel, bound.abs)
        verdict = _verdict(da, db, margin)
        allowed = da + margin  # the worst distance that passes, shown as the figure's own bound
        if bound.distance == "one_minus":
            allowed, limit = 1.0 - allowed, f"down to {1.0 - (da + margin):.10g}"
        else:
            limit = f"{'|diff| ' if bound.distance == 'magnitude' else ''}up to {_num(allowed)}"
        message = f"{model}/{mode} {metric}: {_num(a)} -> {_num(b)}, allowed {limit}: {verdict}"
        rows.append(Comparison(model, mode, metric, a, b, _ratio(a, b), allowed, verdict, message))
    return rows


def _x(ratio: float | None) -> str:
    return f"x{ratio:.2f}" if ratio is not None else "x -"


def _status_row(ra: dict[str, Any], rb: dict[str, Any]) -> Comparison:
    """A case that is not ok on one side: a run that now fails is a regression, one that now runs an improvement."""
    sa, sb = ra.get("status"), rb.get("status")
    if sa == "ok" and sb in FAILED:
        verdict = "regressed"
    elif sb == "ok" and sa in FAILED:
        verdict = "improved"
    else:
        verdict = "unmatched"
    why = "; ".join(
        f"{side} {r.get('status')}: {r.get('reason')}" for side, r in (("A", ra), ("B", rb)) if r.get("status") != "ok"
    )
    message = f"{_label(ra)} status: A {sa}, B {sb} ({why}): {verdict}"
    return Comparison(ra["model"], ra["mode"], "status", None, None, None, None, verdict, message)


def compare_runs(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[Comparison]:
    """Every case of A and B matched on all its settings (the resume key: sizes, steps, seed, data,
    lr, processes...), metric by metric; a case that differs in any setting is unmatched, and says how.
    Then each mode both ran on 2 seeds or more, over its seeds (compare_seeds)."""
    ia, ib = _index(a), _index(b)
    rows: list[Comparison] = []
    for key in list(ia) + [k for k in ib if k not in ia]:
        ra, rb = ia.get(key), ib.get(key)
        if rb is None:
            rows.append(_unmatched(ra, "A", list(ib.values())))
        elif ra is None:
            rows.append(_unmatched(rb, "B", list(ia.values())))
        elif ra.get("status") == "ok" and rb.get("status") == "ok":
            rows += _metric_rows(ra, rb)
        else:
            rows.append(_status_row(ra, rb))
    from suite.reporting.compare_seeds import seed_rows  # here: it builds on this module's Comparison

    return rows + seed_rows(a, b)  # a mode both runs have on 2+ seeds: its delta's interval, A against B


def nothing_compared(rows: list[Comparison], a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str | None:
    """Why no figure of B was judged against A, or None when some was: a gate must not pass on nothing."""
    if any(r.verdict != "unmatched" for r in rows):
        return None
    if not a or not b:
        return f"{'A' if not a else 'B'} has no records"
    models_a, models_b = ({str(r.get("model")) for r in side} for side in (a, b))
    if not models_a & models_b:
        return f"A holds model(s) {', '.join(sorted(models_a))} and B {', '.join(sorted(models_b))}: none in common"
    if not any(r.metric == "status" for r in rows):
        return "no case of A matches a case of B in every setting; the unmatched lines say which settings differ"
    return "every case in both A and B is skipped or failed on both sides"


def format_comparison(rows: list[Comparison]) -> str:
    """A plain-text table (A, B, B/A, allowed, verdict), then the messages of regressed and unmatched cases."""
    header = ["model/mode", "metric", "A", "B", "B/A", "allowed", "verdict"]
    body = [
        [f"{r.model}/{r.mode}", r.metric, _num(r.a), _num(r.b), _x(r.ratio) if r.ratio else "-", _num(r.allowed),
         r.verdict]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdicts = ("regressed", "improved", "same", "inconclusive", "info", "unmatched", "suspect", "changed")
    counts = {v: sum(r.verdict == v for r in rows) for v in verdicts}
    lines += ["", ", ".join(f"{n} {v}" for v, n in counts.items())]
    shown = ("regressed", "inconclusive", "unmatched", "suspect", "changed")
    lines += [r.message for r in rows if r.verdict in shown or r.metric in ("status", SEEDS_METRIC)]
    return "\n".join(lines)


def exit_code(rows: list[Comparison]) -> int:
    """1 if any metric or case regressed, or nothing was compared; else 3 (INCONCLUSIVE_EXIT) if some
    verdict was inconclusive; else 0. A regression outranks doubt: it beat the noise it was measured with."""
    if any(r.verdict == "regressed" for r in rows) or all(r.verdict == "unmatched" for r in rows):
        return 1
    return INCONCLUSIVE_EXIT if any(r.verdict == "inconclusive" for r in rows) else 0
