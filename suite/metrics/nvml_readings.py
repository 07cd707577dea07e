"""What a window's NVML readings mean: this process's memory, energy over the active segments,
throttling, who else used the GPU, and a reason for every figure that is missing.

Kept apart from the sampler thread (`suite.metrics.nvml_sampler`) that gathers the readings.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024

# Clock-event bits: snake-case name, suffix of pynvml's nvmlClocksEventReason* name, bit (an NVML ABI value).
EVENT_BITS: tuple[tuple[str, str, int], ...] = (
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
# Scalar metrics polled per sample: field -> (pynvml function, constant passed after the handle, scale, reducer).
# nvmlDeviceGetTemperature is deprecated for ...TemperatureV in NVML 13 but still in nvidia-ml-py 13.x.
POLLED: dict[str, tuple[str, str | None, float, Callable[[list[float]], float]]] = {
    "power_w_samples_mean": ("nvmlDeviceGetPowerUsage", None, 1e-3, statistics.fmean),  # mW -> W
    "sm_clock_mhz": ("nvmlDeviceGetClockInfo", "NVML_CLOCK_SM", 1.0, statistics.median),
    "temperature_c_max": ("nvmlDeviceGetTemperature", "NVML_TEMPERATURE_GPU", 1.0, max),
}


@dataclass(frozen=True)
class NvmlWindow:
    """NVML readings over one window; `reasons` says why a field is None."""

    peak_mem_mb: float | None  # MiB used by this process (NVML counts its CUDA context too); never device-wide
    peak_mem_source: str | None  # "nvml-process"
    peak_mem_device_mb: float | None  # MiB used on the whole device (v2: driver-reserved memory excluded)
    energy_j: float | None
    duration_s: float  # seconds the energy counter covered (active segments only)
    avg_power_w: float | None
    power_w_samples_mean: float | None
    sm_clock_mhz: float | None
    temperature_c_max: float | None
    throttled: bool | None
    throttle_reasons: list[str]
    samples: int
    power_limit_w: float | None  # the enforced power limit (W)
    gpu_shared_with: list[int] | None  # other compute processes seen on the GPU; [] alone; None unknown
    stalled: bool  # an NVML call did not return within the stall timeout
    reasons: dict[str, str]


@dataclass
class Readings:
    """What the sampler thread gathered; written by that thread, read after it has stopped."""

    samples: int = 0
    proc_lists: list[list[tuple[int, float | None]]] = field(default_factory=list)  # (pid, MiB) per sample
    device_mb: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {f: [] for f in POLLED})
    event_bits: int | None = None  # OR of every sample's clocks-event bits
    segments: list[list[Any]] = field(default_factory=list)  # [t0, energy0 mJ, t1, energy1 mJ]
    power_limit_w: float | None = None
    device_v1: bool = False  # some device reading came from the v1 struct (driver-reserved included)


def proc_list(procs: list[Any]) -> list[tuple[int, float | None]]:
    """(pid, MiB) per listed compute process; MiB None where NVML reports no figure (e.g. Windows WDDM)."""
    return [(int(p.pid), None if p.usedGpuMemory is None else p.usedGpuMemory / MIB) for p in procs]


def _own_memory(lists: list[list[tuple[int, float | None]]], pid: int) -> tuple[float | None, list[int], str | None]:
    """(peak MiB of this process, other PIDs seen, reason when the peak is None).

    Inside a container's PID namespace `os.getpid()` never matches NVML's (host) PIDs; then a device
    with exactly one compute process over the whole window is ours, and otherwise we cannot tell.
    """
    pids = sorted({p for procs in lists for p, _ in procs})
    own_pid = pid if pid in pids else (pids[0] if len(pids) == 1 else None)
    if own_pid is None:
        return None, pids, (
            f"pid {pid} is not among the {len(pids)} compute process(es) NVML lists ({pids}): a container's PID "
            "namespace? this process's figure is unknown; the device-wide figure is in peak_mem_device_mb"
        )  # fmt: skip
    others = [p for p in pids if p != own_pid]
    if any(mb is None for procs in lists for p, mb in procs if p == own_pid):
        return None, others, "usedGpuMemory not reported (e.g. Windows WDDM)"
    # several entries of one PID (MPS) are summed within a sample
    used = [sum(mb for p, mb in procs if p == own_pid) for procs in lists if any(p == own_pid for p, _ in procs)]
    return max(used), others, None


def summarize(
    r: Readings, errors: dict[str, str], pid: int, bits_named: list[tuple[str, int]], stalled: bool,
    stalled_at: str | None, timeout_s: float,
) -> NvmlWindow:  # fmt: skip
    reasons: dict[str, str] = {}
    stall = f"NVML call stalled (no answer within {timeout_s:g} s{f' at {stalled_at}' if stalled_at else ''})"
    got: dict[str, float | None] = {}
    for name, (*_, reduce) in POLLED.items():
        values = r.values[name]
        got[name] = reduce(values) if values else None
        if not values:
            reasons[name] = stall if stalled else errors.get(name, "no sample returned a value")
    peak = others = None
    if r.proc_lists:
        peak, others, why = _own_memory(r.proc_lists, pid)
        if why:
            reasons["peak_mem_mb"] = why
    else:
        reasons["peak_mem_mb"] = stall if stalled else errors.get("peak_mem_mb", "no process list was read")
    device_peak = max(r.device_mb) if r.device_mb else None
    if device_peak is None:
        why = errors.get("peak_mem_device_mb", errors.get("mem_v2", "no memory reading"))
        reasons["peak_mem_device_mb"] = stall if stalled else why
    elif r.device_v1:
        why = errors.get("mem_v2", "no nvmlMemory_v2 in this pynvml")
        reasons["peak_mem_device_mb"] = f"v1 memory info (includes driver-reserved memory): {why}"
    closed = [s for s in r.segments if s[2] is not None]
    energy = avg_power = None
    duration = sum(s[2] - s[0] for s in closed)
    unusable = None  # why a readable counter gave no figure
    if closed and len(closed) == len(r.segments) and all(s[1] is not None and s[3] is not None for s in closed):
        deltas = [s[3] - s[1] for s in closed]
        if min(deltas) < 0:
            unusable = "energy counter went backwards (driver reloaded?)"
        elif sum(deltas) == 0:  # it updates every 20-100 ms: over a shorter window it may not tick at all
            unusable = f"energy counter did not advance over {duration:.3f} s (NVML updates it every 20-100 ms)"
        else:
            energy = sum(deltas) / 1000
            avg_power = energy / duration if duration > 0 else None
    if energy is None:
        reasons["energy_j"] = stall if stalled else unusable or errors.get("energy_j", "energy counter unread")
    if avg_power is None:
        reasons["avg_power_w"] = reasons.get("energy_j", "zero-length window")
    bits = r.event_bits or 0
    seen = [name for name, bit in bits_named if bits & bit]
    if unknown := bits & ~sum(bit for _, bit in bits_named):
        seen.append(f"unknown_{unknown:#x}")
    throttled = None if r.event_bits is None else any(n in THROTTLE_BITS for n in seen)
    if throttled is None:
        reasons["throttled"] = stall if stalled else errors.get("throttled", "no clocks-event reading")
    if r.power_limit_w is None:
        reasons["power_limit_w"] = stall if stalled else errors.get("power_limit_w", "not read")
    if "sampler" in errors:
        reasons["sampler"] = errors["sampler"]
    if stalled:
        reasons["sampler"] = stall
    return NvmlWindow(
        peak_mem_mb=peak,
        peak_mem_source="nvml-process" if peak is not None else None,
        peak_mem_device_mb=device_peak,
        energy_j=energy,
        duration_s=duration,
        avg_power_w=avg_power,
        **got,
        throttled=throttled,
        throttle_reasons=seen,
        samples=r.samples,
        power_limit_w=r.power_limit_w,
        gpu_shared_with=others,
        stalled=stalled,
        reasons=reasons,
    )
