from __future__ import annotations

import torch

from suite.hardware import DeviceInfo
from suite.modes.base import FsdpPlan, PrecisionMode, cast_formats


class AmpFP16(PrecisionMode):
    """fp32 master weights; forward under fp16 autocast; dynamic loss scaling (GradScaler)."""

    name = "amp-fp16"
    summary = "fp32 weights, fp16 autocast, GradScaler"
    needs = "any device (slow on CPU)"
    no_fsdp = None
    fsdp_param_dtype = torch.float16  # FSDP2: fp32 shards, gathered and computed in fp16

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.compute = "fp16"
        self.autocast_dtype = torch.float16
        self.scaler = torch.amp.GradScaler(device.type)
        self._sharded = False  # use_fsdp: FSDP2's ShardedGradScaler, which fused AdamW cannot take

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # fp16 autocast: every Linear's GEMM operands are cast to fp16 and its weight-gradient GEMM returns
        # fp16 (then cast to the fp32 master's .grad). Plain fp16, not "fp16-scaled": the gradients the hooks
        # see are already multiplied by GradScaler's loss scale, which is the mode's own scaling.
        return cast_formats(torch.float16)

    def _scale_tensor(self) -> torch.Tensor | None:
        """The scale as GradScaler keeps it, on the device; None before the first step.
        (`get_scale()` would return a float through a host sync: once per step, for nothing.)"""
        return self.scaler._get_scale_async()

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        self.scaler.scale(loss).backward()  # creates the scale tensor on the first step
        before = self._scale_tensor().clone()  # update() changes it in place
        # Unscale here rather than leave it to a fused AdamW's kernel (`_step_supports_amp_scaling`): the same
        # one pass over the gradients either way (GradScaler's inf check runs it with scale 1 otherwise), but an
        # optimizer pre-hook (mpbench fidelity) then sees the true gradients; and FSDP2's ShardedGradScaler
        # all-reduces the inf verdict only in unscale_ (so ranks skip a step together).
        self.scaler.unscale_(optimizer)
        self.scaler.step(optimizer)  # skips the step if any grad is inf/NaN (non-fused: its one host sync)
        self.scaler.update()  # ... and then backs the scale off
        return self._scale_tensor() >= before  # 0-dim bool on the device: read at check points

    @property
    def loss_scale(self) -> torch.Tensor | float:
        scale = self._scale_tensor()
        return self.scaler.get_scale() if scale is None else scale  # before any step: the initial float

    def no_fused_adamw(self) -> str | None:
        if self._sharded:
            return (
                "FSDP2's ShardedGradScaler hands torch 2.13's fused Adam a (1,)-shaped found_inf that it cannot "
                "subtract from its ()-shaped step counters"
            )
        return None

    def use_fsdp(self, plan: FsdpPlan) -> None:
        super().use_fsdp(plan)
        self._sharded = True
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # GradScaler would find inf/NaN in this rank's gradient shard only, and ranks would
        # disagree on skipping a step; the sharded scaler all-reduces that verdict first.
        self.scaler = ShardedGradScaler(self.device.type)
