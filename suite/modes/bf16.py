from __future__ import annotations

import torch

from suite.hardware import DeviceInfo
from suite.modes.base import PrecisionMode, cast_formats, needs_capability


class BF16(PrecisionMode):
    """fp32 master weights; forward under bf16 autocast; no loss scaling (fp32's range)."""

    name = "bf16"
    summary = "fp32 weights, bf16 autocast, no loss scaling"
    needs = "CUDA compute capability 8.0+, or a CPU"
    no_fsdp = None
    fsdp_param_dtype = torch.bfloat16  # FSDP2: fp32 shards, gathered and computed in bf16

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.compute = "bf16"
        self.autocast_dtype = torch.bfloat16

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # bf16 autocast: operands cast to bf16, the weight-gradient GEMM returns bf16 (then the fp32 .grad)
        return cast_formats(torch.bfloat16)

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        # Before Ampere bf16 is emulated at a fraction of fp16 speed: not worth measuring.
        return needs_capability(device, (8, 0), "bf16") if device.type == "cuda" else None
