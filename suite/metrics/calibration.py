"""Achievable matmul ceiling per dtype ("MAMF", as ml-engineering's mamf-finder measures it).

Datasheet peaks are rarely reachable: clocks drop under load and real GEMMs never hit the
ideal. `mpbench calibrate` times large matmuls per dtype on this machine, keeps the best
FLOP/s, and stores it in `results/calibration/<device>-<host>.json`; records then carry
`mamf`, the step's FLOP/s against that measured ceiling, beside `mfu`.
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

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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
    if device.capability and device.capability >= (8, 0):
        return ["fp32", "tf32", "fp16", "bf16"]
    return ["fp32", "fp16"]


def _time_matmul(device: DeviceInfo, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Seconds per (n x n) @ (n x n) matmul, warm, median of `repeats` timed batches."""
    gen = torch.Generator(device=device.torch_device).manual_seed(0)
    a = torch.randn(n, n, device=device.torch_device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device.torch_device, generator=gen).to(dtype)
    inner = 10 if device.type == "cuda" else 2
    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks, caches
        a @ b
    times = []
    events = CudaEvents(device.torch_device) if device.type == "cuda" else None
    for _ in range(repeats):
        if events is not None:  # events on the calibrated device's stream, not the current device's
            start = events.mark()
            for _ in range(inner):
                a @ b
            end = events.mark()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            synchronize(device.torch_device)
            t0 = time.perf_counter()
            for _ in range(inner):
                a @ b
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
        if name not in DTYPES:
            raise ValueError(f"dtypes: {name!r} is unknown; choose from {', '.join(DTYPES)}")
        tries = []
        with on_device(device.torch_device), tf32_matmuls(name == "tf32"):
            for n in sizes:
                seconds = _time_matmul(device, DTYPES[name], n, repeats)
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


def save(calibration: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration, indent=2) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def ceiling(device: DeviceInfo, compute: str) -> tuple[float | None, str | None]:
    """This machine's measured matmul FLOP/s for `compute`, or (None, why not)."""
    path = calibration_path(device)
    if not path.is_file():
        return None, f"not calibrated on this machine: run `mpbench calibrate` (looked for {path})"
    try:
        data = json.loads(path.read_text())
        entry = data["results"].get(compute)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return None, f"unreadable calibration {path}: {exc}"
    if not entry:
        return None, f"calibration {path} has no {compute} figure; rerun `mpbench calibrate --dtypes {compute}`"
    return float(entry["flops"]), None
