"""The measured window: every tracker that watches the timed steps, entered from outside.

`MeasuredWindow` is a context manager around the timed steps of a case. It syncs the device
at both ends, samples memory (NVML on a GPU, RSS on a CPU), reads the energy counter and
GPM tensor-core activity, and turns what it saw into flat record fields, each figure that
could not be measured being None with a `*_reason`. `paused()` takes held-out evaluation out
of every figure: time, energy, GPM segments, memory samples and allocator peaks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from typing import Any

from suite.hardware import DeviceInfo, synchronize
from suite.metrics import nvml as nvml_lib
from suite.metrics.memory import AllocatorPeakTracker, RssSampler
from suite.metrics.nvml_sampler import NvmlSampler
from suite.metrics.tensor_cores import ProfilerTensorCoreResult

# Steps kept after the timed window on a GPU, run under the torch profiler for tensor-core share
# when GPM gave no figure (the profiler slows kernel launches, so never inside the window). They
# train either way.
PROFILED_STEPS = 3


@functools.cache
def nvml_device(index: int) -> tuple[Any, Any, str | None]:
    """(nvml module, handle of torch's CUDA device `index`, reason if unusable). Cached."""
    nvml, reason = nvml_lib.load_nvml()
    if nvml is None:
        return None, None, reason
    uuid = nvml_lib.uuid_of_torch_device(index)
    if uuid is None:
        return None, None, f"cannot read the UUID of cuda:{index} from torch, so NVML cannot be matched to it"
    try:
        return nvml, nvml_lib.find_handle(nvml, uuid), None
    except LookupError as exc:
        return None, None, str(exc)


class MeasuredWindow:
    """Wraps the timed steps; `fields(timed_steps, tokens_per_step)` gives the record fields."""

    def __init__(self, device: DeviceInfo, use_nvml: bool = True) -> None:
        self.device = device
        self.dev = device.torch_device
        self._stack = contextlib.ExitStack()
        self._nvml_reason: str | None = None
        self._sampler: NvmlSampler | None = None
        self._gpm: nvml_lib.GpmTensorUtil | None = None
        self._allocator: AllocatorPeakTracker | None = None
        self._rss: RssSampler | None = None
        if device.type == "cuda":
            nvml, handle, self._nvml_reason = nvml_device(device.index) if use_nvml else (None, None, "NVML off")
            if nvml is not None:
                self._sampler = NvmlSampler(nvml, handle, pid=os.getpid())
                self._gpm = nvml_lib.GpmTensorUtil(nvml, handle)
            self._allocator = AllocatorPeakTracker(self.dev)
        else:
            self._rss = RssSampler()
        self.duration_s = 0.0

    def profiler_steps(self, steps_after_warmup: int) -> int:
        """Steps to keep after the window for the profiler's tensor-core share: on a GPU, whenever
        enough steps remain (GPM can fail at run time, or the window be too short for it)."""
        return PROFILED_STEPS if self.device.type == "cuda" and steps_after_warmup > PROFILED_STEPS else 0

    def _trackers(self) -> list[Any]:
        return [t for t in (self._allocator, self._rss, self._sampler, self._gpm) if t is not None]

    def __enter__(self) -> MeasuredWindow:
        synchronize(self.dev)  # start from an idle device: warm-up work is not in the window
        for tracker in self._trackers():
            self._stack.enter_context(tracker)
        self._t0 = time.perf_counter()
        return self

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block's work out of the window (held-out evaluation between timed steps)."""
        synchronize(self.dev)  # the steps before the pause are done and counted
        self.duration_s += time.perf_counter() - self._t0
        for tracker in self._trackers():
            tracker.pause()
        try:
            yield
        finally:
            synchronize(self.dev)  # the evaluation is done before the window goes on
            for tracker in self._trackers():
                tracker.resume()
            self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        try:
            synchronize(self.dev)  # the window ends when the device has finished its work
        finally:  # a failed sync (a device error) still stops the sampler threads and frees GPM samples
            self.duration_s += time.perf_counter() - self._t0
            self._stack.close()

    def fields(self, timed_steps: int, tokens_per_step: int) -> dict[str, Any]:
        """Record fields for memory, energy, clocks and GPM tensor-core utilization."""
        if self.device.type != "cuda":
            return self._cpu_fields()
        alloc = self._allocator.result()
        out: dict[str, Any] = {
            "window_s": self.duration_s,
            "peak_mem_allocated_mb": alloc.allocated_mb,
            "peak_mem_reserved_mb": alloc.reserved_mb,
        }
        if self._sampler is None:  # the allocator figures exist; nothing from NVML does
            why = f"NVML unavailable: {self._nvml_reason}"
            return out | dict.fromkeys(
                ("peak_mem_reason", "energy_reason", "nvml_reason", "tensor_core_util_reason"), why
            )
        w = self._sampler.result()
        out |= {
            "peak_mem_mb": w.peak_mem_mb,
            "peak_mem_source": w.peak_mem_source,
            "peak_mem_device_mb": w.peak_mem_device_mb,
            "peak_mem_reason": _why(w.reasons, "peak_mem_mb", "peak_mem_device_mb", "peak_mem_source"),
            "avg_power_w": w.avg_power_w,
            "energy_reason": _why(w.reasons, "energy_j", "avg_power_w"),
            "sm_clock_mhz": w.sm_clock_mhz,
            "temperature_c_max": w.temperature_c_max,
            "throttled": w.throttled,
            "throttle_reasons": w.throttle_reasons,
            "nvml_samples": w.samples,
            "power_limit_w": w.power_limit_w,
            "gpu_shared_with": w.gpu_shared_with,
            "sampler_stalled": w.stalled,
            "nvml_reason": _why(
                w.reasons, "sm_clock_mhz", "temperature_c_max", "throttled", "power_limit_w", "sampler"
            ),
        }
        if w.energy_j and timed_steps:  # a counter that did not tick gives None, with its reason, never 0
            out["energy_j_per_step"] = w.energy_j / timed_steps
            out["tokens_per_joule"] = tokens_per_step * timed_steps / w.energy_j
        g = self._gpm.result()
        out["tensor_core_util_reason"] = g.reason  # set too when only the HMMA or IMMA figure failed
        if g.tensor_core_util is not None:
            out |= {
                "tensor_core_util": g.tensor_core_util,
                "tensor_core_util_hmma": g.hmma_util,
                "tensor_core_util_imma": g.imma_util,
                "tensor_core_util_source": "nvml-gpm",
            }
        return out

    def _cpu_fields(self) -> dict[str, Any]:
        rss = self._rss.result()
        return {
            "window_s": self.duration_s,
            "peak_mem_mb": rss.peak_mem_mb,
            "peak_mem_source": rss.source,
            "peak_mem_reason": "CPU: device and allocator peaks are GPU-only; peak_mem_mb is this process's RSS",
            "energy_reason": "CPU: no energy counter (NVML measures NVIDIA GPUs only)",
            "nvml_reason": "CPU: NVML measures NVIDIA GPUs only",
            "tensor_core_util_reason": "CPU: no tensor cores",
        }


def profiler_fields(result: ProfilerTensorCoreResult, gpm_reason: str | None = None) -> dict[str, Any]:
    """Record fields from the profiler's tensor-core share (the fallback where GPM gave none;
    `gpm_reason` says why, and stays in the reason beside the profiler's figure)."""
    gpm = f"nvml-gpm gave no figure ({gpm_reason}); " if gpm_reason else ""
    if result.share is None:
        return {"tensor_core_util_reason": gpm + result.reason, "tensor_core_util_source": None}
    return {
        "tensor_core_util": result.share,
        "tensor_core_util_source": "profiler",
        "tensor_core_util_reason": (gpm + "profiler share of kernel time instead") if gpm else None,
        "tensor_core_top_kernels": [[name, round(us, 1)] for name, us in result.top_kernels],
    }


def _why(reasons: dict[str, str], *keys: str) -> str | None:
    """The sampler's reasons for these fields, joined (fields with the same reason once); None when all were
    measured."""
    by_reason: dict[str, list[str]] = {}
    for k in keys:
        if k in reasons:
            by_reason.setdefault(reasons[k], []).append(k)
    return "; ".join(f"{', '.join(ks)}: {why}" for why, ks in by_reason.items()) or None
