"""Model FLOPs utilization: achieved FLOP/s against the datasheet peak and the measured ceiling."""

from __future__ import annotations

from typing import Any

from suite.hardware import DeviceInfo
from suite.metrics import calibration, peaks


def utilization_fields(flops_per_step: int, step_time_ms: float, compute: str, device: DeviceInfo) -> dict[str, Any]:
    """`mfu` (vs the peak of the mode's compute dtype), `mfu_bf16` (vs the bf16 peak, one scale
    for all modes) and `mamf` (vs this machine's calibrated best matmul), each None + reason."""
    achieved = flops_per_step / (step_time_ms / 1e3)
    out: dict[str, Any] = {"achieved_flops": achieved, "peak_flops": None, "peak_flops_dtype": compute}
    if device.type != "cuda":
        out["mfu_reason"] = "no datasheet peak for CPUs; see mamf (calibrate with `mpbench calibrate`)"
    else:
        peak, reason = peaks.peak_flops(device.name, compute)
        bf16_peak, bf16_reason = peaks.peak_flops(device.name, "bf16")
        out |= {
            "peak_flops": peak,
            "mfu": achieved / peak if peak else None,
            "mfu_bf16": achieved / bf16_peak if bf16_peak else None,
            "mfu_reason": reason or bf16_reason,
        }
    ceiling, reason = calibration.ceiling(device, compute)
    out |= {"mamf_flops": ceiling, "mamf": achieved / ceiling if ceiling else None, "mamf_reason": reason}
    return out
