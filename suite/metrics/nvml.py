"""NVML: loading it, matching torch's device to NVML's by UUID, and GPM tensor-core utilization.

The background sampler of memory, energy, power and clocks is `suite.metrics.nvml_sampler`. Every NVML
call is guarded: one that raises `NVMLError` (e.g. `NVMLError_NotSupported` on a consumer GPU) nulls its
metric with a reason and never reaches the training loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# GPM needs its two samples more than 100 ms apart (NVML docs for nvmlGpmMetricsGet).
GPM_MIN_WINDOW_S = 0.1
_GPM_FIELDS = ("tensor_core_util", "hmma_util", "imma_util")


def load_nvml(module: Any = None) -> tuple[Any | None, str | None]:
    """Return (initialized pynvml-like module, None) or (None, one-line reason)."""
    if module is None:
        try:
            import pynvml as module
        except ImportError as exc:
            return None, f"NVML unavailable: nvidia-ml-py not installed ({exc})"
    try:
        module.nvmlInit()
    except module.NVMLError as exc:
        hint = {"NVMLError_LibraryNotFound": " (no NVIDIA driver)", "NVMLError_DriverNotLoaded": " (driver not loaded)"}
        return None, f"NVML unavailable: {exc}{hint.get(type(exc).__name__, '')}"
    return module, None


def _norm_uuid(uuid: str | bytes) -> str:
    """Lowercase, no "GPU-" prefix, no dashes: torch and NVML spell the same UUID differently."""
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    text = text.strip().lower()
    return text.removeprefix("gpu-").replace("-", "")


def find_handle(nvml: Any, uuid: str) -> Any:
    """The handle of the device whose UUID is `uuid` (by UUID: CUDA_VISIBLE_DEVICES renumbers indices)."""
    want = _norm_uuid(uuid)
    seen = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            got = _norm_uuid(nvml.nvmlDeviceGetUUID(handle))
        except nvml.NVMLError:  # a lost or forbidden GPU cannot be ours; keep looking
            continue
        if got == want:
            return handle
        seen.append(got)
    raise LookupError(f"no NVML device has UUID {uuid!r} ({len(seen)} device(s) checked)")


def uuid_of_torch_device(index: int) -> str | None:
    """The UUID torch reports for CUDA device `index`, or None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:  # no CUDA build, bad index, ROCm without a uuid: all mean "unknown"
        return None
    return str(uuid) if uuid is not None else None


@dataclass(frozen=True)
class GpmResult:
    """Tensor-core utilization over a window as fractions 0..1; `reason` says why any is None."""

    tensor_core_util: float | None
    hmma_util: float | None
    imma_util: float | None
    reason: str | None


class GpmTensorUtil:
    """Context manager: GPM tensor-core utilization between enter and exit (Hopper and later).

    `pause()`/`resume()` split the window into segments (held-out evaluation stays out); each segment
    gets its own pair of samples and the result is the duration-weighted mean. A segment of 100 ms or
    less gives no figure (NVML's rule) rather than being padded with idle time, which would dilute it.
    When no segment gives a figure the result is None with the reason, and the caller may fall back
    to the profiler's share.
    """

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml, self.handle = nvml, handle
        self._open: tuple[Any, float] | None = None  # (first sample, time) of the segment in progress
        self._segments: list[tuple[float, list[float | None]]] = []  # (seconds, [any, hmma, imma])
        self._notes: list[str] = []
        self._usable = False  # set on enter when the GPU offers GPM
        self._result = GpmResult(None, None, None, "GPM window not run")

    @property
    def supported(self) -> bool:
        """Whether this GPU offers GPM at all; asked before the window to plan the fallback."""
        try:
            return bool(self.nvml.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice)
        except Exception:  # any NVML failure here means: plan for the profiler instead
            return False

    def __enter__(self) -> GpmTensorUtil:
        try:
            if not self.nvml.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice:
                self._notes.append("GPM not supported on this GPU (needs Hopper or later)")
                return self
        except Exception as exc:  # FunctionNotFound before R520, NotSupported on MIG slices; never into training
            self._notes.append(f"GPM unavailable: {exc} ({type(exc).__name__})")
            return self
        self._usable = True
        self.resume()
        return self

    def resume(self) -> None:
        """Start a segment: allocate and take its first sample."""
        if not self._usable or self._open is not None:
            return
        sample = None
        try:
            sample = self.nvml.nvmlGpmSampleAlloc()
            self.nvml.nvmlGpmSampleGet(self.handle, sample)
            self._open = (sample, time.perf_counter())  # after the call: the sample's own time is no later
        except Exception as exc:
            self._notes.append(f"GPM sample failed: {exc} ({type(exc).__name__})")
            self._free(sample)

    def pause(self) -> None:
        """End the segment in progress: second sample, metrics, free both samples."""
        if self._open is None:
            return
        first, t0 = self._open
        self._open = None
        second = None
        try:
            elapsed = time.perf_counter() - t0  # before the call: the sample's own time is no earlier
            if elapsed <= GPM_MIN_WINDOW_S:
                self._notes.append(
                    f"GPM segment {elapsed * 1e3:.0f} ms; NVML needs more than {GPM_MIN_WINDOW_S * 1e3:.0f} ms"
                )
                return
            second = self.nvml.nvmlGpmSampleAlloc()
            self.nvml.nvmlGpmSampleGet(self.handle, second)
            self._segments.append((elapsed, self._metrics(first, second)))
        except Exception as exc:  # a reason, never an error in the training loop
            self._notes.append(f"GPM read failed: {exc} ({type(exc).__name__})")
        finally:
            self._free(first)
            self._free(second)

    def _metrics(self, first: Any, second: Any) -> list[float | None]:
        """Tensor-core utilization between two samples, as fractions (percent / 100), per metric."""
        nvml = self.nvml
        ids = [getattr(nvml, f"NVML_GPM_METRIC_{kind}_TENSOR_UTIL") for kind in ("ANY", "HMMA", "IMMA")]
        req = nvml.c_nvmlGpmMetricsGet_t()
        req.version = nvml.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(ids)
        req.sample1, req.sample2 = first, second
        for i, metric_id in enumerate(ids):
            req.metrics[i].metricId = metric_id
        out = nvml.nvmlGpmMetricsGet(req)
        values: list[float | None] = []
        for i, name in enumerate(_GPM_FIELDS):
            ret, value = out.metrics[i].nvmlReturn, out.metrics[i].value
            ok = ret == 0  # NVML_SUCCESS; each metric carries its own return code
            # kept as measured (not clamped), so the record's self-check can flag a figure outside 0..1
            values.append(value / 100 if ok else None)
            if not ok:
                self._notes.append(f"{name}: {nvml.NVMLError(ret)} (NVML return {ret})")
        return values

    def __exit__(self, *exc_info: object) -> None:
        self.pause()
        total = sum(seconds for seconds, _ in self._segments)
        means: list[float | None] = []
        for i in range(len(_GPM_FIELDS)):
            parts = [(s, v[i]) for s, v in self._segments if v[i] is not None]
            means.append(sum(s * v for s, v in parts) / sum(s for s, _ in parts) if parts else None)
        if total and means[0] is not None:
            left_out = [n for n in self._notes if n.startswith("GPM segment")]
            others = [n for n in self._notes if not n.startswith("GPM segment")]
            note = f"{len(left_out)} segment(s) of 100 ms or less left out" if left_out else None
            self._result = GpmResult(*means, "; ".join([*others, *([note] if note else [])]) or None)
        else:
            self._result = GpmResult(None, None, None, "; ".join(dict.fromkeys(self._notes)) or "no GPM segment")

    def _free(self, sample: Any) -> None:
        """Free a sample buffer, ignoring errors (nothing useful to do with them)."""
        if sample is None:
            return
        try:
            self.nvml.nvmlGpmSampleFree(sample)
        except Exception:
            pass

    def result(self) -> GpmResult:
        """The utilization measured by the last window."""
        return self._result
