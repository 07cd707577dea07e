from __future__ import annotations

from suite.hardware import DeviceInfo
from suite.modes.base import PrecisionMode, needs_capability


class TF32(PrecisionMode):
    """fp32 storage; matmuls and convolutions in TF32 on tensor cores (10-bit mantissa)."""

    name = "tf32"
    summary = "fp32 weights, TF32 tensor-core matmuls"
    needs = "CUDA, compute capability 8.0+"
    allow_tf32 = True
    no_fsdp = None  # FSDP2: fp32 shards, no policy, TF32 matmuls

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        return needs_capability(device, (8, 0), "tf32")
