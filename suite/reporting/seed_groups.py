"""Records of one case over several seeds, judged with `seeds.judge`: shared by the report, compare and benchmarks.

A seed set is every record whose case settings (suite/records/cases.CASE_KEY) are alike but for
`mode` and `seed`; the latest record per case key wins, across runs too, as `seeds.judge` reads them.
Each set is judged on its own, so a verdict always belongs to one set (ModeVerdict names only the model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from suite.records.cases import alike, case_key, latest_per_case, machine
from suite.reporting import seeds
from suite.reporting.convergence import TOLERANCES, Tolerances

MANY_SEEDS = 1000  # seeds.judge caps seeds_needed here: "over 1000"
DELTA_EXAMPLE = 0.005  # nats: the size of precision effect the noise floor is stated against (issue 23)


@dataclass(frozen=True)
class SeedSet:
    """One case judged over its seeds: the records (latest per case), one verdict per mode, the noise floor."""

    records: list[dict[str, Any]]
    verdicts: list[seeds.ModeVerdict]
    floor: seeds.NoiseFloor | None

    @property
    def seeds(self) -> list[int]:
        return sorted({int(r["seed"]) for r in self.records if r.get("seed") is not None})


def alike_key(r: dict[str, Any]) -> tuple:
    """Every case setting but mode and seed, and the machine: the records judged together."""
    return (*alike(case_key(r)), machine(r))


def seed_groups(records: Iterable[dict[str, Any]], min_seeds: int = 2) -> dict[tuple, list[dict[str, Any]]]:
    """alike_key -> that case's records (the latest per case key), for cases with a mode run on `min_seeds`
    seeds or more."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in latest_per_case(records):
        out.setdefault(alike_key(r), []).append(r)

    def seeds_of(group: list[dict[str, Any]], mode: Any) -> int:
        return len({r.get("seed") for r in group if r.get("mode") == mode})

    # some mode on `min_seeds` seeds: fp32 on seed 1 beside bf16 on seed 0 is two single-seed runs, not a set
    return {k: g for k, g in out.items() if max(seeds_of(g, r.get("mode")) for r in g) >= min_seeds}


def judged(records: Iterable[dict[str, Any]], tolerances: Tolerances | None = None) -> list[SeedSet]:
    """Each multi-seed case of `records` with its verdicts (seeds.judge) and noise floor (seeds.noise_floors)."""
    out = []
    for group in seed_groups(records).values():
        floors = seeds.noise_floors(group)
        verdicts = seeds.judge(group, TOLERANCES if tolerances is None else tolerances)
        out.append(SeedSet(group, verdicts, floors[0] if floors else None))
    return out


def interval(s: seeds.SeedStats, fmt: str = "+.4f") -> str:
    """'+0.0031 [-0.0010, +0.0072]' (mean and 95% interval), '+0.0031 (1 seed)', or '' with no value."""
    if s.mean is None:
        return ""
    if s.ci_low is None or s.ci_high is None:
        return f"{s.mean:{fmt}} ({s.n} seed{'s' if s.n != 1 else ''})"
    return f"{s.mean:{fmt}} [{s.ci_low:{fmt}}, {s.ci_high:{fmt}}]"


def spread(s: seeds.SeedStats, fmt: str = ".0f") -> str:
    """'142 +- 9 (130-151)': mean, sd and the range over seeds; '' with no value."""
    if s.mean is None:
        return ""
    if s.sd is None or not s.values:
        return f"{s.mean:{fmt}} ({s.n} seed{'s' if s.n != 1 else ''})"
    return f"{s.mean:{fmt}} +- {s.sd:{fmt}} ({min(s.values):{fmt}}-{max(s.values):{fmt}})"


def verdict_text(v: seeds.ModeVerdict) -> str:
    """The verdict in words: pass, FAIL, inconclusive with the seeds that would settle it, lags (expected),
    a better-than-fp32 flag, and "single seed" where one seed is all there is."""
    text = v.outcome
    if v.outcome == "inconclusive":
        need = v.seeds_needed
        if need is None:
            text += " (no number of seeds settles it: the deltas do not vary, or their mean sits on the tolerance)"
        elif need >= MANY_SEEDS:
            text += f" (seeds needed at this spread: over {MANY_SEEDS})"
        else:
            text += f" (about {need} seeds would settle it at this spread)"
    if v.better:
        text += "; better than fp32 beyond noise: flagged for a look"
    if v.single_seed and v.outcome != "reference":
        text += " (single seed)"
    return text


def noise_words(floor: seeds.NoiseFloor | None, example: float = DELTA_EXAMPLE) -> str:
    """The noise floor in a sentence: fp32's own spread over seeds and the paired deltas', and what a
    delta of `example` nats amounts to against it."""
    if floor is None:
        return "Noise floor: not measured (fp32 has a final loss on fewer than 2 seeds of this case)."
    fp32 = floor.fp32_final
    parts = [f"Noise floor over {len(floor.seeds)} seeds ({', '.join(map(str, floor.seeds))}):"]
    if fp32.sd is not None:
        parts.append(f"fp32's own final held-out loss has sd {fp32.sd:.4f} nats (mean {fp32.mean:.4f});")
    else:
        parts.append("fp32's final loss has no spread to measure;")
    if floor.delta_sd:
        parts.append(f"the paired deltas vs fp32 have sd {floor.delta_sd:.4f} nats (median over modes).")
        parts.append(f"A delta of {example:g} nats is {example / floor.delta_sd:.1f} sd of seed noise here.")
    elif floor.delta_sd == 0:
        parts.append("the paired deltas vs fp32 do not vary over seeds (sd 0): any delta is beyond seed noise.")
    else:
        parts.append("the paired deltas' sd is not measured (no mode has a delta on 2 seeds or more).")
    return " ".join(parts)
