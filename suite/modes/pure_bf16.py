"""Pure bf16: weights, activations, grads and AdamW state all bf16, no fp32 master copy."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from suite.hardware import DeviceInfo
from suite.modes.base import PrecisionMode, cast_formats, needs_capability


class PureBF16(PrecisionMode):
    """`model.bfloat16()` and torch's AdamW, whose state then is bf16 too.

    No loss scaling (bf16 has fp32's range). Without a master copy, an update smaller than
    half a bf16 ulp (2^-9 relative: 8 mantissa bits) rounds away: with a small learning rate
    late in training, weights stop moving. `pure-bf16-sr` is the cure this mode measures against.
    """

    name = "pure-bf16"
    summary = "bf16 weights, grads and AdamW state, no master copy (round to nearest)"
    needs = "CUDA compute capability 8.0+, or a CPU"
    cpu_default = False
    no_fsdp = None  # FSDP2: bf16 shards, gathered and reduced in bf16 (no policy), like pure-fp16

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.compute = "bf16"

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        return needs_capability(device, (8, 0), cls.name) if device.type == "cuda" else None

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.bfloat16()

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # stored and computed in bf16 (pure-bf16-sr too: its stochastic rounding is in the optimizer's update)
        return cast_formats(torch.bfloat16)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).float()  # the bf16 weights, evaluated in fp32
