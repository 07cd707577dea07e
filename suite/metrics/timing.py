"""Step timing: CUDA events per step on a GPU, perf_counter after a sync on a CPU."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingStats:
    """Summary of measured step times, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float  # coefficient of variation: stdev / mean (0 for a single step)
    times_ms: list[float]

    @classmethod
    def from_times(cls, times_ms: list[float]) -> TimingStats:
        if not times_ms:
            raise ValueError("no measured steps: steps must exceed warmup")
        ordered = sorted(times_ms)
        mean = statistics.fmean(ordered)
        cv = statistics.stdev(ordered) / mean if len(ordered) > 1 and mean > 0 else 0.0
        return cls(
            median_ms=statistics.median(ordered),
            p10_ms=_percentile(ordered, 10),
            p90_ms=_percentile(ordered, 90),
            cv=cv,
            times_ms=list(times_ms),
        )


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class StepTimer:
    """Times each step wrapped in `measure()`; `stats()` summarizes them.

    On CUDA a pair of events brackets the step and nothing syncs until `stats()`, so the
    timer adds no host sync of its own. On CPU the clock is read after a sync (a no-op).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._times_ms: list[float] = []

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._times_ms.append((time.perf_counter() - t0) * 1e3)

    def stats(self) -> TimingStats:
        if self.cuda:
            torch.cuda.synchronize()
            self._times_ms.extend(s.elapsed_time(e) for s, e in self._events)
            self._events.clear()
        return TimingStats.from_times(self._times_ms)
