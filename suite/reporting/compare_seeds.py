"""`mpbench compare` over seeds: a mode's mean paired delta vs fp32 in A against B's, each with its interval.

Where A and B both ran a case (every setting alike but mode and seed) on two seeds or more and both
have the mode's delta on 2 seeds or more, the comparison is of the whole interval, not of one seed:
- regressed: B's 95% interval lies wholly above A's (disjoint) and B's mean exceeds A's by more than
  the noise (the larger of A's and B's sd of the paired deltas over seeds);
- improved: the same the other way round;
- inconclusive: neither, but B's verdict against the tolerance got worse (pass -> inconclusive, or
  -> FAIL): the seeds do not settle it, so it is never a silent "same";
- same otherwise.
Each seed's own case is still compared figure by figure, as for a single-seed run.
"""

from __future__ import annotations

from typing import Any

from suite.reporting.compare import SEEDS_METRIC, Comparison
from suite.reporting.convergence import TOLERANCES, Tolerances
from suite.reporting.seed_groups import alike_key, judged
from suite.reporting.seeds import ModeVerdict

METRIC = SEEDS_METRIC  # the rows' metric: what was compared
RANK = {"pass": 0, "inconclusive": 1, "FAIL": 2, "lags (expected)": 2}  # worse verdicts rank higher


def _judged(records: list[dict[str, Any]], tolerances: Tolerances) -> dict[tuple, ModeVerdict]:
    """(alike key, mode) -> the mode's verdict over seeds, for modes with a delta on 2 seeds or more."""
    out = {}
    for s in judged(records, tolerances):
        key = alike_key(s.records[0])
        for v in s.verdicts:
            ready = v.delta.n >= 2 and v.delta.ci_low is not None and v.delta.ci_high is not None
            if ready and v.outcome != "reference":  # fp32 against itself: zeros, nothing to compare
                out[key, v.mode] = v
    return out


def _shown(v: ModeVerdict) -> str:
    d = v.delta
    return f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}] over {d.n} seeds ({v.outcome})"


def judge_pair(va: ModeVerdict, vb: ModeVerdict) -> tuple[str, float]:
    """(verdict, noise) of B's mean delta over seeds against A's; see the module's rule."""
    a, b = va.delta, vb.delta
    noise = max(a.sd or 0.0, b.sd or 0.0)
    if b.ci_low > a.ci_high and b.mean - a.mean > noise:
        return "regressed", noise
    if a.ci_low > b.ci_high and a.mean - b.mean > noise:
        return "improved", noise
    if RANK.get(vb.outcome, 0) > RANK.get(va.outcome, 0):
        return "inconclusive", noise
    return "same", noise


def seed_rows(
    a: list[dict[str, Any]], b: list[dict[str, Any]], tolerances: Tolerances | None = None
) -> list[Comparison]:
    """One row per (case, mode) that both A and B ran on 2 seeds or more; nothing where either has one seed."""
    tol = TOLERANCES if tolerances is None else tolerances
    ja, jb = _judged(a, tol), _judged(b, tol)
    rows = []
    for key in [k for k in ja if k in jb]:
        va, vb = ja[key], jb[key]
        verdict, noise = judge_pair(va, vb)
        why = {
            "regressed": "B's interval lies wholly above A's, by more than the noise",
            "improved": "B's interval lies wholly below A's, by more than the noise",
            "inconclusive": f"the intervals do not settle it, and B's verdict got worse ({va.outcome} -> {vb.outcome})",
            "same": "the intervals overlap (or differ by less than the noise)",
        }[verdict]
        message = (f"{va.model}/{va.mode} mean final-loss delta vs fp32 over seeds (paired per seed): "
                   f"A {_shown(va)} -> B {_shown(vb)}; noise (larger sd of the paired deltas) {noise:.4f}: "
                   f"{verdict}: {why}")  # fmt: skip
        rows.append(Comparison(va.model, va.mode, METRIC, va.delta.mean, vb.delta.mean, None, None, verdict, message))
    return rows
