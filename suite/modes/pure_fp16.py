"""Pure fp16: no master copy anywhere, so loss scaling must work on fp16 grads itself."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from suite.hardware import DeviceInfo
from suite.modes.base import FsdpPlan, PrecisionMode, cast_formats, local_shard


class DynamicLossScaler:
    """GradScaler's policy for fp16 gradients (which `torch.amp.GradScaler` refuses).

    Scale the loss; if any gradient is inf/NaN skip the step and halve the scale, else
    unscale the grads in place, step, and double the scale after `growth_interval` clean
    steps. Defaults are GradScaler's, so amp-fp16 and pure-fp16 scale alike.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = init_scale
        self.growth_interval = growth_interval
        self._clean_steps = 0
        self.across_ranks = False  # FSDP2: each rank holds a gradient shard; agree on the verdict

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        (loss * self.scale).backward()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # a DTensor's .all() is only this rank's verdict (a pending partial): check the local
        # shard and, when sharded, take the minimum over ranks, so all skip or all step
        finite = torch.stack([torch.isfinite(local_shard(g)).all() for g in grads]).all()
        if self.across_ranks:
            import torch.distributed as dist

            flag = finite.to(torch.float32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag > 0
        if not finite.item():  # the one host sync of the step
            self.scale /= 2
            self._clean_steps = 0
            return False
        torch._foreach_mul_(grads, 1.0 / self.scale)  # power of two: exact unless it underflows
        optimizer.step()
        self._clean_steps += 1
        if self._clean_steps == self.growth_interval:
            self.scale *= 2
            self._clean_steps = 0
        return True


class PureFP16(PrecisionMode):
    """Weights, activations, grads and AdamW state all fp16; the loss itself in fp32.

    AdamW's eps is 1e-4 rather than 1e-8: 1e-8 rounds to 0 in fp16 (smallest subnormal
    6e-8), and a zero denominator turns updates into inf/NaN. Without a master copy,
    updates and weight decay smaller than half an fp16 ulp (about 5e-4 relative) are
    rounded away: that loss of precision is what this mode measures.
    """

    name = "pure-fp16"
    summary = "fp16 weights, grads and AdamW state, no master copy, own loss scaling"
    needs = "any device (very slow on CPU)"
    adam_eps = 1e-4
    no_fsdp = None  # FSDP2: fp16 shards, gathered and reduced in fp16 (no policy)

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.compute = "fp16"
        self.scaler = DynamicLossScaler()

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.half()

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # everything is stored and computed in fp16; gradients as the hooks see them carry the loss scale
        # (DynamicLossScaler's own scaling), so plain fp16 is the format they are in
        return cast_formats(torch.float16)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).float()  # the fp16 weights, evaluated in fp32

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        return self.scaler.backward_and_step(loss, optimizer)

    @property
    def loss_scale(self) -> float | None:
        return self.scaler.scale

    def use_fsdp(self, plan: FsdpPlan) -> None:
        super().use_fsdp(plan)
        self.scaler.across_ranks = True
