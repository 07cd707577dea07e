"""Convergence over seeds: paired deltas vs fp32, their Student t interval, and a three-way verdict.

Each seed's fp32 case is that seed's reference (same initial weights, same batches), so a mode's
delta on seed s is paired: `final_loss(mode, s) - final_loss(fp32, s)`. Over n seeds the verdict
against the mode's tolerance is `pass` when the whole 95% interval of the mean delta lies at or below
the tolerance, `FAIL` when it lies above, and `inconclusive` otherwise, with the number of seeds
that would settle it at the measured spread. One seed is judged as before (the delta against the
tolerance) and marked single-seed.

API (filled in by issue 23's work; the report, summary, check and benchmarks read these objects):
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from suite.reporting.convergence import Tolerance

CONFIDENCE = 0.95  # two-sided level of every interval here


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


def judge(records: Iterable[dict[str, Any]], tolerances: dict[str, Tolerance]) -> list[ModeVerdict]:
    """One verdict per (group, mode), fp32 first in each group."""
    raise NotImplementedError


def noise_floors(records: Iterable[dict[str, Any]]) -> list[NoiseFloor]:
    """One noise floor per group of cases that has fp32 on two seeds or more."""
    raise NotImplementedError
