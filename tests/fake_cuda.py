"""A fake of `suite.metrics.probes.TorchCuda`: scripted matmul rates and clocks, and the NVML
readings a real GPU would move while it works (energy counter, process memory, GPM).

Memory as the CUDA caching allocator keeps it: a tensor freed by torch stays reserved in a
cached block, so NVML's figure for the process is context + live tensors + cached blocks;
`empty_cache()` hands the cached blocks back to the driver and only then does NVML's figure fall.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from suite.metrics.probes import LoopTiming
from suite.metrics.tensor_cores import ProfilerTensorCoreResult
from tests.fake_nvml import MIB, FakeDevice, FakeNvml, Script

H100_UUID = "GPU-0000000a-1111-2222-3333-444444444442"


@dataclass
class FakeCuda:
    """One GPU as torch sees it. `device` is the fake NVML device this GPU drives."""

    device: FakeDevice | None = None
    present: bool = True
    gpu_name: str = "NVIDIA H100 80GB HBM3"
    gpu_uuid: str | None = H100_UUID
    tflops: dict[str, float] = field(default_factory=lambda: {"bf16": 650.0, "fp32": 50.0})  # rate of each loop
    wall_extra_ms: float = 0.05  # launch and sync: wall time = event time + this
    event_scale: float = 1.0  # < 1: the events time less than the GPU did (wrong device or stream)
    watts: float = 550.0  # board power while a loop runs: advances the energy counter
    tensor_util_pct: dict[str, float] = field(default_factory=lambda: {"bf16": 85.0, "fp32": 0.0})  # GPM reads
    nvml_growth: float = 1.0  # how much of an allocation NVML's process figure shows
    reserved_growth: float = 1.0  # how much of an allocation the allocator reports reserving
    pid: int = field(default_factory=os.getpid)
    others: list[tuple[int, int]] = field(default_factory=list)  # other processes on the GPU: (pid, bytes)
    profiler: dict[str, ProfilerTensorCoreResult] = field(default_factory=dict)
    max_sleep_s: float = 0.15  # a loop sleeps its wall time up to this: GPM needs > 100 ms between samples
    context_bytes: int = 600 * MIB  # our CUDA context (and cuBLAS workspace): no allocator block
    held_bytes: int = 0  # live tensors: what `allocate` holds
    cached_bytes: int = 0  # reserved by the caching allocator, free for torch, still used for NVML
    energy_mj: int = 10_000_000
    loops: list[LoopTiming] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._publish()

    def _publish(self) -> None:
        """What NVML reads now: our process and the others, and the energy counter."""
        if self.device is not None:
            self.device.scripts["processes"] = Script([[(self.pid, self.nvml_bytes), *self.others]])
            self.device.scripts["energy_mj"] = Script([self.energy_mj])

    @property
    def nvml_bytes(self) -> int:
        """What NVML lists for this process: the context, live tensors and the allocator's cached blocks."""
        return self.context_bytes + round(self.held_bytes * self.nvml_growth) + self.cached_bytes

    def unavailable(self) -> str | None:
        return None if self.present else "no CUDA GPU (fake: torch.cuda.is_available() is False)"

    def name(self) -> str:
        return self.gpu_name

    def uuid(self) -> str | None:
        return self.gpu_uuid

    def memory_mb(self) -> float:
        return 80 * 1024.0

    def matmul_loop(self, dtype: str, n: int, iters: int, during: Any = None) -> LoopTiming:
        gpu_ms = 2 * n**3 * iters / (self.tflops[dtype] * 1e12) * 1e3
        if self.device is not None:  # GPM shows this loop's tensor-core use while it runs
            util = self.tensor_util_pct[dtype]
            self.device.gpm_metrics = {FakeNvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: util,
                                       FakeNvml.NVML_GPM_METRIC_HMMA_TENSOR_UTIL: util,
                                       FakeNvml.NVML_GPM_METRIC_IMMA_TENSOR_UTIL: 0.0}  # fmt: skip
        if during is not None:
            during()
        time.sleep(min(gpu_ms / 1e3, self.max_sleep_s))
        self.energy_mj += round(self.watts * gpu_ms)  # W x ms = mJ
        # the loop's tensors (a, b, c; for a 16-bit loop also the fp32 randn each is cast from) are freed when
        # it returns: their blocks stay cached, and the next loop reuses them rather than reserving more
        size = 4 if dtype == "fp32" else 2
        working = 3 * n * n * size + (4 * n * n if size != 4 else 0)
        self.cached_bytes = max(self.cached_bytes, working)
        self._publish()
        timing = LoopTiming(dtype, n, iters, gpu_ms * self.event_scale, gpu_ms + self.wall_extra_ms)
        self.loops.append(timing)
        return timing

    def profiler_share(self, dtype: str, n: int, iters: int) -> ProfilerTensorCoreResult:
        self.matmul_loop(dtype, n, iters)
        return self.profiler.get(dtype, ProfilerTensorCoreResult(None, [], "fake: no profiler figures scripted"))

    def empty_cache(self) -> None:
        """As torch.cuda.empty_cache(): the cached blocks go back to the driver."""
        self.cached_bytes = 0
        self._publish()

    def allocate(self, mib: int) -> float:
        """As TorchCuda.allocate: empty the cache, then map `mib` MiB of new memory."""
        self.empty_cache()
        self.held_bytes += mib * MIB
        self._publish()
        return mib * self.reserved_growth

    def release(self) -> None:
        self.held_bytes = 0
        self.empty_cache()


class FakeAllocator:
    """torch.cuda's caching-allocator counters, as `suite.metrics.memory` reads them, with torch's semantics:
    `memory_allocated`/`memory_reserved` are current bytes, `max_memory_*` the peaks since the last
    `reset_peak_memory_stats`, which sets each peak to its current value (not to 0). A freed tensor's block
    stays reserved until `empty_cache`. `install` puts the five functions on torch.cuda (monkeypatch undoes it),
    and a `synchronize` that records the device it is given.
    Current and peak differ whenever something was freed: a bug that reads one for the other shows."""

    def __init__(self) -> None:
        self.allocated = self.reserved = self.max_allocated = self.max_reserved = 0
        self.devices: set[object] = set()  # every device argument the code passed
        self.syncs: list[str] = []  # the device of each torch.cuda.synchronize call, in order

    def install(self, monkeypatch: Any) -> FakeAllocator:
        import torch

        for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved",
                     "reset_peak_memory_stats"):  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.syncs.append(str(device)))
        return self

    def alloc(self, mib: int, slack_mib: int = 0) -> None:
        """Hold `mib` more; a new block (with `slack_mib` of rounding) only when the cache has too little."""
        self.allocated += mib * MIB
        if self.allocated > self.reserved:
            self.reserved = self.allocated + slack_mib * MIB
        self.max_allocated = max(self.max_allocated, self.allocated)
        self.max_reserved = max(self.max_reserved, self.reserved)

    def free(self, mib: int) -> None:
        self.allocated -= mib * MIB  # the block stays cached: reserved does not fall

    def empty_cache(self) -> None:
        self.reserved = self.allocated

    def _seen(self, device: object) -> None:
        self.devices.add(str(device))

    def memory_allocated(self, device: object = None) -> int:
        self._seen(device)
        return self.allocated

    def memory_reserved(self, device: object = None) -> int:
        self._seen(device)
        return self.reserved

    def max_memory_allocated(self, device: object = None) -> int:
        self._seen(device)
        return self.max_allocated

    def max_memory_reserved(self, device: object = None) -> int:
        self._seen(device)
        return self.max_reserved

    def reset_peak_memory_stats(self, device: object = None) -> None:
        self._seen(device)
        self.max_allocated, self.max_reserved = self.allocated, self.reserved
