"""Short GPU probes for `mpbench doctor`, through one thin CUDA boundary that tests replace.

`TorchCuda` is every torch.cuda call the doctor makes, all on one device (events on that
device's current stream, `synchronize(device)`), so `--device cuda:1` never times or wakes
GPU 0. The probe functions below take it and a pynvml-like module (`suite.metrics.nvml`'s
`load_nvml` / `find_handle`), measure, and return small dataclasses of raw figures; the
doctor judges them. A fake of `TorchCuda` (tests/fake_cuda.py) drives the fake NVML's
energy counter, memory and GPM readings as a real GPU drives the real ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from suite.hardware import empty_cache
from suite.metrics.nvml import GpmResult, GpmTensorUtil
from suite.metrics.tensor_cores import ProfilerTensorCoreResult, ProfilerTensorCores
from suite.metrics.timing import CudaEvents
from suite.modes.base import tf32_matmuls

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MATMUL_N = 8192  # (8192 x 8192) @ (8192 x 8192): 1.1 TFLOP, about 1.5 ms in bf16 on an H100
MIB = 2**20


@dataclass(frozen=True)
class LoopTiming:
    """One loop of `iters` (n x n) matmuls: CUDA-event time and the host's wall time around it."""

    dtype: str
    n: int
    iters: int
    event_ms: float  # events recorded on the device's stream before the first and after the last matmul
    wall_ms: float  # perf_counter from before the first launch to after synchronize(device)

    @property
    def flops_per_s(self) -> float:
        return 2 * self.n**3 * self.iters / (self.event_ms / 1e3) if self.event_ms > 0 else math.inf


class TorchCuda:
    """The real boundary: torch's view of CUDA device `index`."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._held: torch.Tensor | None = None  # the block `allocate` holds

    def unavailable(self) -> str | None:
        """Why there is no usable CUDA device `index`; None when there is."""
        if not torch.cuda.is_available():
            return f"no CUDA GPU (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
        if self.index >= torch.cuda.device_count():
            return f"cuda:{self.index} does not exist ({torch.cuda.device_count()} GPU(s) visible)"
        return None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def name(self) -> str:
        return torch.cuda.get_device_name(self.index)

    def uuid(self) -> str | None:
        """torch's UUID of the device (None where torch does not report one)."""
        uuid = getattr(torch.cuda.get_device_properties(self.index), "uuid", None)
        return None if uuid is None else str(uuid)

    def memory_mb(self) -> float:
        return torch.cuda.get_device_properties(self.index).total_memory / MIB

    def matmul_loop(self, dtype: str, n: int, iters: int, during: Callable[[], None] | None = None) -> LoopTiming:
        """Time `iters` (n x n) matmuls in `dtype` (fp32 strict: TF32 off); `during()` runs after
        the launches, while the GPU still works through them, and before the sync."""
        dev = self.device
        with torch.cuda.device(dev), tf32_matmuls(False):
            a = torch.randn(n, n, device=dev).to(DTYPES[dtype])
            b = torch.randn(n, n, device=dev).to(DTYPES[dtype])
            c = torch.empty_like(a)
            for _ in range(2):  # warm-up: cuBLAS picks its kernel, clocks rise
                torch.matmul(a, b, out=c)
            events = CudaEvents(dev, torch.cuda)  # on this device's stream, as the step timer's are
            events.synchronize()
            t0 = time.perf_counter()
            start = events.mark()
            for _ in range(iters):
                torch.matmul(a, b, out=c)  # out=: no allocation inside the loop
            end = events.mark()
            if during is not None:
                during()
            events.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3
            return LoopTiming(dtype, n, iters, start.elapsed_time(end), wall_ms)

    def profiler_share(self, dtype: str, n: int, iters: int) -> ProfilerTensorCoreResult:
        """The torch profiler's tensor-core share of kernel time for a matmul loop."""
        with ProfilerTensorCores() as prof:
            self.matmul_loop(dtype, n, iters)
        return prof.result()

    def empty_cache(self) -> None:
        """Hand the allocator's cached (reserved, unused) blocks back to the driver, once the device is idle."""
        torch.cuda.synchronize(self.device)
        empty_cache(self.device)  # with this device current: no context is made on GPU 0

    def allocate(self, mib: int) -> float:
        """Hold `mib` MiB on the device until `release()`; the growth of the allocator's reserved MiB."""
        self.empty_cache()  # no cached block may serve the request: the driver must map new memory
        before = torch.cuda.memory_reserved(self.device)
        self._held = torch.ones(mib * MIB, dtype=torch.uint8, device=self.device)  # written: the pages are real
        torch.cuda.synchronize(self.device)
        return (torch.cuda.memory_reserved(self.device) - before) / MIB

    def release(self) -> None:
        """Drop what `allocate` holds and give the cached blocks back to the driver."""
        self._held = None
        self.empty_cache()


def iters_for(cuda: Any, dtype: str, seconds: float, n: int = MATMUL_N) -> int:
    """How many (n x n) matmuls take about `seconds` of GPU time (from a 3-matmul trial)."""
    trial = cuda.matmul_loop(dtype, n, 3)
    per_iter_ms = max(trial.event_ms / 3, 1e-3)
    return min(max(3, math.ceil(seconds * 1e3 / per_iter_ms)), 100_000)


def loop_for(cuda: Any, dtype: str, seconds: float, n: int = MATMUL_N) -> LoopTiming:
    """A matmul loop sized to take about `seconds` of GPU time."""
    return cuda.matmul_loop(dtype, n, iters_for(cuda, dtype, seconds, n))


@dataclass(frozen=True)
class EnergyProbe:
    """The energy counter across a busy loop, and what NVML said while it ran."""

    energy_j: float | None
    wall_s: float
    power_limit_w: float | None
    event_bits: int | None  # clocks-event reasons read while the loop ran
    errors: dict[str, str]


def _try(errors: dict[str, str], key: str, fn: Callable[[], Any]) -> Any:
    """fn(), or None with the error text (pynvml's exception name included) under `key`."""
    try:
        return fn()
    except Exception as exc:  # NVMLError mostly; the doctor reports it, never raises it
        errors[key] = f"{exc} ({type(exc).__name__})"
        return None


def energy_probe(cuda: Any, nvml: Any, handle: Any, seconds: float) -> EnergyProbe:
    """Read the total-energy counter (mJ) before and after a bf16 loop; clocks reasons during it."""
    errors: dict[str, str] = {}
    bits: list[int] = []

    def during() -> None:
        # the name since driver R535, then the deprecated one (same bits): pynvml has both names, but an
        # older driver's library lacks the new function and raises FunctionNotFound
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(nvml, name, None)
            if fn is None:
                continue
            got = _try(errors, "clocks", lambda fn=fn: fn(handle))
            if got is not None:
                bits.append(int(got))
                errors.pop("clocks", None)
                return
            if "FunctionNotFound" not in errors["clocks"]:
                return

    iters = iters_for(cuda, "bf16", seconds)  # the trial stays out of the energy reading
    # the reading spans the loop's 2 warm-up matmuls too (wall_ms does not): +2/iters of energy, under 0.2% at 2 s
    start = _try(errors, "energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    timing = cuda.matmul_loop("bf16", MATMUL_N, iters, during)
    end = _try(errors, "energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    limit_mw = _try(errors, "power_limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    energy = (end - start) / 1e3 if start is not None and end is not None else None
    if not bits:
        errors.setdefault("clocks", "no clocks-event function in this pynvml")
    return EnergyProbe(energy, timing.wall_ms / 1e3, None if limit_mw is None else limit_mw / 1e3,
                       bits[0] if bits else None, errors)  # fmt: skip


def gpm_probe(cuda: Any, nvml: Any, handle: Any, seconds: float) -> dict[str, GpmResult]:
    """GPM tensor-core utilization over a bf16 loop and over a strict-fp32 loop."""
    out = {}
    for dtype in ("bf16", "fp32"):
        with GpmTensorUtil(nvml, handle) as gpm:
            loop_for(cuda, dtype, seconds)
        out[dtype] = gpm.result()
    return out


def own_process_mib(nvml: Any, handle: Any, pid: int) -> tuple[float | None, list[tuple[int, float | None]], str]:
    """(our MiB on the device or None, the other processes as (pid, MiB), how ours was found).

    Inside a container's PID namespace our PID is not NVML's: if exactly one process is
    listed and it is not us by PID, it is still us (we hold a CUDA context by now).
    """
    procs = [(p.pid, None if p.usedGpuMemory is None else p.usedGpuMemory / MIB)
             for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)]  # fmt: skip
    ours = [mib for p, mib in procs if p == pid]
    if ours:
        return (None if None in ours else sum(ours)), [p for p in procs if p[0] != pid], f"pid {pid}"
    if len(procs) == 1:
        return procs[0][1], [], f"the only process listed (pid {procs[0][0]}; ours is {pid} in this PID namespace)"
    return None, procs, f"pid {pid} not listed among {len(procs)} process(es)"


@dataclass(frozen=True)
class MemoryProbe:
    """NVML's figure for this process before and after an allocation, and the allocator's growth."""

    before_mb: float | None
    after_mb: float | None
    reserved_growth_mb: float
    how: str


def memory_probe(cuda: Any, nvml: Any, handle: Any, pid: int, mib: int = 1024) -> MemoryProbe:
    """Allocate `mib` MiB and read NVML's process memory before and after."""
    cuda.matmul_loop("bf16", 256, 1)  # a CUDA context before the first reading: it is not the allocation
    # NVML counts the allocator's cached blocks (earlier probes leave hundreds of MiB) and `allocate` empties
    # the cache: read "before" once they are gone, or the released cache cancels part of the growth
    cuda.empty_cache()
    before, _, _ = own_process_mib(nvml, handle, pid)
    growth = cuda.allocate(mib)
    try:
        after, _, how = own_process_mib(nvml, handle, pid)
    finally:
        cuda.release()
    return MemoryProbe(before, after, growth, how)
