from __future__ import annotations

import torch

from suite.hardware import DeviceInfo
from suite.modes.base import PrecisionMode


class AmpFP16(PrecisionMode):
    """fp32 master weights; forward under fp16 autocast; dynamic loss scaling (GradScaler)."""

    name = "amp-fp16"
    summary = "fp32 weights, fp16 autocast, GradScaler"
    needs = "any device (slow on CPU)"

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.compute = "fp16"
        self.autocast_dtype = torch.float16
        self.scaler = torch.amp.GradScaler(device.type)
        self._scale = self.scaler.get_scale()  # cached: reading it is a host sync

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        before = self._scale
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skips the step if any grad is inf/NaN (syncs once)
        self.scaler.update()  # ... and then backs the scale off
        self._scale = self.scaler.get_scale()
        return self._scale >= before

    @property
    def loss_scale(self) -> float | None:
        return self._scale
