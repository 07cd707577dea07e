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

from suite.hardware import DeviceInfo, on_device, synchronize
from suite.metrics.timing import CudaEvents
from suite.modes.base import tf32_matmuls
from suite.text import slug

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp8": torch.float8_e4m3fn, "int8": torch.int8}  # fmt: skip
NO_CEILING = {
    "mxfp8": "no mxfp8 ceiling: `mpbench calibrate` does not time block-scaled MX matmuls (Blackwell); mamf is null"
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
    gen = torch.Generator(device=device.torch_device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device.torch_device, generator=gen) for _ in range(2))
    if name == "int8":  # int8 x int8 -> int32 (torch._int_mm: on CUDA M > 16, K and N multiples of 8)
        # mat2 column-major, as torchao's int8 matmuls hand it over: cuBLAS 13 has no int8 kernel for two
        # row-major operands (torch's test__int_mm skips that case on CUDA 13), so cu130 builds would refuse
        a, b = ((t * 32).clamp(-128, 127).to(torch.int8) for t in (a, b))
        b = b.t().contiguous().t()
        return lambda: torch._int_mm(a, b)
    if name == "fp8":  # e4m3 x e4m3 (the second column-major), fp32 scales, bf16 out: dims multiples of 16
        one = torch.ones((), device=device.torch_device)
        a, b = a.to(DTYPES[name]), b.to(DTYPES[name]).t().contiguous().t()
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    a, b = a.to(DTYPES[name]), b.to(DTYPES[name])
    return lambda: a @ b


def unavailable(device: DeviceInfo, name: str) -> str | None:
    """Why `name`'s matmul cannot run on `device` (its kernel refuses a small product), or None."""
    try:
        _matmul(device, name, 32)()
    except (RuntimeError, NotImplementedError) as exc:
        return f"{name} matmuls do not run on {device.describe()}: {type(exc).__name__}: {str(exc)[:160]}"
    return None


def _time_matmul(device: DeviceInfo, name: str, n: int, repeats: int) -> float:
    """Seconds per (n x n) @ (n x n) matmul in `name`'s dtype, warm, median of `repeats` timed batches."""
    product = _matmul(device, name, n)
    inner = 10 if device.type == "cuda" else 2
    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks, caches
        product()
    times = []
    events = CudaEvents(device.torch_device) if device.type == "cuda" else None
    for _ in range(repeats):
        if events is not None:  # events on the calibrated device's stream, not the current device's
            start = events.mark()
            for _ in range(inner):
                product()
            end = events.mark()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            synchronize(device.torch_device)
            t0 = time.perf_counter()
            for _ in range(inner):
                product()
            times.append((time.perf_counter() - t0) / inner)
    return sorted(times)[len(times) // 2]


def measure(
    device: DeviceInfo,
    dtypes: list[str] | None = None,
    sizes: tuple[int, ...] | None = None,
    repeats: int = 5,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Best square-matmul FLOP/s per dtype over `sizes`; a dict ready to save as JSON."""
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
    return {
        "device": device.name,
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "method": f"best over square matmuls n in {list(sizes)}; median of {repeats} warm timed batches",
        "results": results,
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
