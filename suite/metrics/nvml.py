"""NVML readings over a window: memory peaks, energy, power, clocks, throttling and GPM tensor-core use.

Every NVML call is guarded on its own: a call that raises `NVMLError` (e.g. `NVMLError_NotSupported` on a
consumer GPU) nulls that one metric with a reason and never reaches the training loop.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024

# Clock-event bits: snake-case name, suffix of pynvml's nvmlClocksEventReason* name, bit (an NVML ABI value).
_EVENT_BITS: tuple[tuple[str, str, int], ...] = (
    ("gpu_idle", "GpuIdle", 0x1), ("applications_clocks_setting", "ApplicationsClocksSetting", 0x2),
    ("sw_power_cap", "SwPowerCap", 0x4), ("hw_slowdown", "HwSlowdown", 0x8), ("sync_boost", "SyncBoost", 0x10),
    ("sw_thermal_slowdown", "SwThermalSlowdown", 0x20), ("hw_thermal_slowdown", "HwThermalSlowdown", 0x40),
    ("hw_power_brake_slowdown", "HwPowerBrakeSlowdown", 0x80), ("display_clock_setting", "DisplayClockSetting", 0x100),
)  # fmt: skip
# Only power or thermal limits set `throttled`. Idle, application clocks, sync boost (clocks matched to a
# group) and display clocks are policies or an idle GPU, not the GPU slowing itself under load.
THROTTLE_BITS = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
)
# Errors that will not go away on the next poll: stop calling that function, which keeps samples cheap.
_PERMANENT_ERRORS = ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_FunctionNotFound")
# GPM needs its two samples more than 100 ms apart (NVML docs for nvmlGpmMetricsGet).
GPM_MIN_WINDOW_S = 0.1
# Scalar metrics polled per sample: field -> (pynvml function, constant passed after the handle, scale, reducer).
# nvmlDeviceGetTemperature is deprecated for ...TemperatureV in NVML 13 but still in nvidia-ml-py 13.x.
_POLLED: dict[str, tuple[str, str | None, float, Callable[[list[float]], float]]] = {
    "peak_mem_device_mb": ("nvmlDeviceGetMemoryInfo", None, 1 / MIB, max),  # bytes (.used) -> MiB
    "power_w_samples_mean": ("nvmlDeviceGetPowerUsage", None, 1e-3, statistics.fmean),  # mW -> W
    "sm_clock_mhz": ("nvmlDeviceGetClockInfo", "NVML_CLOCK_SM", 1.0, statistics.median),
    "temperature_c_max": ("nvmlDeviceGetTemperature", "NVML_TEMPERATURE_GPU", 1.0, max),
}


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


def _own_mib(procs: list[Any], pid: int) -> float | None:
    """MiB used by `pid` in a process list, None if it is not listed (several entries under MPS: summed)."""
    used = [p.usedGpuMemory for p in procs if p.pid == pid]
    if None in used:  # pynvml maps NVML_VALUE_NOT_AVAILABLE to None
        raise ValueError("usedGpuMemory not reported (e.g. Windows WDDM)")
    return sum(used) / MIB if used else None


@dataclass(frozen=True)
class NvmlWindow:
    """NVML readings over one window; `reasons` says why a field is None."""

    peak_mem_mb: float | None  # MiB; NVML counts the CUDA context too, unlike torch.cuda.max_memory_allocated
    peak_mem_source: str | None  # "nvml-process" or "nvml-device"
    peak_mem_device_mb: float | None
    energy_j: float | None
    duration_s: float
    avg_power_w: float | None
    power_w_samples_mean: float | None
    sm_clock_mhz: float | None
    temperature_c_max: float | None
    throttled: bool | None
    throttle_reasons: list[str]
    samples: int
    reasons: dict[str, str]


class NvmlSampler:
    """Context manager that polls one device in a daemon thread and reads the energy counter at both ends."""

    def __init__(self, nvml: Any, handle: Any, pid: int | None = None, interval_s: float = 0.05) -> None:
        self.nvml, self.handle, self.interval_s = nvml, handle, interval_s
        self.pid = os.getpid() if pid is None else pid  # None means this process
        self._lock = threading.Lock()  # the exit sample may race a thread that outlived its join timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: dict[str, str] = {}  # metric -> first error
        self._disabled: set[str] = set()
        self._proc_mb: list[float] = []
        self._values: dict[str, list[float]] = {field: [] for field in _POLLED}
        self._event_bits: int | None = None  # OR of every sample's clocks-event bits
        self._samples = 0
        self._energy_mj: list[int | None] = [None, None]
        self._t0 = self._t1 = 0.0
        self._bits = [(name, getattr(nvml, f"nvmlClocksEventReason{suffix}", bit)) for name, suffix, bit in _EVENT_BITS]
        # look functions and constants up once, which keeps samples cheap; a missing function nulls its metric
        self._polls = [
            (field, getattr(nvml, fn, None), () if const is None else (getattr(nvml, const, None),), scale)
            for field, (fn, const, scale, _) in _POLLED.items()
        ]
        self._procs_fn = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses", None)
        self._energy_fn = getattr(nvml, "nvmlDeviceGetTotalEnergyConsumption", None)
        # pynvml before 12.535 only has the deprecated ...ThrottleReasons spelling
        self._events_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )

    def _call(self, metric: str, fn: Callable[..., Any] | None, *args: Any) -> Any:
        """fn(*args), or None with the error recorded against `metric`."""
        if metric in self._disabled:
            return None
        if fn is None:
            self._disabled.add(metric)
            self._errors.setdefault(metric, "NVML function missing from this pynvml")
            return None
        try:
            return fn(*args)
        except Exception as exc:  # NVMLError mostly; anything else is a bug that would repeat on every call
            self._errors.setdefault(metric, f"{getattr(fn, '__name__', metric)}: {exc} ({type(exc).__name__})")
            if type(exc).__name__ in _PERMANENT_ERRORS or not isinstance(exc, self.nvml.NVMLError):
                self._disabled.add(metric)
            return None

    def _sample(self) -> None:
        """Take one reading of every polled metric."""
        h = self.handle
        with self._lock:
            self._samples += 1
            procs = self._call("peak_mem_mb", self._procs_fn, h)
            own = None if procs is None else self._call("peak_mem_mb", _own_mib, procs, self.pid)
            if own is not None:
                self._proc_mb.append(own)
            for field, fn, args, scale in self._polls:
                raw = self._call(field, fn, h, *args)
                if raw is not None:
                    self._values[field].append(float(getattr(raw, "used", raw)) * scale)  # .used: memory info
            bits = self._call("throttled", self._events_fn, h)
            if bits is not None:
                self._event_bits = (self._event_bits or 0) | int(bits)

    def _safe_sample(self) -> bool:
        """_sample(), turning any unexpected error into a reason; False if it failed."""
        try:
            self._sample()
            return True
        except Exception as exc:  # a bug or an odd pynvml must not reach training
            self._errors.setdefault("sampler", f"sampling failed: {exc!r}")
            return False

    def _run(self) -> None:
        """Thread body: poll until stopped; a failed sample stops polling (it would fail every time)."""
        while not self._stop.wait(self.interval_s) and self._safe_sample():
            pass

    def _energy(self) -> int | None:
        """Energy counter in mJ since driver load, or None."""
        return self._call("energy_j", self._energy_fn, self.handle)

    def __enter__(self) -> NvmlSampler:
        self._energy_mj[0] = self._energy()
        self._t0 = time.perf_counter()
        self._safe_sample()  # a window shorter than one interval still gets a start and an end sample
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 5 * self.interval_s))  # a hung NVML call must not hang training
        self._safe_sample()
        self._energy_mj[1] = self._energy()
        self._t1 = time.perf_counter()

    def result(self) -> NvmlWindow:
        """Summarize the window (call after the `with` block)."""
        with self._lock:
            duration = (self._t1 or time.perf_counter()) - self._t0
            reasons: dict[str, str] = {}
            got: dict[str, float | None] = {}
            for field, (*_, reduce) in _POLLED.items():
                values = self._values[field]
                got[field] = reduce(values) if values else None
                if not values:
                    reasons[field] = self._errors.get(field, "no sample returned a value")
            dev_peak = got["peak_mem_device_mb"]
            if self._proc_mb:
                peak, source = max(self._proc_mb), "nvml-process"
            elif dev_peak is not None:  # PID not listed (containers show host PIDs) or per-process query failed
                peak, source = dev_peak, "nvml-device"
                why = self._errors.get("peak_mem_mb", f"pid {self.pid} not in nvmlDeviceGetComputeRunningProcesses")
                reasons["peak_mem_source"] = f"device memory used instead: {why}"
            else:
                peak, source = None, None
                reasons["peak_mem_mb"] = self._errors.get("peak_mem_mb", "no memory reading")
            energy = avg_power = None
            start, end = self._energy_mj
            if start is not None and end is not None and end >= start:
                # counter updates every 20-100 ms, so windows that short read coarse or zero
                energy = (end - start) / 1000
                avg_power = energy / duration if duration > 0 else None
            else:
                reasons["energy_j"] = self._errors.get("energy_j", "energy counter unread or went backwards")
            if avg_power is None:
                reasons["avg_power_w"] = reasons.get("energy_j", "zero-length window")
            bits = self._event_bits or 0
            seen = [name for name, bit in self._bits if bits & bit]
            if unknown := bits & ~sum(bit for _, bit in self._bits):
                seen.append(f"unknown_{unknown:#x}")
            throttled = None if self._event_bits is None else any(n in THROTTLE_BITS for n in seen)
            if throttled is None:
                reasons["throttled"] = self._errors.get("throttled", "no clocks-event reading")
            if "sampler" in self._errors:
                reasons["sampler"] = self._errors["sampler"]
            return NvmlWindow(
                peak_mem_mb=peak,
                peak_mem_source=source,
                energy_j=energy,
                duration_s=duration,
                avg_power_w=avg_power,
                **got,
                throttled=throttled,
                throttle_reasons=seen,
                samples=self._samples,
                reasons=reasons,
            )


@dataclass(frozen=True)
class GpmResult:
    """Tensor-core utilization over a window as fractions 0..1; `reason` says why any is None."""

    tensor_core_util: float | None
    hmma_util: float | None
    imma_util: float | None
    reason: str | None


class GpmTensorUtil:
    """Context manager: GPM tensor-core utilization between enter and exit (Hopper and later).

    Short-window policy: a window of 100 ms or less gives None with a reason, rather than sleeping until
    100 ms have passed, because the idle padding would dilute the utilization it reports.
    """

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml, self.handle = nvml, handle
        self._samples: list[Any] = []
        self._t0 = 0.0
        self._result = GpmResult(None, None, None, "GPM window not run")

    def _fail(self, reason: str) -> None:
        self._result = GpmResult(None, None, None, reason)

    @property
    def supported(self) -> bool:
        """Whether this GPU offers GPM at all; asked before the window to plan the fallback."""
        try:
            return bool(self.nvml.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice)
        except Exception:  # any NVML failure here means: plan for the profiler instead
            return False

    def __enter__(self) -> GpmTensorUtil:
        nvml = self.nvml
        try:
            if not nvml.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice:
                self._fail("GPM not supported on this GPU (needs Hopper or later)")
                return self
            self._samples = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
            nvml.nvmlGpmSampleGet(self.handle, self._samples[0])
            self._t0 = time.perf_counter()  # after the call: the sample's own time is no later
        except Exception as exc:  # FunctionNotFound before R520, NotSupported on MIG slices; never into training
            self._fail(f"GPM unavailable: {exc} ({type(exc).__name__})")
            self._free()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if len(self._samples) != 2:
            return
        nvml = self.nvml
        try:
            elapsed = time.perf_counter() - self._t0  # before the call: the sample's own time is no earlier
            if elapsed <= GPM_MIN_WINDOW_S:
                self._fail(f"GPM window {elapsed * 1e3:.0f} ms; NVML needs more than {GPM_MIN_WINDOW_S * 1e3:.0f} ms")
                return
            nvml.nvmlGpmSampleGet(self.handle, self._samples[1])
            ids = [getattr(nvml, f"NVML_GPM_METRIC_{kind}_TENSOR_UTIL") for kind in ("ANY", "HMMA", "IMMA")]
            req = nvml.c_nvmlGpmMetricsGet_t()
            req.version = nvml.NVML_GPM_METRICS_GET_VERSION
            req.numMetrics = len(ids)
            req.sample1, req.sample2 = self._samples
            for i, metric_id in enumerate(ids):
                req.metrics[i].metricId = metric_id
            out = nvml.nvmlGpmMetricsGet(req)
            values: list[float | None] = []
            failures = []
            for i, name in enumerate(("tensor_core_util", "hmma_util", "imma_util")):
                ret, value = out.metrics[i].nvmlReturn, out.metrics[i].value
                ok = ret == 0  # NVML_SUCCESS; each metric carries its own return code
                values.append(min(max(value / 100, 0.0), 1.0) if ok else None)  # percent -> fraction
                if not ok:
                    failures.append(f"{name}: {nvml.NVMLError(ret)} (NVML return {ret})")
            self._result = GpmResult(*values, "; ".join(failures) or None)
        except Exception as exc:  # as on enter: a reason, never an error in the training loop
            self._fail(f"GPM read failed: {exc} ({type(exc).__name__})")
        finally:
            self._free()

    def _free(self) -> None:
        """Free the sample buffers, ignoring errors (nothing useful to do with them)."""
        for sample in self._samples:
            try:
                self.nvml.nvmlGpmSampleFree(sample)
            except Exception:
                pass
        self._samples = []

    def result(self) -> GpmResult:
        """The utilization measured by the last window."""
        return self._result
