"""A fake pynvml module for tests: scripted per-call readings, real constant names and values, no driver."""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml  # only for its ctypes GPM structs, so field-name typos in the code under test fail here too

MIB = 1024 * 1024


class NVMLError(Exception):
    """Base of every fake NVML error; `value` is the nvmlReturn_t code as in pynvml."""

    value = 999  # NVML_ERROR_UNKNOWN
    _TEXT = {1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported", 4: "Insufficient Permissions"}
    _TEXT |= {12: "NVML Shared Library Not Found", 13: "Function Not Found", 15: "GPU is lost", 999: "Unknown Error"}

    def __init__(self, value: int | None = None) -> None:
        if value is not None:
            self.value = value
        super().__init__(self.value)

    def __str__(self) -> str:
        return self._TEXT.get(self.value, f"NVML Error with code {self.value}")


class NVMLError_Uninitialized(NVMLError):  # noqa: N801 - pynvml's spelling
    value = 1


class NVMLError_InvalidArgument(NVMLError):  # noqa: N801
    value = 2


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    value = 3


class NVMLError_NoPermission(NVMLError):  # noqa: N801
    value = 4


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801
    value = 12


class NVMLError_FunctionNotFound(NVMLError):  # noqa: N801
    value = 13


class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
    value = 15


class Script:
    """Returns the next scripted value on each call and repeats the last one; an exception value is raised."""

    def __init__(self, values: list[Any]) -> None:
        if not values:
            raise ValueError("a script needs at least one value")
        self.values, self.calls = list(values), 0

    def next(self) -> Any:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        if isinstance(value, BaseException) or (isinstance(value, type) and issubclass(value, BaseException)):
            raise value
        return value


@dataclass
class FakeDevice:
    """One GPU: each list is a per-call script (clamped at its last value)."""

    uuid: str
    processes: list[list[tuple[int, int | None]]] = field(default_factory=lambda: [[]])  # (pid, used bytes)
    mem_used: list[Any] = field(default_factory=lambda: [1024 * MIB])  # bytes, as v1 reports it (reserved included)
    mem_total: int = 80 * 1024 * MIB
    mem_reserved: int = 0  # driver-reserved bytes: in v1's `used`, separate in v2
    power_limit_mw: int = 700_000
    power_mw: list[Any] = field(default_factory=lambda: [300_000])
    energy_mj: list[Any] = field(default_factory=lambda: [0])
    sm_clock_mhz: list[Any] = field(default_factory=lambda: [1980])
    temperature_c: list[Any] = field(default_factory=lambda: [50])
    event_reasons: list[Any] = field(default_factory=lambda: [0])
    unsupported: set[str] = field(default_factory=set)  # function names that raise NVMLError_NotSupported
    old_driver: bool = False  # before R535 / R510: no ...ClocksEventReasons, no nvmlDeviceGetMemoryInfo_v2
    stalls: dict[str, int] = field(default_factory=dict)  # function name -> call number from which it hangs
    stall_s: float = 30.0
    gpm_supported: bool = False
    gpm_metrics: dict[int, float] = field(default_factory=dict)  # metric id -> percent
    gpm_returns: dict[int, int] = field(default_factory=dict)  # metric id -> per-metric nvmlReturn
    # script name -> a reading that changes over time (e.g. `settling` on a FakeClock): replaces that script
    curves: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = ("processes", "mem_used", "power_mw", "energy_mj", "sm_clock_mhz", "temperature_c", "event_reasons")
        self.scripts = {name: Script(getattr(self, name)) for name in names}


@dataclass(frozen=True)
class FakeHandle:
    """An opaque device handle."""

    index: int


class FakeNvml:
    """Stands in for the pynvml module: pass an instance wherever the code takes `nvml`."""

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost

    NVML_SUCCESS = 0
    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    NVML_GPM_METRIC_DFMA_TENSOR_UTIL = 6
    NVML_GPM_METRIC_HMMA_TENSOR_UTIL = 7
    NVML_GPM_METRIC_IMMA_TENSOR_UTIL = 9
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_GPM_SUPPORT_VERSION = 1
    nvmlClocksEventReasonGpuIdle = 0x1
    nvmlClocksEventReasonApplicationsClocksSetting = 0x2
    nvmlClocksEventReasonSwPowerCap = 0x4
    nvmlClocksEventReasonHwSlowdown = 0x8
    nvmlClocksEventReasonSyncBoost = 0x10
    nvmlClocksEventReasonSwThermalSlowdown = 0x20
    nvmlClocksEventReasonHwThermalSlowdown = 0x40
    nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80
    nvmlClocksEventReasonDisplayClockSetting = 0x100
    nvmlClocksEventReasonNone = 0x0
    nvmlMemory_v2 = pynvml.nvmlMemory_v2
    c_nvmlGpmMetricsGet_t = pynvml.c_nvmlGpmMetricsGet_t
    c_nvmlGpmSample_t = pynvml.c_nvmlGpmSample_t

    def __init__(
        self, devices: list[FakeDevice], *, library_missing: bool = False, uuid_as_bytes: bool = False
    ) -> None:
        self.devices = devices
        self.library_missing = library_missing
        self.uuid_as_bytes = uuid_as_bytes  # old pynvml returned bytes
        self.initialized = False
        self.driver_version, self.cuda_driver_version = "570.86.15", 12080
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.gpm_allocated: set[int] = set()  # fake sample addresses not yet freed
        self.gpm_got: dict[int, int] = {}  # sample address -> device index it was read from
        self._next_sample = 0x1000

    def _device(self, name: str, handle: FakeHandle) -> FakeDevice:
        """Count the call, check init and handle, raise if `name` is unsupported, hang if it stalls."""
        with self._lock:
            self.calls[name] += 1
            calls = self.calls[name]
        if not self.initialized:
            raise NVMLError_Uninitialized()
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.devices):
            raise NVMLError_InvalidArgument()
        device = self.devices[handle.index]
        if name in device.unsupported:
            raise NVMLError_NotSupported()
        if name in device.stalls and calls >= device.stalls[name]:
            time.sleep(device.stall_s)  # a driver call that does not return (GPU reset, Xid)
        return device

    def _next(self, name: str, handle: FakeHandle, script: str) -> Any:
        """The next scripted value of `script` for the device behind `handle`."""
        device = self._device(name, handle)
        if script in device.curves:
            return device.curves[script]()
        with self._lock:
            return device.scripts[script].next()

    def nvmlInit(self) -> None:
        if self.library_missing:
            raise NVMLError_LibraryNotFound()
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:  # pynvml decodes the C string (convertStrBytes)
        if not self.initialized:
            raise NVMLError_Uninitialized()
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:  # e.g. 12080 for CUDA 12.8
        if not self.initialized:
            raise NVMLError_Uninitialized()
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        if not self.initialized:
            raise NVMLError_Uninitialized()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        handle = FakeHandle(index)
        self._device("nvmlDeviceGetHandleByIndex", handle)
        return handle

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str | bytes:
        uuid = self._device("nvmlDeviceGetUUID", handle).uuid
        return uuid.encode() if self.uuid_as_bytes else uuid

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        procs = self._next("nvmlDeviceGetComputeRunningProcesses", handle, "processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in procs]

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> SimpleNamespace:
        device = self._device("nvmlDeviceGetMemoryInfo", handle)
        if version is not None and (device.old_driver or version != pynvml.nvmlMemory_v2):
            raise NVMLError_FunctionNotFound() if device.old_driver else NVMLError_InvalidArgument()
        with self._lock:
            used = device.scripts["mem_used"].next()
        if version is None:  # v1: `used` includes driver-reserved memory
            return SimpleNamespace(total=device.mem_total, used=used, free=device.mem_total - used)
        return SimpleNamespace(
            version=version, total=device.mem_total, reserved=device.mem_reserved,
            used=used - device.mem_reserved, free=device.mem_total - used,
        )  # fmt: skip

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._device("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._next("nvmlDeviceGetPowerUsage", handle, "power_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._next("nvmlDeviceGetTotalEnergyConsumption", handle, "energy_mj")

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        if clock_type != self.NVML_CLOCK_SM:  # the fake only scripts the SM clock
            raise NVMLError_InvalidArgument()
        return self._next("nvmlDeviceGetClockInfo", handle, "sm_clock_mhz")

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        if sensor != self.NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return self._next("nvmlDeviceGetTemperature", handle, "temperature_c")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        device = self._device("nvmlDeviceGetCurrentClocksEventReasons", handle)  # counted once per call
        if device.old_driver:
            raise NVMLError_FunctionNotFound()  # pynvml has the name; the driver's library does not
        with self._lock:
            return device.scripts["event_reasons"].next()

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._next("nvmlDeviceGetCurrentClocksThrottleReasons", handle, "event_reasons")

    def nvmlGpmQueryDeviceSupport(self, handle: FakeHandle) -> SimpleNamespace:
        device = self._device("nvmlGpmQueryDeviceSupport", handle)
        return SimpleNamespace(version=self.NVML_GPM_SUPPORT_VERSION, isSupportedDevice=int(device.gpm_supported))

    def nvmlGpmSampleAlloc(self) -> Any:
        with self._lock:
            self.calls["nvmlGpmSampleAlloc"] += 1
            address, self._next_sample = self._next_sample, self._next_sample + 0x10
            self.gpm_allocated.add(address)
        # a real pointer type holding a made-up address: assignable to the real struct, never dereferenced
        return ctypes.cast(ctypes.c_void_p(address), pynvml.c_nvmlGpmSample_t)

    def nvmlGpmSampleGet(self, handle: FakeHandle, sample: Any) -> Any:
        device = self._device("nvmlGpmSampleGet", handle)
        if not device.gpm_supported:
            raise NVMLError_NotSupported()
        address = _address(sample)
        if address not in self.gpm_allocated:
            raise NVMLError_InvalidArgument()
        self.gpm_got[address] = handle.index
        return sample

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        self.calls["nvmlGpmSampleFree"] += 1
        address = _address(sample)
        if address not in self.gpm_allocated:
            raise NVMLError_InvalidArgument()
        self.gpm_allocated.discard(address)

    def nvmlGpmMetricsGet(self, request: Any) -> Any:
        self.calls["nvmlGpmMetricsGet"] += 1
        if vars(request):  # ctypes keeps a misspelled field as a plain attribute; NVML would never see it
            raise TypeError(f"unknown fields set on c_nvmlGpmMetricsGet_t: {sorted(vars(request))}")
        one, two = _address(request.sample1), _address(request.sample2)
        if request.version != self.NVML_GPM_METRICS_GET_VERSION or one == two or {one, two} - set(self.gpm_got):
            raise NVMLError_InvalidArgument()
        device = self.devices[self.gpm_got[one]]
        for i in range(request.numMetrics):
            metric = request.metrics[i]
            metric.nvmlReturn = device.gpm_returns.get(metric.metricId, self.NVML_SUCCESS)
            metric.value = device.gpm_metrics.get(metric.metricId, 0.0)
        return request


def _address(sample: Any) -> int:
    """The made-up address a fake GPM sample pointer holds."""
    return ctypes.cast(sample, ctypes.c_void_p).value or 0


def make_fake(n_devices: int = 3, **overrides: Any) -> tuple[FakeNvml, list[FakeDevice]]:
    """An initialized fake with `n_devices` GPUs; `overrides` configure the last device."""
    devices = [FakeDevice(uuid=f"GPU-{i:08x}-1111-2222-3333-44444444444{i}") for i in range(n_devices)]
    devices[-1] = FakeDevice(uuid=devices[-1].uuid, **overrides)
    fake = FakeNvml(devices)
    fake.nvmlInit()
    return fake, devices


class FakeClock:
    """A monotonic clock that moves only when slept on: waits measured without waiting."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now, self.slept = now, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def settling(clock: Callable[[], float], start: float, idle: float, tau_s: float) -> Callable[[], int]:
    """A reading that decays from `start` towards `idle` with time constant `tau_s` from the clock's first
    call (Newton's cooling), as the integer NVML returns (C, or mW). tau_s inf: it never moves."""
    t0: list[float] = []

    def reading() -> int:
        t = clock()
        t0[:] = t0 or [t]
        return round(idle + (start - idle) * math.exp(-(t - t0[0]) / tau_s))

    return reading
