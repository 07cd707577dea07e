"""Convergence over seeds: paired deltas vs fp32, their Student t interval, and a three-way verdict.

Each seed's fp32 case is that seed's reference (same initial weights, same batches), so a mode's
delta on seed s is paired: `final_loss(mode, s) - final_loss(fp32, s)`. Over n seeds the verdict
against the mode's tolerance is `pass` when the whole 95% interval of the mean delta lies at or below
the tolerance, `FAIL` when it lies above, and `inconclusive` otherwise, with the number of seeds
that would settle it at the measured spread. One seed is judged as before (the delta against the
tolerance) and marked single-seed.

Records are pooled when every field of the case key (`suite.records.cases.CASE_KEY`) but mode and
seed is equal; the latest record of each case counts, across runs too. The interval is
mean +- t.ppf(0.975, n-1) x sd / sqrt(n) (scipy.stats.t, sd with n-1). A mode whose interval lies
wholly below zero is `better` (flagged for a look, never failed); a failed seed fails the mode (or
"lags (expected)"), naming the seed. The report, the run summary, `mpbench check` and the benchmarks
read `judge` and `noise_floors`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from suite.records.cases import alike, case_key, machine
from suite.records.store import FAILED
from suite.reporting.convergence import REFERENCE, Tolerance, Tolerances, check, paired_fields, tolerance_of

CONFIDENCE = 0.95  # two-sided level of every interval here
SEEDS_CAP = 1000  # seeds_needed looks no further: past it the verdict says "over 1000"


@dataclass(frozen=True)
class SeedStats:
    """One figure over the seeds that have it: its mean, standard deviation (n-1) and 95% Student t
    interval of the mean. sd and the interval are None with fewer than 2 values; all None with 0."""

    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...] = ()  # per seed, in seed order


@dataclass(frozen=True)
class NoiseFloor:
    """What seed noise alone moves, for one group of cases (everything but mode and seed alike)."""

    model: str
    seeds: tuple[int, ...]  # the seeds whose fp32 record has a final loss
    fp32_final: SeedStats  # fp32's own final held-out loss over seeds
    delta_sd: float | None  # median over modes of the paired deltas' standard deviation


@dataclass(frozen=True)
class ModeVerdict:
    """One mode of one group, judged over its seeds."""

    model: str
    mode: str
    seeds: tuple[int, ...]  # seeds with a paired delta
    delta: SeedStats  # paired final held-out loss delta vs fp32 (nats/token)
    last_quarter: SeedStats  # paired mean train-loss delta over the last quarter of the steps
    steps_to_target: SeedStats  # steps to fp32's target loss (see target_loss in the records)
    seconds_to_target: SeedStats | None  # None on emulated kernels (not a speed): see detail
    excess_fraction: SeedStats  # excess loss over the corpus' floor, as a fraction of fp32's
    tolerance: Tolerance | None
    outcome: str  # "pass" | "FAIL" | "inconclusive" | "lags (expected)" | "reference" | "not checked"
    seeds_needed: int | None  # inconclusive: seeds that would settle it at the measured spread
    better: bool  # the interval lies wholly below zero: better than fp32 beyond noise, flagged for a look
    single_seed: bool
    detail: str


def _t(n: int) -> float:
    """The two-sided CONFIDENCE quantile of Student's t with n - 1 degrees of freedom (scipy's)."""
    from scipy.stats import t  # imported when first judged: `mpbench run` without seeds stays quick to start

    return float(t.ppf(0.5 + CONFIDENCE / 2, n - 1))


def seed_stats(values: Iterable[float]) -> SeedStats:
    """Mean, sd (n-1) and the Student t interval of the mean of per-seed values (in seed order)."""
    vals = tuple(float(v) for v in values)
    n = len(vals)
    if n == 0:
        return SeedStats(0, None, None, None, None)
    mean = statistics.fmean(vals)
    if n == 1:
        return SeedStats(1, mean, None, None, None, vals)
    sd = statistics.stdev(vals)
    half = _t(n) * sd / math.sqrt(n)
    return SeedStats(n, mean, sd, mean - half, mean + half, vals)


def seeds_needed(mean: float, sd: float, tolerance: float) -> int | None:
    """The fewest seeds whose interval would no longer straddle `tolerance`, were the mean and sd to stay as
    measured: smallest n with t(n-1) x sd / sqrt(n) < |tolerance - mean|. None when the spread is zero or
    the mean sits on the tolerance (no count settles it), or when it takes more than SEEDS_CAP seeds."""
    gap = abs(tolerance - mean)
    if not sd > 0 or gap == 0:
        return None
    import numpy as np
    from scipy.stats import t

    ns = np.arange(2, SEEDS_CAP + 1)
    hit = np.flatnonzero(t.ppf(0.5 + CONFIDENCE / 2, ns - 1) * sd / np.sqrt(ns) < gap)
    return int(ns[hit[0]]) if hit.size else None


def _groups(records: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The latest record of each case (across runs too), grouped by everything but mode and seed, in
    the order the groups first appear."""
    latest: dict[tuple, dict[str, Any]] = {}
    for r in records:  # one machine's records only: a key's device is just "cpu" or "cuda:0"
        latest[(*case_key(r), machine(r))] = r
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in latest.values():
        groups.setdefault((*alike(case_key(r)), machine(r)), []).append(r)
    return list(groups.values())


def _seed_order(r: dict[str, Any]) -> tuple:
    return (r.get("seed") is None, r.get("seed") or 0)


def _delta(r: dict[str, Any], ref: dict[str, Any] | None) -> float | None:
    """Final loss minus the same seed's fp32's, from the records themselves; when no fp32 of that seed is among
    them (a file of one mode), the delta the run stored against its own fp32 (paired by the whole case key)."""
    if r["status"] != "ok" or r.get("final_loss") is None:
        return None
    if ref is None:
        return r.get("loss_delta_vs_fp32")
    return r["final_loss"] - ref["final_loss"] if ref.get("final_loss") is not None else None


def _paired(r: dict[str, Any], ref: dict[str, Any] | None) -> tuple[dict[str, Any], float | None]:
    """(the record with its curve figures paired again with the fp32 it is judged against, its delta). The
    record's own figures were paired with the fp32 of its run, which a later run may have replaced."""
    delta = _delta(r, ref)
    if ref is None or r is ref or delta is None:  # nothing to pair: a failed case, or a failed fp32
        return r, delta
    return r | paired_fields(r, ref, None), delta


def _values(records: list[dict[str, Any]], field: str) -> list[float]:
    return [r[field] for r in records if r.get(field) is not None and math.isfinite(r[field])]


def _judge_mode(mode: str, mine: list[dict[str, Any]], refs: dict[Any, dict[str, Any]],
                tol: Tolerance | None) -> ModeVerdict:  # fmt: skip
    """One mode of one group over its seeds (`mine` in seed order; `refs`: fp32's record by seed)."""
    paired = [_paired(r, refs.get(r.get("seed"))) for r in mine]
    used = [r for r, d in paired if d is not None]
    delta = seed_stats(d for _, d in paired if d is not None)
    emulated = any(r.get("emulated") for r in used)
    figures = dict(
        model=mine[0]["model"], mode=mode, seeds=tuple(r.get("seed") for r in used), delta=delta,
        last_quarter=seed_stats(_values(used, "loss_delta_last_quarter")),
        steps_to_target=seed_stats(_values(used, "steps_to_target")),
        seconds_to_target=None if emulated else seed_stats(_values(used, "seconds_to_target")),
        excess_fraction=seed_stats(_values(used, "excess_fraction")), tolerance=tol,
    )  # fmt: skip
    notes = ["emulated: no seconds to target"] if emulated else []
    if len(mine) > 1 and not all(r["status"] == "skipped" for r in mine):  # a seed that gave no delta: which, why
        notes += [f"seed {r.get('seed')}: no delta ({_no_delta(r, refs.get(r.get('seed')))})"
                  for r, d in paired if d is None and r["status"] not in FAILED]  # fmt: skip
    failed = [r for r in mine if r["status"] in FAILED]
    if len(mine) == 1:  # one seed: judged as before
        r = used[0] if used else mine[0]
        ref = refs.get(r.get("seed"))
        why = None if delta.mean is not None else _no_delta(r, ref) if r is not ref else None
        v = check([r | {"loss_delta_vs_fp32": delta.mean, "loss_delta_reason": why}], {mode: tol} if tol else {})[0]
        detail = "; ".join(["single-seed", v.detail, *notes]) if v.detail else "single-seed"
        return ModeVerdict(**figures, outcome=v.outcome, seeds_needed=None, better=False, single_seed=True,
                           detail=detail)  # fmt: skip
    if mode == REFERENCE:
        finals = seed_stats(_values(used, "final_loss"))
        notes = [f"final loss {finals.mean:.4f}" + (f", sd {finals.sd:.4f}" if finals.sd is not None else "")
                 if finals.n else "no final loss", *_failed(failed), *notes]  # fmt: skip
        return _verdict(figures, "reference", notes)
    if all(r["status"] == "skipped" for r in mine) or tol is None:
        why = mine[0].get("reason") if tol is not None else f"no tolerance for mode {mode!r}"
        return _verdict(figures, "not checked", [why or "", *notes])
    if failed:  # a failed seed fails the mode, as one failed run did before
        return _verdict(figures, "lags (expected)" if tol.expected_to_lag else "FAIL", [*_failed(failed), *notes])
    if delta.n == 0:
        return _verdict(figures, "not checked", notes)
    if delta.n == 1:  # several seeds asked, one paired (its fp32 failed on the others): no interval to judge by
        return _verdict(figures, "inconclusive", [f"only seed {used[0].get('seed')} has a paired delta", *notes])
    return _over_seeds(figures, delta, tol, notes)


def _over_seeds(figures: dict[str, Any], delta: SeedStats, tol: Tolerance, notes: list[str]) -> ModeVerdict:
    """The three-way verdict of n >= 2 paired deltas against the tolerance."""
    assert delta.ci_low is not None and delta.ci_high is not None and delta.sd is not None and delta.mean is not None
    bound, needed = tol.max_delta, None
    better = delta.ci_high < 0  # flagged for a look (MLPerf treats beating the reference as suspect), never failed
    if delta.ci_high <= bound:
        outcome = "pass"
    elif tol.expected_to_lag:  # past its bound, or maybe: either way it lags as expected, never an open question
        outcome = "lags (expected)"
    elif delta.ci_low > bound:
        outcome = "FAIL"
    else:
        outcome, needed = "inconclusive", seeds_needed(delta.mean, delta.sd, bound)
        if needed is not None:
            notes = [f"{needed} seeds would settle it at this spread", *notes]
        elif delta.mean == bound:
            notes = ["the mean sits on the tolerance: no number of seeds settles it", *notes]
        else:
            notes = [f"over {SEEDS_CAP} seeds would settle it at this spread", *notes]
    if better:
        notes = ["better than fp32 beyond noise: look", *notes]
    elif delta.ci_low > 0:  # told apart from fp32 with confidence, whatever the verdict against the tolerance
        notes = ["above fp32 beyond noise", *notes]
    return ModeVerdict(**figures, outcome=outcome, seeds_needed=needed, better=better, single_seed=False,
                       detail="; ".join(notes))  # fmt: skip


def _verdict(figures: dict[str, Any], outcome: str, notes: list[str]) -> ModeVerdict:
    return ModeVerdict(**figures, outcome=outcome, seeds_needed=None, better=False, single_seed=False,
                       detail="; ".join(n for n in notes if n))  # fmt: skip


def _failed(failed: list[dict[str, Any]]) -> list[str]:
    return [f"seed {r.get('seed')} {r['status']}: {r.get('reason')}" for r in failed]


def _no_delta(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    if r["status"] == "skipped":
        return f"skipped: {r.get('reason')}"
    if ref is not None and ref.get("final_loss") is None:
        return f"its fp32 ended as {ref.get('status')}"
    return r.get("loss_delta_reason") or "no fp32 record of this seed"


def judge(records: Iterable[dict[str, Any]], tolerances: Tolerances) -> list[ModeVerdict]:
    """One verdict per (group, mode), fp32 first in each group."""
    verdicts = []
    for members in _groups(records):
        refs = {r.get("seed"): r for r in members if r["mode"] == REFERENCE}
        modes = dict.fromkeys([REFERENCE] * bool(refs) + [r["mode"] for r in members])
        for mode in modes:
            mine = sorted((r for r in members if r["mode"] == mode), key=_seed_order)
            verdicts.append(_judge_mode(mode, mine, refs, tolerance_of(tolerances, members[0], mode)))
    return verdicts


def noise_floors(records: Iterable[dict[str, Any]]) -> list[NoiseFloor]:
    """One noise floor per group of cases that has fp32 on two seeds or more."""
    floors = []
    for members in _groups(records):
        refs = sorted((r for r in members if r["mode"] == REFERENCE and _delta(r, r) is not None), key=_seed_order)
        if len(refs) < 2:
            continue
        by_seed = {r.get("seed"): r for r in refs}
        sds = []  # each mode's paired deltas' sd
        for mode in dict.fromkeys(r["mode"] for r in members if r["mode"] != REFERENCE):
            paired = (_delta(r, by_seed.get(r.get("seed"))) for r in members if r["mode"] == mode)
            sd = seed_stats(d for d in paired if d is not None).sd
            if sd is not None:
                sds.append(sd)
        fp32 = seed_stats(r["final_loss"] for r in refs)
        seeds = tuple(r.get("seed") for r in refs)
        floors.append(NoiseFloor(refs[0]["model"], seeds, fp32, statistics.median(sds) if sds else None))
    return floors
