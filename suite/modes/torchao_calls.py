"""The torchao boundary of the 8-bit training modes: imports, layer selection, module swaps.

Every torchao import goes through `import_torchao`, which turns a missing or broken torchao
into a one-line reason (the mode is then `skipped`), and keeps torchao's expected warnings
about its CUDA extensions quiet on a CPU build of torch.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from suite.hardware import DeviceInfo
from suite.modes.base import PrecisionMode, cast_formats


def import_torchao(module: str) -> tuple[ModuleType | None, str | None]:
    """(the torchao module, None), or (None, why it cannot be imported)."""
    log = logging.getLogger("torchao")
    level = log.level
    if torch.version.cuda is None:  # a CPU build: torchao's CUDA extensions cannot load, as expected
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module), None
    except Exception as exc:  # ImportError, or an extension that fails at import time
        return None, f"needs torchao ({module}: {type(exc).__name__}: {exc}); pip install torchao"
    finally:
        log.setLevel(level)


def has_cuda_kernel(op: str) -> bool:
    """Whether operator `op` ("namespace::name") has a CUDA kernel registered in this process. torchao defines
    some of its ops in Python and implements them in a C extension: when that extension failed to load (a
    build for another CUDA), the op exists and the first call fails ("Could not run ... with arguments from
    the 'CUDA' backend")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except RuntimeError:  # the op is not defined at all
        return False


def select_linears(model: nn.Module, multiple: int, what: str) -> tuple[list[str], list[str]]:
    """(converted, kept): the transformer blocks' Linears whose in and out features are both
    multiples of `multiple`, and every other Linear as "name (in x out): why it stays"."""
    converted, kept = [], []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        shape = f"{fqn} ({module.in_features} x {module.out_features})"
        if not fqn.startswith("blocks."):
            # the LM head shares its weight with the token embedding (tied): converting it would
            # route the embedding's matrix through the 8-bit matmul too; GPT-2's vocab (50257)
            # is not a multiple of 16 either. torchtitan leaves its output layer out as well.
            kept.append(f"{shape}: outside the transformer blocks (LM head, tied to the embedding)")
        elif module.in_features % multiple or module.out_features % multiple:
            kept.append(f"{shape}: {what} needs both dimensions to be multiples of {multiple}")
        else:
            converted.append(fqn)
    return converted, kept


def swap_linears(model: nn.Module, fqns: list[str], make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace each named Linear by `make(old)` in place."""
    for fqn in fqns:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))


def check_tokens(model: nn.Module, multiple: int, what: str) -> None:
    """On CUDA, fail early and clearly when tokens per step (B*T) are not a multiple of `multiple`:
    the 8-bit weight-gradient matmul runs over the token dimension (grad_out^T @ input)."""

    def hook(module: nn.Module, args: tuple) -> None:
        idx = args[0]  # (B, T) token ids
        if idx.is_cuda and idx.numel() % multiple:
            raise ValueError(
                f"batch_size x seq_len = {idx.shape[0]} x {idx.shape[1]} = {idx.numel()} tokens: {what} on CUDA "
                f"needs a multiple of {multiple}; change --batch-size or --seq-len"
            )

    model.register_forward_pre_hook(hook)


@contextlib.contextmanager
def inductor_patch_restored() -> Iterator[None]:
    """Undo, on exit, what `convert_to_float8_training` changes for the whole process.

    torchao 0.18 replaces inductor's `TritonOverrides.minimum/maximum` (Triton code generation
    for min/max; a numerically identical workaround for a Triton fp8 store bug) and marks it
    done in `torchao.float8._inductor_patch._PATCHED`. Both are put back, so a later case in
    the same process compiles as it would have.
    """
    try:
        from torch._inductor.codegen.triton import TritonOverrides
    except Exception:  # no inductor Triton backend here: torchao patches nothing either
        yield
        return
    saved = {name: TritonOverrides.__dict__.get(name) for name in ("minimum", "maximum")}
    patch, _ = import_torchao("torchao.float8._inductor_patch")
    flag = getattr(patch, "_PATCHED", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is not None:
                setattr(TritonOverrides, name, value)
        if patch is not None and flag is not None:
            patch._PATCHED = flag


def to_autocast_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the input in its device's autocast dtype where autocast is on. torchao's Float8Linear
    does this itself for CUDA autocast only; the hook gives a CPU run the GPU's dtype flow (on a GPU it is a no-op)."""
    x = args[0]
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return (x, *args[1:])


def to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the input in the dtype of the layer's weight (as a parametrization presents it)."""
    return (args[0].to(module.weight.dtype), *args[1:])


def master_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the optimizer steps: under a dtype parametrization its original; torchao's int8 weight
    (int8 data x per-row scale) dequantized."""
    weight = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
    return weight.dequantize() if getattr(weight, "int_data", None) is not None else weight


@torch.no_grad()
def fp32_copy(model: nn.Module, fqns: list[str]) -> nn.Module:
    """A copy of `model` for the strict-fp32 held-out loss: each named layer replaced by a plain fp32
    nn.Linear with its master weight and bias, so no torchao class, kernel, cast hook or parametrization is
    left; every other module copied as it is (the tied embedding stays tied)."""

    def plain(layer: nn.Module) -> nn.Linear:
        weight = master_weight(layer)
        new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
        new.weight.copy_(weight)  # copy_ converts to the new layer's fp32
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        return new

    memo = {id(model.get_submodule(fqn)): plain(model.get_submodule(fqn)) for fqn in fqns}
    return copy.deepcopy(model, memo)  # the memo puts the plain layers where the swapped ones were


class SwappedLinearsMode(PrecisionMode):
    """Base of the modes that swap the blocks' Linears for torchao's (fp8, MXFP8, int8 matmuls): fp32 master
    weights, bf16 autocast on every device (CPU autocast has bf16, so a CPU run takes the GPU's dtype flow and
    checks its kernels' contracts; tests/test_kernel_contracts.py), and the record of which layers were
    converted and which kept. Subclasses set `compute_dtype` and `prepare`, which calls `keep_layers`."""

    compute_dtype: ClassVar[str] = ""  # the peak FLOP/s column the mode is measured against

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.compute = self.compute_dtype
        self.emulated = type(self).emulation_reason(device) is not None
        self.autocast_dtype = torch.bfloat16
        self._layers: dict[str, list[str]] = {}

    def keep_layers(self, converted: list[str], kept: list[str]) -> None:
        """Remember, for the record, which Linears `prepare` converted and which it left alone."""
        self._layers = {"converted_layers": converted, "unconverted_layers": kept}

    def layer_fields(self) -> dict[str, list[str]]:
        return self._layers

    def kept_formats(self, layer: str | None) -> dict[str, str] | None:
        """The formats of a Linear `prepare` left alone (the LM head, odd shapes): a plain Linear under bf16
        autocast, bf16 in every role. None for a converted Linear (layer None: a converted one)."""
        if layer is None or layer in self._layers.get("converted_layers", []):
            return None
        return cast_formats(self.autocast_dtype)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The fp32 master weights in plain Linears: the held-out loss measures what training produced, in
        strict fp32 as for every mode, not the 8-bit forward (the loss curve has that)."""
        return fp32_copy(model, self._layers.get("converted_layers", []))
