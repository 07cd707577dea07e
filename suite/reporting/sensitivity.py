"""Which layers a low-precision mode must keep in bf16: the loss each candidate layer policy recovers, over seeds.

`mpbench sensitivity MODE` trains fp32 and MODE once per candidate policy (suite/policy.py), every seed on the same
weights and batches. Per seed s: the gap Y_s = final_loss(MODE, "none") - final_loss(fp32), what converting all the
mode can convert costs; a candidate's recovery X_s = final_loss(none) - final_loss(candidate), its share X_s / Y_s.
Over seeds the figures and verdicts are suite/reporting/seeds.py's: the mean with its 95% Student t interval
(seeds.seed_stats) and the seeds that would settle an open one (seeds.seeds_needed, against 0). A recovery whose
interval holds 0 is "inconclusive" (the same as none within the noise), never a win; a gap whose interval holds 0
is inside the noise, and then nothing is ranked. Reads records only (dicts as stored); torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from suite.policy import DEFAULT_POLICY, default_keep_high, parse_policy
from suite.records.cases import CASE_KEY, case_key, latest_per_case, machine
from suite.reporting.convergence import REFERENCE
from suite.reporting.seed_groups import interval
from suite.reporting.seeds import SeedStats, seed_stats, seeds_needed

NONE = "none"  # the policy that keeps nothing high: the full gap
RECOVERS, INCONCLUSIVE, WORSE = "recovers", "inconclusive", "worse than none"  # a candidate's verdict over seeds
SINGLE, NO_FIGURE, REFERENCE_ROW = "single seed", "no figure", "reference"
BEYOND, INSIDE, BELOW, ONE, NO_GAP = "beyond noise", "inside noise", "below fp32", "single seed", "none"  # the gap's
SWEPT = ("mode", "seed", "keep_high", "fp4_recipe")  # what varies inside one sweep; the rest of the case key agrees
_KEPT = [i for i, k in enumerate(CASE_KEY) if k not in SWEPT]


@dataclass(frozen=True)
class Candidate:
    """One policy to train: its canonical text, the other names of the same layer set, whether it is the default."""

    policy: str
    also: tuple[str, ...] = ()
    default: bool = False


def candidates(mode: str, n_layer: int) -> list[Candidate]:
    """none, each block alone, first:K and last:K (K in 1..n_layer-1), lm_head and the mode's default policy; a
    policy that keeps the same layers as an earlier one is not trained again (tiny's first:1 is block:0)."""
    texts = [NONE, *(f"block:{i}" for i in range(n_layer)), *(f"first:{k}" for k in range(1, n_layer)),
             *(f"last:{k}" for k in range(1, n_layer)), "lm_head", DEFAULT_POLICY[mode]]  # fmt: skip
    default = parse_policy(DEFAULT_POLICY[mode], n_layer).text()
    found: dict[tuple, list[str]] = {}
    for text in texts:
        policy = parse_policy(text, n_layer)
        names = found.setdefault((frozenset(policy.kept_blocks(n_layer)), policy.lm_head, policy.gemms), [])
        if policy.text() not in names:
            names.append(policy.text())
    return [Candidate(names[0], tuple(names[1:]), default in names) for names in found.values()]


@dataclass(frozen=True)
class Row:
    """One policy over the seeds: its final loss, the loss it recovers against none, and the verdict."""

    policy: str
    loss: SeedStats  # final held-out loss
    recovered: SeedStats  # X: loss(none) - loss(this)
    by_seed: dict[int, float]  # X per seed
    share: float | None  # mean X / mean Y
    verdict: str
    detail: str
    default: bool = False


@dataclass(frozen=True)
class Sensitivity:
    """The sweep of one mode against fp32: the gap, the ranked candidates, and whether the seeds agree."""

    model: str
    mode: str
    settings: dict[str, Any]  # the sizes the records share (batch_size, seq_len, steps, device)
    fp32: SeedStats  # fp32's final loss
    gap: SeedStats  # Y over the seeds where fp32 and none both finished
    gap_by_seed: dict[int, float]
    gap_verdict: str  # BEYOND | INSIDE | BELOW | ONE | NO_GAP
    rows: list[Row]  # the candidates ranked by mean recovery, those without one next, none last
    top_by_seed: dict[int, str]  # the candidate that recovers most on each seed ("a = b" for a tie)
    rank_corr: float | None  # mean Spearman correlation of the candidates' recoveries over pairs of seeds
    rank_note: str  # why rank_corr is None ("" when it is not)
    notes: list[str] = field(default_factory=list)  # cases without a final loss, and why


def _final(r: dict[str, Any] | None) -> float | None:
    if r is None or r.get("status") != "ok":
        return None
    loss = r.get("final_loss")
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def _settings(r: dict[str, Any]) -> tuple:
    """What a sweep's records share: the case key but SWEPT, and the machine."""
    key = case_key(r)
    return (*(key[i] for i in _KEPT), machine(r))


def sweeps(records: Iterable[dict[str, Any]]) -> list[Sensitivity]:
    """One analysis per (settings, mode, fp4 recipe) whose records hold fp32 and two keep_high values or more; the
    latest record of each case counts (a resumed or retried one)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in latest_per_case(records):
        groups.setdefault(_settings(r), []).append(r)
    out = []
    for group in groups.values():
        refs = [r for r in group if r.get("mode") == REFERENCE]
        swept: dict[tuple, list[dict[str, Any]]] = {}
        for r in group:
            if r.get("mode") in DEFAULT_POLICY:
                swept.setdefault((r["mode"], r.get("fp4_recipe") or ""), []).append(r)
        for (mode, _), mine in swept.items():
            if refs and len({r.get("keep_high") for r in mine}) >= 2:
                out.append(analyse(mode, refs, mine, default_keep_high(mode, mine[0].get("model"))))
    return out


def judge(x: SeedStats) -> tuple[str, str]:
    """(verdict, detail) of a recovery over seeds: it recovers only when its whole 95% interval lies above 0."""
    if x.n == 0:
        return NO_FIGURE, "no seed has this policy, none and fp32 all finished"
    if x.n == 1:
        return SINGLE, "one seed: no noise estimate, not judged"
    assert x.ci_low is not None and x.ci_high is not None and x.mean is not None and x.sd is not None
    if x.ci_low > 0:
        return RECOVERS, "recovers loss beyond the seeds' noise"
    if x.ci_high < 0:
        return WORSE, "ends above none beyond the noise: keeping it high cost loss; look"
    if x.sd == 0 and x.mean == 0:  # bit for bit none's loss on every seed: the policy changed nothing
        return INCONCLUSIVE, "the same loss as none on every seed, to the last bit: did the mode honour the policy?"
    need = seeds_needed(x.mean, x.sd, 0.0)
    more = f"; about {need} seeds would settle it at this spread" if need else ""
    return INCONCLUSIVE, f"the same as none within the noise{more}"


def analyse(mode: str, fp32: list[dict[str, Any]], mine: list[dict[str, Any]], default: str | None = None
            ) -> Sensitivity:  # fmt: skip
    """The sweep of `mode` (records of its policies, one or more seeds) against the same seeds' fp32 records;
    `default`: the mode's default policy resolved for the model (marked in the table), None when not known."""
    ref = {int(r["seed"]): _final(r) for r in fp32}
    losses: dict[str, dict[int, float | None]] = {}
    notes = [f"fp32 seed {s}: no final loss ({_why(r)})" for r in fp32 if _final(r) is None for s in [r["seed"]]]
    for r in sorted(mine, key=lambda r: int(r["seed"])):
        policy = r.get("keep_high") or ""
        losses.setdefault(policy, {})[int(r["seed"])] = _final(r)
        if _final(r) is None:
            notes.append(f"{policy} seed {r['seed']}: no final loss ({_why(r)})")
    none = losses.get(NONE, {})
    if not none:
        notes.append("no record of policy none: the gap cannot be measured")
    gap_by_seed = {s: v - ref[s] for s, v in none.items() if v is not None and ref.get(s) is not None}  # type: ignore[operator]
    gap = seed_stats(gap_by_seed.values())
    verdict = _gap_verdict(gap)
    # a share of a gap that the seeds cannot tell from 0 is any number at all: none then
    whole = gap.mean if verdict in (BEYOND, ONE) and gap.mean is not None and gap.mean > 0 else None
    rows = [_row(p, loss, none, ref, whole, p == default) for p, loss in losses.items() if p != NONE]
    rows.sort(key=lambda r: (r.recovered.mean is None, -(r.recovered.mean or 0.0)))
    none_loss = seed_stats(v for v in none.values() if v is not None)
    rows.append(Row(NONE, none_loss, seed_stats(0.0 for _ in gap_by_seed), dict.fromkeys(gap_by_seed, 0.0),
                    0.0 if whole else None, REFERENCE_ROW, "converts every Linear the mode can: the full gap",
                    default == NONE))  # fmt: skip
    top, corr, why = _stability(rows[:-1])
    first = (fp32 or mine)[0]
    sizes = {k: first.get(k) for k in ("batch_size", "seq_len", "steps", "device")}
    fp32_loss = seed_stats(v for v in ref.values() if v is not None)
    return Sensitivity(str(first.get("model")), mode, sizes, fp32_loss, gap, gap_by_seed, verdict, rows,
                       top, corr, why, notes)  # fmt: skip


def _row(policy: str, loss: dict[int, float | None], none: dict[int, float | None], ref: dict[int, float | None],
         whole: float | None, default: bool) -> Row:  # fmt: skip
    """One candidate: X per seed where it, none and fp32 all finished, judged over those seeds."""
    seeds = [s for s, v in loss.items() if v is not None and none.get(s) is not None and ref.get(s) is not None]
    by_seed = {s: none[s] - loss[s] for s in seeds}  # type: ignore[operator]
    x = seed_stats(by_seed.values())
    verdict, detail = judge(x)
    if verdict == RECOVERS:  # and does it get all the way back?
        rest = seed_stats(loss[s] - ref[s] for s in seeds)  # type: ignore[operator]
        if rest.ci_low is not None and rest.ci_high is not None and rest.ci_low <= 0 <= rest.ci_high:
            detail += "; ends at fp32's loss within the noise"
    share = x.mean / whole if x.mean is not None and whole else None  # whole: the gap, when it can be shared
    return Row(policy, seed_stats(v for v in loss.values() if v is not None), x, by_seed, share, verdict, detail,
               default)  # fmt: skip


def _why(r: dict[str, Any]) -> str:
    return f"{r.get('status')}: {str(r.get('reason') or 'no reason recorded')[:160]}"


def _gap_verdict(gap: SeedStats) -> str:
    """Whether converting everything costs loss beyond the seeds' noise (its whole interval above 0)."""
    if gap.n < 2:
        return (NO_GAP, ONE)[gap.n]
    assert gap.ci_low is not None and gap.ci_high is not None
    return BEYOND if gap.ci_low > 0 else BELOW if gap.ci_high < 0 else INSIDE


def _stability(rows: list[Row]) -> tuple[dict[int, str], float | None, str]:
    """The candidate that recovers most on each seed (tied ones joined by " = "), and the mean Spearman correlation
    of the candidates' recoveries between each pair of seeds, or None and why."""
    seeds = sorted({s for r in rows for s in r.by_seed})
    top = {}
    for s in seeds:
        best = max(r.by_seed[s] for r in rows if s in r.by_seed)
        top[s] = " = ".join(r.policy for r in rows if r.by_seed.get(s) == best)
    common = [r for r in rows if all(s in r.by_seed for s in seeds)]
    if len(seeds) < 2:
        return top, None, "one seed"
    if len(common) < 3:
        return top, None, "fewer than 3 candidates finished on every seed"
    values = [[r.by_seed[s] for r in common] for s in seeds]
    if any(len(set(v)) < 2 for v in values):
        return top, None, "on some seed every candidate recovers the same: no order to correlate"
    from scipy.stats import spearmanr  # imported when first needed: a report without a sweep never loads it

    rhos = [float(spearmanr(a, b).statistic) for i, a in enumerate(values) for b in values[i + 1 :]]
    return top, sum(rhos) / len(rhos), ""


def _seeds(seeds: Iterable[int]) -> str:
    listed = sorted(seeds)
    return f"seed{'s' if len(listed) != 1 else ''} {', '.join(map(str, listed))}"


def conclusion(s: Sensitivity) -> str:
    """The one line: "keep these blocks high: P recovers X of the Y-nat gap", or why it cannot be said."""
    g = s.gap
    if s.gap_verdict == NO_GAP:
        return "no line: no seed has both fp32 and none (every layer converted) finished, so there is no gap to rank"
    if s.gap_verdict == ONE:
        best = next((r for r in s.rows if r.recovered.mean is not None and r.policy != NONE), None)
        on = f"; on it, {best.policy} recovers most ({best.recovered.mean:+.4f})" if best else ""
        return (f"no line: one seed ({_seeds(s.gap_by_seed)}) gives no noise estimate: the gap on it is "
                f"{g.mean:+.4f} nats{on}; run two seeds or more (--seeds 0,1) to tell a recovery from chance"
                )  # fmt: skip
    if s.gap_verdict in (INSIDE, BELOW):
        return (f"no line: the gap itself is inside the seeds' noise: {s.mode} with every layer converted ends "
                f"{interval(g)} nats from fp32 over {_seeds(s.gap_by_seed)} (mean [95% interval]), so no layer "
                "has loss to recover that these seeds can tell from chance; nothing is ranked")  # fmt: skip
    winners = [r for r in s.rows if r.verdict == RECOVERS]
    if not winners:
        best = next((r for r in s.rows if r.recovered.mean is not None and r.policy != NONE), None)
        shown = ""
        if best is not None:
            shown = f"; the best by mean, {best.policy}, recovers {interval(best.recovered)} ({best.detail})"
        return (f"no line: converting every layer costs {interval(g)} nats (beyond the noise), but no candidate "
                f"recovers loss beyond the seeds' noise{shown}")  # fmt: skip
    w = winners[0]
    share = f"{w.share:.0%}, " if w.share is not None else ""
    return (f"keep these blocks high: {w.policy} recovers {w.recovered.mean:.4f} of the {g.mean:.4f}-nat gap "
            f"({share}mean over {_seeds(w.by_seed)}; recovery's 95% interval [{w.recovered.ci_low:+.4f}, "
            f"{w.recovered.ci_high:+.4f}])")  # fmt: skip


def gap_words(s: Sensitivity) -> str:
    """The gap and fp32's own spread over seeds, in a sentence."""
    if not s.gap_by_seed:
        return "Gap: not measured (no seed has both fp32 and none finished)."
    per = ", ".join(f"seed {k}: {v:+.4f}" for k, v in s.gap_by_seed.items())
    fp32 = f"; fp32's own final loss {s.fp32.mean:.4f}" + (f", sd {s.fp32.sd:.4f} over seeds" if s.fp32.sd else "")
    return f"Gap (none - fp32): {interval(s.gap)} nats, {s.gap_verdict} ({per}){fp32}."


def stability_words(s: Sensitivity) -> str:
    """Whether every seed ranks the candidates alike: the top one per seed and the rank correlation."""
    if len(s.top_by_seed) < 2:
        return "Ranking over seeds: one seed, nothing to compare."
    tops = set(s.top_by_seed.values())
    if len(tops) == 1:
        text = f"Ranking over seeds: the same top on every seed: {tops.pop()}"
    else:
        text = "Ranking over seeds: not stable: the top is " + ", ".join(
            f"{p} on seed {k}" for k, p in s.top_by_seed.items())  # fmt: skip
    if s.rank_corr is not None:
        text += f"; Spearman rank correlation of the recoveries between seeds {s.rank_corr:+.2f}"
    else:
        text += f"; no rank correlation ({s.rank_note})"
    if not any(r.verdict == RECOVERS for r in s.rows):
        text += " (no recovery is beyond the noise, so this order is chance)"
    return text + "."
