"""Memory peaks that need no NVML: the torch allocator on CUDA, resident set size on CPU."""

from __future__ import annotations

import os
import resource
import threading
from dataclasses import dataclass

import torch

MIB = 1024 * 1024


def _rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class RssPeak:
    peak_mem_mb: float | None
    source: str  # "rss" (sampled in the window) or "rss-lifetime" (ru_maxrss: whole process)


class RssSampler:
    """Peak resident memory over a window, polled by a background thread.

    `ru_maxrss` would cover the whole process life (every earlier case included), so the
    window is sampled from /proc instead; where /proc is missing it falls back to
    ru_maxrss and says so in `source`.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self._peak = 0
        self._stop = threading.Event()
        self._active = threading.Event()  # cleared while the window is paused
        self._thread = threading.Thread(target=self._poll, daemon=True, name="mpbench-rss")
        self._supported = _rss_bytes() is not None

    def _sample(self) -> None:
        now = _rss_bytes()
        if now is not None:
            self._peak = max(self._peak, now)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._active.is_set():
                self._sample()

    def pause(self) -> None:
        """Stop counting (held-out evaluation): a last sample now, none until `resume`."""
        self._sample()
        self._active.clear()

    def resume(self) -> None:
        self._active.set()
        self._sample()

    def __enter__(self) -> RssSampler:
        self._active.set()
        self._sample()
        if self._supported:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        self._sample()

    def result(self) -> RssPeak:
        if self._supported:
            return RssPeak(self._peak / MIB, "rss")
        # Linux reports ru_maxrss in KiB, macOS in bytes
        scale = 1 if os.uname().sysname == "Darwin" else 1024
        return RssPeak(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB, "rss-lifetime")


@dataclass(frozen=True)
class AllocatorPeak:
    allocated_mb: float
    reserved_mb: float


class AllocatorPeakTracker:
    """torch's CUDA caching-allocator peaks over a window (tensors, and what it holds).

    A pause (held-out evaluation) keeps the peaks so far and resets torch's counters on resume, so the
    evaluation's own tensors are not counted; blocks the allocator cached during it stay reserved, and
    are counted, since the process really holds them while it trains.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._kept = (0, 0)  # (allocated, reserved) bytes: peaks of the segments before a pause

    def _peaks(self) -> tuple[int, int]:
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)

    def __enter__(self) -> AllocatorPeakTracker:
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def pause(self) -> None:
        self._kept = tuple(map(max, self._kept, self._peaks()))

    def resume(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def __exit__(self, *exc: object) -> None:
        self.pause()

    def result(self) -> AllocatorPeak:
        allocated, reserved = self._kept
        return AllocatorPeak(allocated / MIB, reserved / MIB)
