"""Step timing: CUDA events per step on a GPU, perf_counter after a sync on a CPU."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


class CudaEvents:
    """Timing events on one device's stream, whatever the current device is.

    `torch.cuda.Event.record()` and `torch.cuda.synchronize()` without arguments act on the
    *current* device: with `--device cuda:1` they would time idle GPU 0 (and make a context on
    it). Everything here names the device. `cuda` is the `torch.cuda` module (a fake in tests).
    """

    def __init__(self, device: torch.device, cuda: Any = None) -> None:
        self.device = device
        self.cuda = cuda or torch.cuda

    def mark(self) -> Any:
        """A timing event recorded now on the device's current stream."""
        event = self.cuda.Event(enable_timing=True)
        event.record(self.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        self.cuda.synchronize(self.device)


class StepTimer:
    """Times each step wrapped in `measure()`; `stats()` summarizes them.

    On CUDA a pair of events brackets the step and nothing syncs until `flush()` (called at the
    loop's check points, which sync anyway) or `stats()`, so the timer adds no host sync of its
    own and holds no more than one check interval of events. On CPU the clock is read after a
    sync (a no-op).
    """

    def __init__(self, device: torch.device, cuda: Any = None) -> None:
        self.events = CudaEvents(device, cuda) if device.type == "cuda" else None
        self._pending: list[tuple[Any, Any]] = []
        self._times_ms: list[float] = []

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.events is not None:
            start = self.events.mark()
            yield
            self._pending.append((start, self.events.mark()))
        else:
            t0 = time.perf_counter()
            yield
            self._times_ms.append((time.perf_counter() - t0) * 1e3)

    def flush(self) -> None:
        """Turn recorded event pairs into times (waits for the device)."""
        if self.events is not None and self._pending:
            self.events.synchronize()
            self._times_ms.extend(s.elapsed_time(e) for s, e in self._pending)
            self._pending.clear()

    def stats(self) -> TimingStats:
        self.flush()
        return TimingStats.from_times(self._times_ms)
