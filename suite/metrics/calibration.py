"""Achievable matmul ceiling per dtype ("MAMF", as ml-engineering's mamf-finder measures it).

Datasheet peaks are rarely reachable: clocks drop under load and real GEMMs never hit the
ideal. `mpbench calibrate` times large matmuls per dtype on this machine, keeps the best
FLOP/s, and stores it in `results/calibration/<device>-<host>.json`; records then carry
`mamf`, the step's FLOP/s against that measured ceiling, beside `mfu`.

The 8-bit dtypes are timed with the kernels their modes reach: "fp8" with `torch._scaled_mm` (e4m3
operands, one fp32 scale each, bf16 output: torchao's tensorwise recipe), "int8" with `torch._int_mm`
(int32 output). A device without them (fp8 before compute capability 8.9) gets a reason instead of a
figure. "mxfp8" has no ceiling: its block-scaled matmuls (e8m0 scales per 32 elements, Blackwell) are
not timed here, and `ceiling` says so rather than pointing at a command that would refuse.

`gemm` builds one product of any (m, k, n) shape in any arithmetic of ARITHMETICS (fp8-rowwise: per-row
scales; fp8-rowwise-rescaled: torchao's rowwise without fast accumulation, the tensorwise kernel and the
scales applied after; mxfp8: e8m0 block scales, Blackwell only) for `mpbench gemms`; `time_call` is the one timer. The
memory bandwidth (`measure_bandwidth`, a large device copy) is stored beside the ceilings for the roofline.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from suite.hardware import DeviceInfo, available_ram, on_device, synchronize
from suite.metrics.timing import CudaEvents
from suite.modes.base import tf32_matmuls
from suite.text import slug

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp8": torch.float8_e4m3fn, "int8": torch.int8}  # fmt: skip
# Every arithmetic a mode's GEMMs run in (`mpbench gemms`); DTYPES are those `mpbench calibrate` times.
ARITHMETICS = ("fp32", "tf32", "fp16", "bf16", "fp8", "fp8-rowwise", "fp8-rowwise-rescaled", "int8", "mxfp8")
FP8 = ("fp8", "fp8-rowwise", "fp8-rowwise-rescaled", "mxfp8")  # through torch._scaled_mm
NO_CEILING = {
    "mxfp8": "no mxfp8 ceiling: `mpbench calibrate` does not time block-scaled MX matmuls (Blackwell); mamf is null",
    **{
        fmt: f"no {fmt} ceiling: `mpbench calibrate` does not time 4-bit matmuls; mamf is null"
        for fmt in ("nvfp4", "mxfp4")
    },
}
GPU_SIZES = (2048, 4096, 6144, 8192)
CPU_SIZES = (256, 512, 1024)


def calibration_dir() -> Path:
    return Path(os.environ.get("MPBENCH_CALIBRATION_DIR", "results/calibration"))


def calibration_path(device: DeviceInfo) -> Path:
    """Where this machine's calibration lives: one file per (device model, host)."""
    return calibration_dir() / f"{slug(device.name)}-{slug(socket.gethostname())}.json"


def default_dtypes(device: DeviceInfo) -> list[str]:
    """dtypes worth calibrating here: fp16/tf32 only on GPUs that have them natively."""
    if device.type != "cuda":
        return ["fp32", "bf16"]  # fp16 matmul on CPU is emulated and not what a mode uses
    if device.capability and device.capability >= (8, 9):
        return ["fp32", "tf32", "fp16", "bf16", "fp8", "int8"]
    if device.capability and device.capability >= (8, 0):
        return ["fp32", "tf32", "fp16", "bf16", "int8"]
    return ["fp32", "fp16"]


def _matmul(device: DeviceInfo, name: str, n: int) -> Callable[[], torch.Tensor]:
    """One (n x n) @ (n x n) product in `name`'s dtype, as the modes compute it, ready to call."""
    return gemm(device, name, n, n, n)


LAYOUTS = ("nn", "nt", "tn")


def gemm(
    device: DeviceInfo, name: str, m: int, k: int, n: int, fast_accum: bool = False, layout: str = "nn"
) -> Callable[[], torch.Tensor]:
    """One (m x k) @ (k x n) product in arithmetic `name` (ARITHMETICS), as the modes compute it, ready to call.
    The operands' values do not matter for the time: randn, cast to the arithmetic's formats, unit scales.
    `fast_accum`: `_scaled_mm`'s use_fast_accum (torchao's float8 forward GEMM sets it, its backward ones not).
    `layout` (16- and 32-bit `mm` only; the 8-bit kernels fix their own): which operand autograd hands over
    transposed, column-major. "nt": b (a Linear's forward, x @ W^T), "tn": a (its weight gradient, dy^T @ x),
    "nn": neither (its input gradient, dy @ W; calibration's square matmuls). cuBLAS picks its kernel by the
    leading dimensions: an odd one (the LM head's 50257) in a layout the step never uses times another kernel."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")
    if name == "mxfp8" and (why := _no_mx(device)):
        raise NotImplementedError(why)
    dev = device.torch_device
    gen = torch.Generator(device=dev).manual_seed(0)
    a, b = torch.randn(m, k, device=dev, generator=gen), torch.randn(k, n, device=dev, generator=gen)
    if name == "int8":  # int8 x int8 -> int32 (torch._int_mm: on CUDA M > 16, K and N multiples of 8)
        # mat2 column-major, as torchao's int8 matmuls hand it over: cuBLAS 13 has no int8 kernel for two
        # row-major operands (torch's test__int_mm skips that case on CUDA 13), so cu130 builds would refuse
        a, b = ((t * 32).clamp(-128, 127).to(torch.int8) for t in (a, b))
        b = b.t().contiguous().t()
        return lambda: torch._int_mm(a, b)
    if name in FP8:  # e4m3 x e4m3 (the second column-major), bf16 out
        a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        scale_a, scale_b = _scales(name, m, k, n, dev)
        if name == "fp8-rowwise-rescaled":  # torchao 0.18's rowwise GEMM without fast accumulation: the
            one = torch.ones((), device=dev)  # tensorwise kernel, then the row x column scales (float8_ops.py)

            def rescaled() -> torch.Tensor:
                out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                out *= scale_a * scale_b
                return out

            return rescaled
        return lambda: torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast_accum)  # fmt: skip
    a, b = a.to(DTYPES[name]), b.to(DTYPES[name])
    if layout == "nt":
        b = b.t().contiguous().t()
    elif layout == "tn":
        a = a.t().contiguous().t()
    return lambda: a @ b


def _scales(name: str, m: int, k: int, n: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch._scaled_mm`'s scales for arithmetic `name` (torch/_meta_registrations.py _check_scaled_mm_sizes):
    fp8 one fp32 each (torchao's tensorwise); fp8-rowwise fp32 (m, 1) and (1, n), contiguous (torchao's
    rowwise: one per row of A, one per column of B); mxfp8 one e8m0 per 32 elements along K, in cuBLAS's
    swizzled block layout of 128 rows x 4 blocks (torchao mx_formats/utils.py to_blocked). All ones (e8m0
    byte 127 = 2^0): with equal scales the swizzle is a no-op, so only the padded size matters."""
    if name == "fp8":
        one = torch.ones((), device=dev)
        return one, one
    if name in ("fp8-rowwise", "fp8-rowwise-rescaled"):
        return torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    k_blocks = _round_up(_round_up(k, 32) // 32, 4)  # ceil(k / 32) blocks, padded to a multiple of 4

    def unit(rows: int) -> torch.Tensor:  # rows padded to a multiple of 128
        return torch.full((_round_up(rows, 128) * k_blocks,), 127, dtype=torch.uint8, device=dev)

    return unit(m).view(torch.float8_e8m0fnu), unit(n).view(torch.float8_e8m0fnu)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _no_mx(device: DeviceInfo) -> str | None:
    """Why block-scaled MXFP8 matmuls cannot run on `device` (they need compute capability 10.0), or None."""
    if device.type == "cuda" and device.capability and device.capability >= (10, 0):
        return None
    return f"mxfp8 matmuls need a GPU of compute capability >= 10.0 (Blackwell); this is {device.describe()}"


def unavailable(device: DeviceInfo, name: str) -> str | None:
    """Why `name`'s matmul cannot run on `device` (its kernel refuses a small product), or None."""
    if name == "mxfp8" and (why := _no_mx(device)):
        return why
    try:
        gemm(device, name, 32, 32, 32)()
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        return f"{name} matmuls do not run on {device.describe()}: {type(exc).__name__}: {str(exc)[:160]}"
    return None


def time_call(device: DeviceInfo, call: Callable[[], object], repeats: int, inner: int, warmup: int = 3) -> list[float]:
    """Seconds per `call()`, one figure per timed batch of `inner` calls, after `warmup` calls: CUDA events on
    the device's stream on a GPU, perf_counter after a sync on a CPU. The one timer of this module."""
    for _ in range(warmup):  # cuBLAS heuristics, clocks, caches, first-touch pages
        call()
    times = []
    events = CudaEvents(device.torch_device) if device.type == "cuda" else None
    for _ in range(repeats):
        if events is not None:  # events on the calibrated device's stream, not the current device's
            start = events.mark()
            for _ in range(inner):
                call()
            end = events.mark()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            synchronize(device.torch_device)
            t0 = time.perf_counter()
            for _ in range(inner):
                call()
            times.append((time.perf_counter() - t0) / inner)
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _time_matmul(device: DeviceInfo, name: str, n: int, repeats: int) -> float:
    """Seconds per (n x n) @ (n x n) matmul in `name`'s dtype, warm, median of `repeats` timed batches."""
    return median(time_call(device, _matmul(device, name, n), repeats, 10 if device.type == "cuda" else 2))


def measure(
    device: DeviceInfo,
    dtypes: list[str] | None = None,
    sizes: tuple[int, ...] | None = None,
    repeats: int = 5,
    log: Callable[[str], None] | None = None,
    copy_nbytes: int | None = None,
) -> dict[str, Any]:
    """Best square-matmul FLOP/s per dtype over `sizes` and the memory bandwidth (a copy of `copy_nbytes`,
    default `copy_bytes(device)`); a dict ready to save as JSON."""
    dtypes = dtypes or default_dtypes(device)
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    results: dict[str, Any] = {}
    for name in dtypes:
        check_dtype(name)
    for name in dtypes:
        tries = []
        with on_device(device.torch_device), tf32_matmuls(name == "tf32"):
            if why := unavailable(device, name):
                results[name] = {"flops": None, "reason": why}
                if log:
                    log(f"calibrate {name:<4} skipped: {why}")
                continue
            for n in sizes:
                seconds = _time_matmul(device, name, n, repeats)
                tries.append({"n": n, "seconds": seconds, "flops": 2 * n**3 / seconds})
                if log:
                    log(f"calibrate {name:<4} n={n:<5} {tries[-1]['flops'] / 1e12:8.2f} TFLOP/s")
        best = max(tries, key=lambda t: t["flops"])
        results[name] = {"flops": best["flops"], "n": best["n"], "tries": tries}
    copied = measure_bandwidth(device, copy_nbytes, repeats)
    if log:
        got = copied["bytes_per_s"]
        log(f"calibrate bandwidth {got / 1e9:.1f} GB/s" if got else f"calibrate bandwidth skipped: {copied['reason']}")
    return {
        "device": device.name,
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": f"best over square matmuls n in {list(sizes)}; median of {repeats} warm timed batches",
        "results": results,
        "bandwidth": copied,
    }


GPU_COPY_BYTES = 256 * 2**20  # far beyond any GPU's L2 (H100: 50 MB, B200: 126 MB)
MIN_COPY_BYTES = 256 * 2**20


def copy_bytes(device: DeviceInfo) -> int:
    """Bytes of the tensor the bandwidth copy reads (and writes again): on a GPU 256 MiB; on a CPU 4 x its
    last-level cache (at least 256 MiB), so the copy streams from DRAM, but at most 1/8 of the free memory
    (source and destination: a quarter), as other processes share the machine."""
    if device.type == "cuda":
        return GPU_COPY_BYTES
    wanted = max(MIN_COPY_BYTES, 4 * (_last_level_cache() or 0))
    free = available_ram()
    return min(wanted, free // 8) if free else wanted


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")  # index0..N: level, size ("32K", "30720K")


def _last_level_cache(caches: Path = CPU_CACHES) -> int | None:
    """Bytes of CPU 0's highest-level cache, from sysfs (what `lscpu` reads), or None off Linux. An index
    that cannot be read or parsed (a VM's partial sysfs) is passed over, not fatal."""
    best: tuple[int, int] | None = None
    for index in caches.glob("index*"):
        try:
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
            value = int(size.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
        best = max(best or (level, value), (level, value))
    return best[1] if best else None


def measure_bandwidth(device: DeviceInfo, nbytes: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """Memory bandwidth: a device copy of `nbytes` of fp32 into a preallocated tensor, (read + write bytes) /
    seconds, median of `repeats`; {"bytes_per_s": None, "reason": ...} when the copy cannot run."""
    nbytes = nbytes or copy_bytes(device)
    numel = nbytes // 4
    try:
        with on_device(device.torch_device):
            src = torch.ones(numel, device=device.torch_device)  # written: its pages are mapped, not lazy zeros
            dst = torch.zeros_like(src)
            times = time_call(device, lambda: dst.copy_(src), repeats, inner=1, warmup=1)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        return {"bytes_per_s": None, "reason": f"the {nbytes / 2**20:.0f} MiB copy failed: {type(exc).__name__}: "
                f"{str(exc)[:160]}"}  # fmt: skip
    moved = 2 * numel * 4  # read once, written once
    tries = [{"bytes": moved, "seconds": t, "bytes_per_s": moved / t} for t in times]
    return {
        "bytes_per_s": moved / median(times),
        "method": f"copy of a {numel * 4 / 2**20:.0f} MiB fp32 tensor into a preallocated one, (read + write "
        f"bytes) / seconds, median of {repeats}",
        "tries": tries,
    }


def check_dtype(name: str) -> None:
    """ValueError naming the dtype and the choices (and why mxfp8 is not one) unless `name` can be calibrated."""
    if name not in DTYPES:
        extra = f" ({NO_CEILING[name]})" if name in NO_CEILING else ""
        raise ValueError(f"dtypes: {name!r} is unknown{extra}; choose from {', '.join(DTYPES)}")


def save(calibration: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def ceiling(device: DeviceInfo, compute: str) -> tuple[float | None, str | None]:
    """This machine's measured matmul FLOP/s for `compute`, or (None, why not)."""
    if compute in NO_CEILING:
        return None, NO_CEILING[compute]
    entry, why = _entry(device, compute, compute, f"mpbench calibrate --dtypes {compute}")
    if entry is None:
        return None, why
    if entry.get("flops") is None:
        return None, f"calibration {calibration_path(device)} could not time {compute}: {entry.get('reason')}"
    return float(entry["flops"]), None


def _entry(device: DeviceInfo, key: str, what: str, fix: str) -> tuple[dict[str, Any] | None, str | None]:
    """The calibration file's results[key] (or its top-level `bandwidth`), or (None, why not)."""
    path = calibration_path(device)
    if not path.is_file():
        return None, f"not calibrated on this machine: run `mpbench calibrate` (looked for {path})"
    try:
        data = json.loads(path.read_text())
        entry = data.get("bandwidth") if key == "bandwidth" else data["results"].get(key)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return None, f"unreadable calibration {path}: {exc}"
    if not isinstance(entry, dict):
        return None, f"calibration {path} has no {what} figure; rerun `{fix}`"
    return entry, None


def bandwidth(device: DeviceInfo) -> tuple[float | None, str | None]:
    """This machine's measured memory bandwidth in bytes/s (`mpbench calibrate` stores it as
    {"bandwidth": {"bytes_per_s": ..., ...}}), or (None, why not)."""
    entry, why = _entry(device, "bandwidth", "memory bandwidth", "mpbench calibrate")
    if entry is None:
        return None, why
    value = entry.get("bytes_per_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None, f"calibration {calibration_path(device)} could not measure memory bandwidth: {entry.get('reason')}"
    return float(value), None
