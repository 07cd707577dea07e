"""Pure bf16 with stochastic rounding of the AdamW update: small updates survive on average.

Our own AdamW step in plain torch rather than torchao's `_AdamW(bf16_stochastic_round=True)`:
torchao compiles its step (2-25 s for the first step on a CPU, and it needs inductor and a C
compiler), which would dominate a short run. The math is torch's AdamW (decoupled weight
decay, bias-corrected moments), done in fp32 from the bf16 weight and moments; the new weight
is then rounded to bf16 stochastically: up with probability equal to its distance from the
lower bf16 neighbour, so E[round(x)] = x (tests check this). The moments are stored in bf16,
rounded to nearest (as torchao stores them).

Under FSDP2 (`--parallel fsdp`) the parameters, gradients and moments are DTensor shards: the step
works on each rank's local shard (`local_shard`), since DTensor refuses to mix with the plain noise
tensor, and each rank draws its noise from its own stream (seed + rank), so that shards don't share
one noise pattern. The update is elementwise, so a shard's arithmetic is the whole tensor's. Under DDP
(`--parallel ddp`) every rank holds the whole parameter and the same averaged gradient: all ranks draw
the same noise (seed alone), or their replicas would round apart and stop being one model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from suite.modes.base import ADAM_BETAS, decay_groups, local_shard
from suite.modes.pure_bf16 import PureBF16

_HIGH_HALF = -65536  # int32 0xFFFF0000: sign, exponent and the 7 mantissa bits bf16 keeps


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, unbiased: add uniform noise below bf16's last bit, then truncate.

    Adding a random 16-bit integer to the fp32 bit pattern carries into bf16's last bit with
    probability (dropped bits) / 2^16, i.e. the distance to the lower neighbour in ulps. Works
    on the magnitude, so negative values round symmetrically; inf stays inf.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & _HIGH_HALF).view(torch.float32).to(torch.bfloat16)  # exact: low bits are 0


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW for bf16 parameters with a stochastically rounded weight update."""

    impl = "StochasticRoundingAdamW (mpbench, for-loop)"  # the record's optimizer_impl: one tensor at a time

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = ADAM_BETAS, eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0) -> None:  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self._generators: dict[tuple[torch.device, bool], torch.Generator] = {}

    def _generator(self, device: torch.device, sharded: bool) -> torch.Generator:
        """One seeded stream per device, so runs repeat exactly: for a shard (FSDP2) seed + rank, each rank
        rounding its own part; for a whole tensor (one process, or a DDP replica) the seed on every rank."""
        key = (device, sharded)
        if key not in self._generators:
            import torch.distributed as dist

            rank = dist.get_rank() if sharded and dist.is_available() and dist.is_initialized() else 0
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed + rank)
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        """One AdamW step; weights rounded stochastically to their bf16 storage."""
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                # this rank's shards under FSDP2 (views: writing them writes the DTensors); else the tensors
                w, exp_avg, exp_avg_sq = local_shard(p), local_shard(state["exp_avg"]), local_shard(state["exp_avg_sq"])
                grad = local_shard(p.grad).float()
                m = exp_avg.float().lerp_(grad, 1 - beta1)
                v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.copy_(m)
                exp_avg_sq.copy_(v)
                new = w.float().mul_(1 - lr * wd)  # decoupled weight decay, as torch's AdamW
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                new.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
                w.copy_(stochastic_round_bf16(new, self._generator(w.device, sharded=w is not p)))
        return None


class PureBF16SR(PureBF16):
    """As `pure-bf16`, with AdamW's weight update stochastically rounded to bf16."""

    name = "pure-bf16-sr"
    summary = "bf16 weights, grads and AdamW state, no master copy, stochastic rounding of updates"

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return StochasticRoundingAdamW(decay_groups(model, weight_decay), lr=lr, eps=self.adam_eps)
