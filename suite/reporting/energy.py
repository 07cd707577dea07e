"""Energy per token under the energy protocol: each mode's median over its repeats, their spread, start temperatures.

Records written by `mpbench run --energy-protocol` carry `repeat` (1..N) and `energy_protocol` (the settings);
the repeats of one case are pooled here. Records without `energy_protocol` were not measured under the protocol
and are never pooled: the procurement table says so beside their figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from suite.records.cases import CASE_KEY, case_key, machine

_REPEAT = CASE_KEY.index("repeat")
NOT_UNDER = "not measured under the energy protocol (one run: no idle wait, repeats or window rule; docs/energy.md)"


@dataclass(frozen=True)
class EnergyFigure:
    """One mode's energy per token over its repeats; `reason`: why a figure is None; `suspect`: why it is doubtful."""

    records: list[dict[str, Any]] = field(repr=False)  # the ok repeats, in running order
    j_per_token: float | None  # median over the repeats with a figure
    spread: float | None  # (max - min) / median of those
    start_temperatures_c: list[float | None]  # each repeat's, in running order
    tokens_per_s: float | None  # median over the repeats
    suspect: str | None
    reason: str | None

    @property
    def first(self) -> dict[str, Any]:
        return self.records[0]

    def describe(self) -> str:
        """'median of 3 repeats, spread 2.1%, start 34-36 C' (or why there is no figure)."""
        temps = [t for t in self.start_temperatures_c if t is not None]
        start = f"start {min(temps):g}-{max(temps):g} C" if temps else "start temperature not read"
        if self.j_per_token is None:
            return f"energy protocol, {len(self.records)} repeat(s): no figure ({self.reason}); {start}"
        spread = f"spread {self.spread:.1%}" if self.spread is not None else f"no spread ({self.reason})"
        return f"energy protocol: median of {len(self.records)} repeats, {spread}, {start}"


def group_of(record: dict[str, Any]) -> tuple:
    """A record's case without its repeat, on its machine: the repeats pooled into one figure (`figures`' key)."""
    key = case_key(record)
    return (machine(record), *key[:_REPEAT], *key[_REPEAT + 1 :])


def figure(repeats: Sequence[dict[str, Any]]) -> EnergyFigure:
    """The pooled figure of one case's repeats (ok records under the protocol)."""
    bound = (repeats[0].get("energy_protocol") or {}).get("spread_bound")
    per_token = [1 / r["tokens_per_joule"] for r in repeats if r.get("tokens_per_joule")]
    tps = [r["tokens_per_s"] for r in repeats if r.get("tokens_per_s") is not None]
    starts = [r.get("start_temperature_c") for r in repeats]
    median = statistics.median(per_token) if per_token else None
    spread = suspect = reason = None
    if median is None:
        reason = next((r.get("energy_reason") for r in repeats if r.get("energy_reason")), "no reason recorded")
    elif len(per_token) < 2:
        reason = f"{len(per_token)} repeat with a figure: a spread needs 2 or more"
    else:
        spread = (max(per_token) - min(per_token)) / median
        if bound is not None and spread > bound:
            suspect = f"energy per token spread {spread:.1%} over {len(per_token)} repeats exceeds {bound:.0%}"
    unsettled = sum(r.get("cooldown_settled") is False for r in repeats)
    if median is not None and unsettled:
        why = f"{unsettled} repeat(s) started before the GPU was back to idle"
        suspect = f"{suspect}; {why}" if suspect else why
    return EnergyFigure(list(repeats), median, spread, starts, statistics.median(tps) if tps else None, suspect,
                        reason)  # fmt: skip


def figures(records: Sequence[dict[str, Any]]) -> dict[tuple, EnergyFigure]:
    """The pooled figure of every case under the protocol (ok records only), by `group_of`, in running order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("energy_protocol") and r.get("status") == "ok":
            groups.setdefault(group_of(r), []).append(r)
    return {k: figure(v) for k, v in groups.items()}


def lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per mode measured under the protocol: what `mpbench run` prints after the table."""
    out = []
    for f in figures(records).values():
        r = f.first
        what = f"{r['mode']:<11} {r['model']} b{r['batch_size']}x{r['seq_len']} seed {r['seed']}"
        value = f"{f.j_per_token * 1e3:.4g} mJ/token" if f.j_per_token is not None else "energy n/a"
        suspect = f"; SUSPECT: {f.suspect}" if f.suspect else ""
        out.append(f"{what}: {value} ({f.describe()}){suspect}")
    return out
