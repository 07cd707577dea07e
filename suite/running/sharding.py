"""Sharded data parallelism (FSDP2) for one rank: the mode's MixedPrecisionPolicy, and back.

`fsdp_wrapper` shards the prepared model with `torch.distributed.fsdp.fully_shard`: one FSDP
unit per transformer block (its parameters all-gathered just before it runs and freed after
its forward and backward, ZeRO-3 style), then the root for the embeddings, the final norm and
the tied LM head. Each rank keeps 1/N of every parameter, gradient and AdamW state as a
DTensor sharded on dim 0; the optimizer steps those shards. The mode's `fsdp_plan` gives the
policy: `param_dtype` for the all-gather and the compute, `reduce_dtype` for the gradients'
reduce-scatter (which averages them over ranks, as DDP does).

`full_copy` gathers the weights into a plain model for evaluation, so the held-out loss is
taken in strict fp32 from what the shards learned, whatever the policy computes in.
Only API that torch 2.11 has too (`torch.distributed.fsdp.fully_shard`, `MixedPrecisionPolicy`,
`torch.distributed.device_mesh.init_device_mesh`, `torch.distributed.tensor.DTensor.full_tensor`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from models import GPT
from suite.modes import PrecisionMode


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fsdp_wrapper(grad_comm: str, found: dict[str, Any]) -> Callable[[nn.Module, PrecisionMode], nn.Module]:
    """A `wrap` for `run_case` that shards with FSDP2; fills `found` with the record's
    `param_dtype` and `reduce_dtype` (what the policy resolves to for this model)."""

    def wrap(model: nn.Module, mode: PrecisionMode) -> nn.Module:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        plan = type(mode).fsdp_plan(grad_comm)
        if plan.unavailable:  # the parent skips these before launching; never train them
            raise RuntimeError(plan.unavailable)
        stored = sorted({_dtype_name(p.dtype) for p in model.parameters() if p.is_floating_point()})
        policy = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=plan.reduce_dtype)
        # the mesh on the model's device: FSDP's default is the accelerator's even for a CPU case
        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # the same object, its parameters now DTensor shards
        mode.use_fsdp(plan)
        # None in the policy: no cast (param: as stored; reduce: the gradients', i.e. the param dtype)
        param = _dtype_name(plan.param_dtype) if plan.param_dtype else ",".join(stored)
        found["param_dtype"] = param
        found["reduce_dtype"] = _dtype_name(plan.reduce_dtype) if plan.reduce_dtype else param
        return model

    return wrap


@torch.no_grad()
def full_copy(model: nn.Module) -> nn.Module:
    """A plain, unsharded copy of an FSDP2-sharded GPT on this rank (weights in their stored
    dtype). A collective: every rank must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    gathered: dict[int, torch.Tensor] = {}  # by tensor id: the tied embedding / LM head once

    def full(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in gathered:
            gathered[id(t)] = t.full_tensor() if isinstance(t, DTensor) else t.detach()
        return gathered[id(t)]

    state = {k: full(v) for k, v in model.state_dict(keep_vars=True).items()}
    with torch.device("meta"):  # shapes only: the gathered tensors become its weights
        plain = GPT(model.config)
    plain.load_state_dict(state, assign=True)
    plain.lm_head.weight = plain.wte.weight  # re-tie (assign gave each key its own Parameter)
    return plain.eval()
