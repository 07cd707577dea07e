"""Which AdamW implementation a mode's optimizer uses, decided once, and which one a built optimizer runs.

torch's AdamW has three implementations with the same math: a for-loop over tensors, `foreach` (one kernel
per operation over a list of tensors) and `fused` (one kernel for the whole update of a list of tensors,
`torch._fused_adamw_`). Left to itself (fused=None, foreach=None) torch 2.13 picks foreach when every
parameter is a plain tensor on a foreach device (CUDA, not CPU), else the for-loop; it never picks fused by
itself ("bake-in time", torch/optim/optimizer.py `_fused_doc`). mpbench asks for fused where the contract
allows, because the update is memory-bound: the for-loop and foreach read and write the weights, moments and
gradient once per operation, fused once per step (docs/step-costs.md).

The contract, read in torch 2.13 (`_default_to_fused_or_foreach(..., use_fused=True)`): every parameter's
type is a plain Tensor/Parameter (or DTensor, which torch.distributed.tensor registers: FSDP2's shards),
it is floating point (float64, float32, float16, bfloat16: `_fused_doc`), and its device type has fused
kernels (`_get_fused_kernels_supported_devices`: cuda and cpu among others). torchao's int8 training weight
is a tensor subclass: fused and foreach both raise NotImplementedError on it (checked on a CPU), so its
group keeps torch's own default, the for-loop.

With a GradScaler, a fused optimizer unscales and skips inside the kernel (`_step_supports_amp_scaling`);
mpbench's amp-fp16 unscales first itself (`scaler.unscale_`, the same one pass over the gradients), so the
gradients an optimizer pre-hook sees are the true ones; the fused kernel then only reads `found_inf` and
skips the update on the device, with no host sync. Under FSDP2, amp-fp16's ShardedGradScaler makes a
(1,)-shaped `found_inf`, which torch 2.13's fused Adam cannot subtract from its ()-shaped step counters
("output with shape [] doesn't match the broadcast shape [1]", seen on a CPU with a 1-rank group); without
the explicit unscale_ it would not all-reduce the inf verdict at all. So that combination keeps torch's
default (foreach for DTensors on CUDA): `PrecisionMode.no_fused_adamw`.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach, _foreach_supported_types
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from suite.hardware import DeviceInfo

# Device types mpbench asks torch's fused AdamW on. CUDA: the kernel torch recommends (docs/step-costs.md).
# CPU too: its fused kernel measured 2-3x faster than the for-loop torch picks there (tiny and gpt2-small
# parameter sets, docs/step-costs.md) and steps within fp32 rounding of it (tests/test_step_costs.py), so
# CPU and GPU run the same branch, as DESIGN.md asks wherever torch allows.
FUSED_DEVICE_TYPES = frozenset({"cuda", "cpu"})


def fused_refusal(p: torch.Tensor, device: DeviceInfo) -> str | None:
    """Why torch's fused AdamW can't take parameter `p` on `device`, or None if it can.

    The same three checks as torch's `_default_to_fused_or_foreach(use_fused=True)`, with the device type
    taken from the resolved DeviceInfo rather than from `p` (so a test can ask about CUDA with CPU tensors)."""
    if device.type not in FUSED_DEVICE_TYPES:
        return f"mpbench does not ask for fused AdamW on {device.type}"
    if device.type not in _get_fused_kernels_supported_devices():
        return f"torch has no fused AdamW kernel for {device.type}"
    if type(p) not in _foreach_supported_types:
        return f"{type(p).__name__} parameters are not plain tensors (fused and foreach refuse tensor subclasses)"
    if not torch.is_floating_point(p):
        return f"{p.dtype} parameters are not floating point"
    return None


def adamw(
    groups: list[dict], device: DeviceInfo, lr: float, betas: tuple[float, float], eps: float, fused: bool = True
) -> torch.optim.AdamW:
    """torch AdamW over `groups`, fused for every parameter that allows it on `device`.

    A group with parameters fused refuses (a tensor subclass: torchao's int8 or MXFP8 weights) is split in
    two with the same settings: the fusable part fused, the rest left to torch's own default (foreach on
    CUDA for plain tensors, else the for-loop). The optimizer-wide `fused` is True only when every group is
    fused: it tells a GradScaler that the step unscales itself, which a non-fused group would not do.
    `fused=False` (a mode's `no_fused_adamw`): every group keeps torch's own default."""
    split: list[dict] = []
    for group in groups:
        fusable = [fused and fused_refusal(p, device) is None for p in group["params"]]
        ok = [p for p, f in zip(group["params"], fusable, strict=True) if f]
        rest = [p for p, f in zip(group["params"], fusable, strict=True) if not f]
        split += [group | {"params": ps, "fused": f} for ps, f in ((ok, True), (rest, None)) if ps]
    fused_all = True if all(g["fused"] for g in split) else None
    return torch.optim.AdamW(split, lr=lr, betas=betas, eps=eps, fused=fused_all)


def _group_impl(group: dict) -> str:
    """The implementation torch's `adam()` runs for one param group, resolved as it resolves it."""
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        return "fused"
    if fused is None and foreach is None:  # torch's default: foreach where it can, never fused
        params = [p for p in group["params"] if p.grad is not None] or list(group["params"])
        _, foreach = _default_to_fused_or_foreach(params, group.get("differentiable", False), use_fused=False)
        if foreach and isinstance(group["lr"], torch.Tensor) and not group.get("capturable", False):
            foreach = False
    return "foreach" if foreach else "for-loop"


def optimizer_impl(optimizer: torch.optim.Optimizer) -> str:
    """The record's `optimizer_impl`: what the built optimizer runs, from its own settings.

    torch Adam/AdamW: "torch AdamW (fused)", "(foreach)" or "(for-loop)", resolved the way torch resolves
    fused=None/foreach=None at step time; groups that differ are listed with their tensor counts. Any other
    optimizer names itself through an `impl` attribute, else by its class."""
    own = getattr(optimizer, "impl", None)
    if isinstance(own, str):
        return own
    name = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.Adam):
        return f"{type(optimizer).__module__}.{name}"
    counts: dict[str, int] = {}
    for group in optimizer.param_groups:
        if group["params"]:
            impl = _group_impl(group)
            counts[impl] = counts.get(impl, 0) + len(group["params"])
    if len(counts) <= 1:
        return f"torch {name} ({next(iter(counts), 'no parameters')})"
    return f"torch {name} (" + "; ".join(f"{impl}: {n} tensors" for impl, n in counts.items()) + ")"
