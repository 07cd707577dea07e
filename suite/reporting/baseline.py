"""Committed baselines per machine, and a comparison that knows each metric's noise.

A baseline is the figures of one run per (model, mode) on one machine, stored in
`results/baselines/<machine>.json` by `mpbench baseline RECORDS`. A new run regresses on a
metric only when it is worse than the baseline by more than that metric's noise, where the
noise of step time is measured in both runs (their p10-p90 spread), not one global threshold.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suite.records.noise import step_spread
from suite.text import slug

BASELINE_DIR = Path("results/baselines")


@dataclass(frozen=True)
class Rule:
    """How much worse a (lower-is-better) metric may get before it counts as a regression."""

    floor_rel: float  # never flag less than this relative change
    floor_abs: float = 0.0  # ... or less than this absolute change (in the metric's unit)
    spread_factor: float = 0.0  # and allow this many times the runs' relative p10-p90 spread


# lower is better for every metric here; throughput is compared through step time
RULES: dict[str, Rule] = {
    "step_time_ms": Rule(floor_rel=0.02, spread_factor=1.0),
    "peak_mem_allocated_mb": Rule(floor_rel=0.01, floor_abs=16.0),  # the allocator is deterministic
    "peak_mem_mb": Rule(floor_rel=0.02, floor_abs=64.0),  # NVML / RSS: context and caching move it
    "energy_j_per_step": Rule(floor_rel=0.05, spread_factor=1.0),  # the counter ticks every 20-100 ms
    "final_loss": Rule(floor_rel=0.0, floor_abs=0.02),  # nats: run-to-run numerics at a fixed seed
}
CASE_KEYS = ("batch_size", "seq_len", "steps", "warmup", "seed", "compile")
# A metric measured in more than one way is compared only between records that measured it the same way
# (an NVML process figure is not RSS, nor a device-wide figure).
SOURCE_OF = {"peak_mem_mb": "peak_mem_source"}
# Figures that time the step: meaningless for a mode on emulated kernels, so never gated there.
TIMING_METRICS = ("step_time_ms", "energy_j_per_step")


def machine_key(record: dict[str, Any]) -> str:
    """Baselines are per machine model: the GPU name, else the CPU name."""
    name = record.get("gpu_name") or f"cpu {record.get('cpu')}"
    return slug(name)


def baseline_path(record: dict[str, Any], directory: Path = BASELINE_DIR) -> Path:
    return directory / f"{machine_key(record)}.json"


def _spread(record: dict[str, Any]) -> float:
    """Relative p10-p90 spread of the step time: the run's own noise."""
    return step_spread(record) or 0.0  # not measured: no allowance beyond the fixed one


def make_baseline(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """{"model/mode": {case, spread, metrics}} from the ok records of one machine."""
    entries: dict[str, Any] = {}
    machines = set()
    for r in records:
        if r["status"] != "ok":
            continue
        machines.add(machine_key(r))
        entries[f"{r['model']}/{r['mode']}"] = {
            "case": {k: r.get(k) for k in CASE_KEYS},
            "spread": _spread(r),
            "metrics": {m: r.get(m) for m in RULES},
            "sources": {m: r.get(src) for m, src in SOURCE_OF.items()},
            "emulated": bool(r.get("emulated")),
            "run_id": r.get("run_id"), "git_commit": r.get("git_commit"), "torch": r.get("torch"),
        }  # fmt: skip
    if not machines:
        raise ValueError("records: no record is ok; a baseline is made of ok records (rerun the failed cases)")
    if len(machines) != 1:
        raise ValueError(f"records: a baseline is for one machine; these ok records come from {sorted(machines)}")
    return {"machine": machines.pop(), "entries": entries}


@dataclass(frozen=True)
class Finding:
    metric: str
    old: float
    new: float
    allowed: float  # the largest new value that still passes
    regressed: bool

    def message(self, mode: str, model: str) -> str:
        change = self.new / self.old - 1 if self.old else float("inf")
        verdict = "REGRESSED" if self.regressed else "ok"
        return (
            f"{model}/{mode} {self.metric}: {self.old:.4g} -> {self.new:.4g} ({change:+.1%}), "
            f"allowed up to {self.allowed:.4g}: {verdict}"
        )


def compare(record: dict[str, Any], entry: dict[str, Any]) -> list[Finding]:
    """Each metric present in both, judged by its rule and both runs' measured spread."""
    if {k: record.get(k) for k in CASE_KEYS} != entry["case"]:
        raise ValueError(
            f"{record['model']}/{record['mode']}: the case differs from the baseline's "
            f"({ {k: record.get(k) for k in CASE_KEYS} } vs {entry['case']}); compare like with like"
        )
    noise = max(_spread(record), entry.get("spread", 0.0))
    emulated = bool(record.get("emulated")) or bool(entry.get("emulated"))
    findings = []
    for metric, rule in RULES.items():
        if emulated and metric in TIMING_METRICS:
            continue  # emulated kernels: the step time says nothing, so it cannot regress
        old, new = entry["metrics"].get(metric), record.get(metric)
        if old is None or new is None:
            continue
        was, now = entry.get("sources", {}).get(metric), record.get(SOURCE_OF.get(metric, ""))
        if metric in SOURCE_OF and was is not None and was != now:
            continue  # measured differently: no verdict either way
        allowed = old + max(old * (rule.floor_rel + rule.spread_factor * noise), rule.floor_abs)
        findings.append(Finding(metric, old, new, allowed, new > allowed))
    return findings


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def save(baseline: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=1) + "\n")
    return path
