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
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from suite.hardware import DeviceInfo
from suite.modes.base import CAST_FORMATS, PrecisionMode, cast_formats
from suite.policy import DEFAULT_POLICY, GEMM_KINDS, LayerPolicy, check_gemms, gemm_kinds, parse_policy

# The operands of each GEMM kind of a Linear (suite.metrics.roofline's orientation): forward x @ W^T, grad_input
# dy @ W, grad_weight dy^T @ x
GEMM_OPERANDS: dict[str, tuple[str, str]] = {
    "forward": ("input", "weight"),
    "grad_input": ("grad_output", "weight"),
    "grad_weight": ("grad_output", "input"),
}


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


def select_linears(model: nn.Module, multiple: int, what: str, policy: LayerPolicy) -> tuple[list[str], list[str]]:
    """(converted, kept): the transformer blocks' Linears and the LM head whose in and out features are both
    multiples of `multiple` and which `policy` does not keep high, and every other Linear as
    "name (in x out): why it stays". The LM head is tied to the token embedding (models/gpt.py): a mode that
    converts it must keep that tie (the swapped module holds the same Parameter object)."""
    n_layer = len(model.blocks)  # type: ignore[arg-type]
    converted, kept = [], []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        shape = f"{fqn} ({module.in_features} x {module.out_features})"
        if why := policy.why_kept(fqn, n_layer):
            kept.append(f"{shape}: {why}")
        elif not (fqn.startswith("blocks.") or fqn == "lm_head"):
            kept.append(f"{shape}: neither in a transformer block nor the LM head")
        elif module.in_features % multiple or module.out_features % multiple:
            hint = " (--vocab-multiple 64 rounds the vocabulary up)" if fqn == "lm_head" else ""
            kept.append(f"{shape}: {what} needs both dimensions to be multiples of {multiple}{hint}")
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


def to_bf16(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the input as bf16, for a layer whose weight a parametrization presents as bf16 (mxfp8,
    native nvfp4). `to_weight_dtype` would read `module.weight` to learn that, and reading it runs the
    parametrization: one more fp32 -> bf16 cast of the weight per layer and forward."""
    return (args[0].to(torch.bfloat16), *args[1:])


def to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the input in the dtype of the layer's weight (as a parametrization presents it)."""
    return (args[0].to(module.weight.dtype), *args[1:])


class AsDtype(nn.Module):
    """Parametrization: the weight as `dtype`, a differentiable cast (the optimizer steps the original)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)


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
        if weight.dtype == new.weight.dtype:  # a tied master (the LM head's, the embedding's): tied in the copy too
            memo[id(weight)] = new.weight
        return new

    memo: dict[int, object] = {}
    for fqn in fqns:
        memo[id(model.get_submodule(fqn))] = plain(model.get_submodule(fqn))
    return copy.deepcopy(model, memo)  # the memo puts the plain layers where the swapped ones were


class SwappedLinearsMode(PrecisionMode):
    """Base of the modes that swap Linears for torchao's (fp8, MXFP8, int8 matmuls): fp32 master weights, bf16
    autocast on every device (CPU autocast has bf16, so a CPU run takes the GPU's dtype flow and checks its kernels'
    contracts; tests/test_kernel_contracts.py), a layer policy (suite/policy.py: which Linears and which GEMM kinds
    stay in bf16), and the record of which layers were converted, which kept, and the format each GEMM ran in.
    Subclasses set `compute_dtype` and `prepare`, which calls `select_linears(..., self.policy(model))` and
    `keep_layers`."""

    compute_dtype: ClassVar[str] = ""  # the peak FLOP/s column the mode is measured against

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.compute = self.compute_dtype
        self.emulated = type(self).emulation_reason(device) is not None
        self.autocast_dtype = torch.bfloat16
        self._layers: dict[str, list[str]] = {}
        self._formats: dict[str, dict[str, str]] = {}
        self.configure("", "")  # the mode's defaults until the case says otherwise

    def configure(self, keep_high: str, fp4_recipe: str) -> None:
        """The case's layer policy ("": the mode's default, DEFAULT_POLICY) and 4-bit recipe, as text: the policy
        resolves against the model in `policy(model)`; its GEMM kinds are known now (they do not depend on it)."""
        self.keep_high = keep_high or DEFAULT_POLICY.get(self.name, "")
        self.fp4_recipe = fp4_recipe
        self.high_gemms = gemm_kinds(self.keep_high)

    def policy(self, model: nn.Module) -> LayerPolicy:
        """The case's policy resolved against `model`'s depth; ValueError (field keep_high) for one the model or
        this mode cannot have (a Case has refused those already)."""
        return check_gemms(self.name, parse_policy(self.keep_high, len(model.blocks)))  # type: ignore[arg-type]

    def kept_gemm_format(self, kind: str) -> str:
        """The format a GEMM kind the policy keeps high runs in, inside a converted Linear: bf16 operands (the
        mode's autocast dtype). A mode whose kept GEMMs run otherwise says so here."""
        return CAST_FORMATS[self.autocast_dtype]

    def converted_gemm_formats(self) -> dict[str, str]:
        """The format each GEMM kind of a converted Linear runs in: a kept kind's `kept_gemm_format`, any other
        from `tensor_formats()`'s operands ("e4m3-tensorwise", or "e5m2-tensorwise x e4m3-tensorwise" where the
        two operands differ)."""
        roles = self.tensor_formats(None)
        formats = {}
        for kind in GEMM_KINDS:
            a, b = (roles[r] for r in GEMM_OPERANDS[kind])
            formats[kind] = self.kept_gemm_format(kind) if kind in self.high_gemms else a if a == b else f"{a} x {b}"
        return formats

    def with_high_gemms(self, roles: dict[str, str]) -> dict[str, str]:
        """A converted Linear's role formats (`tensor_formats`) under the policy's kept GEMM kinds: an operand
        keeps its low format while any GEMM that quantizes it runs; once every GEMM it enters is kept high it is
        in their format (the widest where they differ). layer_formats has the exact format of each GEMM."""
        out = dict(roles)
        for role in ("input", "weight", "grad_output"):
            kinds = [k for k, operands in GEMM_OPERANDS.items() if role in operands]
            if all(k in self.high_gemms for k in kinds):
                out[role] = "fp32" if "fp32" in {self.kept_gemm_format(k) for k in kinds} else "bf16"
        return out

    def keep_layers(self, converted: list[str], kept: list[str]) -> None:
        """Remember, for the record, which Linears `prepare` converted, which it left alone, and the format each
        GEMM of every Linear runs in (a kept Linear: a plain Linear under bf16 autocast, bf16 throughout)."""
        self._layers = {"converted_layers": converted, "unconverted_layers": kept}
        plain = dict.fromkeys(GEMM_KINDS, CAST_FORMATS[self.autocast_dtype])
        low = self.converted_gemm_formats()
        self._formats = {entry.split(" ")[0]: dict(plain) for entry in kept} | {f: dict(low) for f in converted}

    def layer_fields(self) -> dict[str, Any]:
        return {**self._layers, "layer_formats": self._formats} if self._layers else {}

    def kept_formats(self, layer: str | None) -> dict[str, str] | None:
        """The formats of a Linear `prepare` left alone (the policy's, odd shapes): a plain Linear under bf16
        autocast, bf16 in every role. None for a converted Linear (layer None: a converted one)."""
        if layer is None or layer in self._layers.get("converted_layers", []):
            return None
        return cast_formats(self.autocast_dtype)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The fp32 master weights in plain Linears: the held-out loss measures what training produced, in
        strict fp32 as for every mode, not the 8-bit forward (the loss curve has that)."""
        return fp32_copy(model, self._layers.get("converted_layers", []))
