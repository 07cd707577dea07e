"""Device detection, capability checks and the environment a record carries."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """What a precision mode needs to know about the device it would run on."""

    type: str  # "cpu" or "cuda"
    name: str  # GPU model or CPU model
    capability: tuple[int, int] | None = None  # CUDA compute capability, None on CPU
    index: int = 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.type == "cuda" else torch.device("cpu")

    def describe(self) -> str:
        if self.capability is None:
            return f"{self.type} ({self.name})"
        return f"{self.name}, compute capability {self.capability[0]}.{self.capability[1]}"


def concrete_device(name: str) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> the concrete device a `Case` carries: "cpu" or "cuda:N".

    The one place a user's device name is interpreted: "auto" is the first GPU when torch sees
    one, else the CPU; "cuda" is GPU 0. Whether that GPU exists is `resolve_device`'s check.
    """
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return "cuda:0"
    if name == "cpu" or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"device={name!r} is unknown; choose auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> DeviceInfo:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> DeviceInfo; ValueError naming the fix."""
    concrete = concrete_device(name)
    if concrete == "cpu":
        return DeviceInfo("cpu", cpu_name())
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={name!r}: no CUDA GPU is visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    index = int(concrete[5:])
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device={name!r}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0 .. cuda:N-1")
    return DeviceInfo("cuda", torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), index)


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make `device` CUDA's current device for the block, restored after (a no-op on CPU).

    Calls that default to the current device (`torch.cuda.Event.record()`, `synchronize()`,
    library handles) then act on the case's GPU, and no context is made on GPU 0.
    """
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


def empty_cache(device: torch.device) -> None:
    """Hand the caching allocator's unused blocks back to the driver (a no-op on CPU), with `device` current:
    `torch.cuda.empty_cache()` frees every device's blocks, and called while another GPU is current (GPU 0 by
    default) it makes a CUDA context there, ~250-500 MiB on a GPU the case never uses (pytorch/pytorch#25752,
    #144025, open; torch 2.11 and 2.13 call the same c10 emptyCache). Nothing where CUDA is not initialized:
    entering `torch.cuda.device` would make a context just to find an empty cache."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so a host clock reading means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MEMINFO = Path("/proc/meminfo")


def available_ram(meminfo: Path = MEMINFO) -> int | None:
    """Bytes the kernel estimates are free for a new process (MemAvailable), or None: no /proc (macOS), a
    kernel before 3.14 (no such line), or a line that does not parse."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU flags that give bf16 / fp16 matmuls in hardware: x86 AVX512-BF16, AMX-BF16, AVX512-FP16, AMX-FP16;
# Arm's BF16 extension and half-precision SIMD. Without one, torch runs that dtype on a CPU in software,
# ~13-30x slower than fp32 (fp16 on this project's EPYC; bf16 on issue 17's AVX2 EPYC).
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16", "asimdhp")}
NATIVE_BF16_FLAGS = NATIVE_FLAGS["bf16"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo ('flags' on x86, 'Features' on Arm); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_flag(dtype: str, flags: frozenset[str] | None = None) -> str | None:
    """The flag through which this CPU runs `dtype` ("bf16" or "fp16") natively, None when it has none."""
    have = cpu_flags() if flags is None else flags
    return next((f for f in NATIVE_FLAGS[dtype] if f in have), None)


def native_bf16_flag(flags: frozenset[str] | None = None) -> str | None:
    """The flag through which this CPU runs bf16 natively, None when it has none."""
    return native_flag("bf16", flags)


@functools.cache
def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this package runs from; (None, None) outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver, no GPU: the field is simply unknown
        return None


def environment(device: DeviceInfo) -> dict[str, object]:
    """Flat environment fields for a record."""
    on_gpu = device.type == "cuda"
    commit, dirty = git_commit()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "gpu_name": device.name if on_gpu else None,
        "gpu_count": torch.cuda.device_count() if on_gpu else 0,
        "gpu_capability": ".".join(map(str, device.capability)) if device.capability else None,
        "gpu_memory_mb": torch.cuda.get_device_properties(device.index).total_memory / 2**20 if on_gpu else None,
        "driver": _nvidia_driver() if on_gpu else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16_native": None if on_gpu else native_flag("bf16") is not None,
        "cpu_fp16_native": None if on_gpu else native_flag("fp16") is not None,
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }
