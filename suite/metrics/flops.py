"""Model FLOPs utilization: achieved FLOP/s against the datasheet peak and the measured ceiling.

A mode that converts only the blocks' Linears to an 8-bit matmul (fp8, MXFP8, int8) runs the rest of
its counted FLOPs, the LM head and attention, in bf16 under autocast: about 40% of gpt2-small's at
1024 tokens. Its plain `mfu` divides by the 8-bit peak, as if every FLOP could have run there, and so
understates how busy the GPU was. `mode_dtype_flops_share` says which part ran in the mode's dtype
(from the converted layers' shapes) and `mfu_blended` divides by the peak of that mix: the FLOP/s a
step reaches when each FLOP runs at its own dtype's peak, 1 / (s / peak_mode + (1 - s) / peak_bf16).
"""

from __future__ import annotations

from typing import Any

import torch

from models import GPT, GPTConfig
from suite.hardware import DeviceInfo
from suite.metrics import calibration, peaks

REST_DTYPE = "bf16"  # the autocast dtype of every mode that converts layers: what their other FLOPs run in


def mode_dtype_share(config: GPTConfig, seq_len: int, converted: list[str] | None, kept_gemms: int = 0) -> float:
    """Share of the analytic training FLOPs that ran in the mode's compute dtype: 1.0 for a mode that
    converts no layers (all its counted matmuls run in that dtype), else the converted Linears' part
    (6 x in x out per token each: forward and two backward matmuls, 2 x in x out each), less the GEMM kinds its
    layer policy keeps high (`kept_gemms` of the three, which run in the autocast dtype with the rest)."""
    if converted is None:
        return 1.0
    with torch.device("meta"):  # shapes only
        model = GPT(config)
    layers = [model.get_submodule(fqn) for fqn in converted]
    per_token = sum(2 * (3 - kept_gemms) * m.in_features * m.out_features for m in layers)
    return per_token / model.flops_per_token(seq_len)


def utilization_fields(
    flops_per_step: int, step_time_ms: float, compute: str, device: DeviceInfo, share: float = 1.0
) -> dict[str, Any]:
    """`mfu` (vs the peak of the mode's compute dtype), `mfu_bf16` (vs the bf16 peak, one scale for all
    modes), `mfu_blended` (vs the peak of the mix of dtypes its FLOPs ran in, `share` of them in
    `compute`) and `mamf` (vs this machine's calibrated best matmul), each None + reason."""
    achieved = flops_per_step / (step_time_ms / 1e3)
    out: dict[str, Any] = {"achieved_flops": achieved, "peak_flops": None, "peak_flops_dtype": compute,
                           "mode_dtype_flops_share": share, "peak_flops_blended": None}  # fmt: skip
    if device.type != "cuda":
        out["mfu_reason"] = "no datasheet peak for CPUs; see mamf (calibrate with `mpbench calibrate`)"
    else:
        peak, reason = peaks.peak_flops(device.name, compute)
        bf16_peak, bf16_reason = peaks.peak_flops(device.name, REST_DTYPE)
        blended = None
        if peak and (bf16_peak or share == 1.0):
            blended = 1 / (share / peak + ((1 - share) / bf16_peak if share < 1.0 else 0.0))
        out |= {
            "peak_flops": peak,
            "peak_flops_blended": blended,
            "mfu": achieved / peak if peak else None,
            "mfu_bf16": achieved / bf16_peak if bf16_peak else None,
            "mfu_blended": achieved / blended if blended else None,
            "mfu_reason": reason or bf16_reason,
        }
    ceiling, reason = calibration.ceiling(device, compute)
    out |= {"mamf_flops": ceiling, "mamf": achieved / ceiling if ceiling else None, "mamf_reason": reason}
    return out
