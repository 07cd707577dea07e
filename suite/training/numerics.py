"""Watching a Linear's four tensors on a sampled step: the hooks exist only while `watch` is open.

The roles of a Linear y = x W^T + b in its three GEMMs: forward (input x, weight W), input gradient
(grad_output dL/dy, W) and weight gradient (grad_output, x), whose result is grad_weight dL/dW.

- input: the Linear's first argument as it arrives (before autocast casts it inside F.linear);
- weight: the weight the mode steps (fp32 master, pure-16-bit storage, int8 dequantized);
- grad_output: dL/dy as backward hands it to the Linear (scaled by the loss scale in loss-scaled modes);
- grad_weight: the parameter's .grad once backward has accumulated it (still scaled in loss-scaled
  modes; for a weight tied to another module, the sum of both modules' contributions).

An unsampled step runs with no hook at all: `watch` registers them on entry and removes them on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from suite.metrics.fidelity import plain
from suite.modes.torchao_calls import master_weight

ROLES: tuple[str, ...] = ("input", "weight", "grad_output", "grad_weight")
# on_tensor(layer, role, tensor): called inside the hooks with the live tensor; it must not modify it
OnTensor = Callable[[str, str, torch.Tensor], None]


def linear_layers(model: nn.Module) -> list[str]:
    """The fully qualified names of the model's Linears, in module order (call it on the fp32 model,
    before a mode swaps its Linears for its own modules: the names stay, the classes change)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


@contextlib.contextmanager
def watch(model: nn.Module, layers: list[str], on_tensor: OnTensor) -> Iterator[None]:
    """Call `on_tensor` with each named layer's input, weight, grad_output and grad_weight of the steps run
    inside; every hook is removed on exit, exceptions included."""
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            on_tensor(name, "input", args[0].detach())
            on_tensor(name, "weight", plain(master_weight(module)))
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda g: on_tensor(name, "grad_output", g.detach()))

        return hook

    def grad_hook(name: str) -> Callable:
        def hook(param: torch.Tensor) -> None:
            on_tensor(name, "grad_weight", plain(param.grad))

        return hook

    try:
        for name in layers:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(forward_hook(name)))
            weight = master_weight(module)
            if weight.requires_grad:
                handles.append(weight.register_post_accumulate_grad_hook(grad_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
