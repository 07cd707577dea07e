"""NVFP4 training: e2m1 values, an e4m3 scale per 16 elements under an fp32 per-tensor scale, in all three GEMMs.

Stored: fp32 master weights, grads and AdamW state; bf16 autocast elsewhere, as for the 8-bit modes. The recipe
is NVIDIA's NVFP4 pretraining recipe (arXiv 2509.25149), each part a recorded switch (`--fp4-recipe`,
suite/policy.py), all on by default: 16 x 16 (2-D) weight scales (`2d`), stochastic rounding of the output
gradient (`sr`), a 16 x 16 random Hadamard transform on both operands of the weight-gradient GEMM (`rht`). The
layer policy (`--keep-high`, default `last:15%,lm_head` from the same paper) keeps blocks, the LM head or GEMM
kinds in bf16 (docs/fp4.md).

Two paths, one per case, chosen in `prepare`:

- native: torchao 0.18's NVFP4 training Linear (torchao/prototype/moe_training/nvfp4_training: `NVFP4Linear`,
  `nvfp4_mm_triton`), on a GPU of compute capability 10.0+ with Triton. Its contract (nvfp4_linear.py): a bf16
  input whose shape[-2] (the sequence, for a (B, T, C) input) and in/out features are multiples of 128, and it
  always runs sr + rht + 2-D weights, with no switch per GEMM. It is taken only where all of that holds and the
  case runs the default recipe with no GEMM kind kept high. The weight is presented to it as bf16 through a
  differentiable cast (a parametrization, as mxfp8 does: the gradient reaches the fp32 master) and the input is
  cast to it, so the kernels get what their Triton casts accept.
- emulated: FP4Linear (suite/modes/fp4_linear.py), quantize-dequantize around each GEMM in fp32 on any device,
  with every switch and any GEMM kind kept high. Marked `emulated`, speed figures null. On a 10.0+ GPU a case
  that breaks the native contract runs here, and its record's `emulated_reason` says why.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from suite.hardware import DeviceInfo
from suite.modes.base import EMULATED, needs_emulation
from suite.modes.mxfp8 import AsDtype
from suite.modes.torchao_calls import (
    SwappedLinearsMode,
    import_torchao,
    select_linears,
    swap_linears,
    to_bf16,
)
from suite.policy import FP4Recipe, LayerPolicy, parse_fp4_recipe

NATIVE_MULTIPLE = 128  # nvfp4_mm_triton: M (input.shape[-2]), K and N all multiples of 128
NATIVE_MODULE = "torchao.prototype.moe_training.nvfp4_training.nvfp4_training"


def has_triton() -> bool:
    """Whether Triton is usable here: torchao's NVFP4 kernels are defined only then (else they raise)."""
    from torch.utils._triton import has_triton as torch_has_triton

    return torch_has_triton()


class FP4Mode(SwappedLinearsMode):
    """Base of the 4-bit modes: every block Linear the policy converts becomes FP4Linear (the emulated path); a
    subclass may take a native path in `native_linear`. The converted GEMMs' operands are `fmt`; the weight
    gradient comes back bf16 (FP4Linear's result dtype) and autograd casts it to the fp32 master's .grad."""

    fmt: ClassVar[str] = ""
    block: ClassVar[int] = 0  # elements per scale, along each GEMM's reduction dimension
    cpu_default = False  # emulated in fp32: several times fp32's step time on a CPU

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.native_refused: str | None = None  # why this case left the device's native path

    def recipe(self) -> FP4Recipe:
        return parse_fp4_recipe(self.name, self.fp4_recipe)

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # FP4Linear and torchao's NVFP4Linear quantize the input, the weight and the output gradient to the 4-bit
        # format for the GEMMs they feed, and return bf16 (the weight gradient included). The 2-D weight scales
        # and the Hadamard-transformed operands are variants of the format that suite.modes.formats does not
        # name: the statistics of --numerics are the 1-D format's
        fmt = self.fmt
        return self.kept_formats(layer) or self.with_high_gemms(
            {"input": fmt, "weight": fmt, "grad_output": fmt, "grad_weight": "bf16"}
        )

    def native_linear(self, policy: LayerPolicy, converted: list[str], model: nn.Module) -> object | None:
        """A function old Linear -> native Linear when this case runs native kernels here, else None (and
        `native_refused` says why, where the device itself had them)."""
        return None

    def prepare(self, model: nn.Module) -> nn.Module:
        policy = self.policy(model)
        converted, kept = select_linears(model, self.block, self.fmt.upper(), policy)
        native = self.native_linear(policy, converted, model)
        if native is None:
            from suite.modes.fp4_linear import FP4Linear

            recipe, high = self.recipe(), policy.gemms
            swap_linears(model, converted, lambda old: FP4Linear.from_linear(old, self.fmt, recipe, high))
        else:
            swap_linears(model, converted, native)
        self.keep_layers(converted, kept)
        return model

    def layer_fields(self) -> dict[str, object]:
        fields = dict(super().layer_fields())
        if self.native_refused:  # the class said native (decide): this case is not, and says why
            fields |= {"emulated": True, "emulated_reason": f"{self.native_refused}: {EMULATED}"}
        return fields


class NVFP4(FP4Mode):
    name = "nvfp4"
    compute_dtype = "nvfp4"
    fmt = "nvfp4"
    block = 16
    summary = "fp32 master, NVFP4 matmuls (16-blocks, e4m3 + fp32 scales; sr, rht, 2-D weights), bf16 autocast"
    needs = "CUDA 10.0+ with torchao and Triton for native kernels (emulated on a CPU, or below 10.0 with --emulate)"

    @classmethod
    def emulation_reason(cls, device: DeviceInfo) -> str | None:
        why = needs_emulation(device, (10, 0), "NVFP4 matmuls")
        if why is None and device.capability[0] != 10:
            # torchao's NVFP4 training kernels are written for sm_100-class parts (B200, B300: 10.x): inline PTX
            # `cvt.rs.satfinite.e2m1x4` and tensor-descriptor loads (hadamard_utils.py, the *_triton.py kernels);
            # torchao's own gate (is_sm_at_least_100) lets 12.x consumer parts through, unchecked
            have = ".".join(map(str, device.capability))
            why = f"NVFP4 matmuls: torchao's NVFP4 training kernels target compute capability 10.x; this GPU is {have}"
        if why is None:
            _, missing = import_torchao(NATIVE_MODULE)
            if missing:
                why = f"NVFP4 matmuls: torchao's NVFP4 training Linear is not available here ({missing})"
            elif not has_triton():
                why = "NVFP4 matmuls: torchao's NVFP4 training Linear runs Triton kernels and Triton is not installed"
        return why

    def native_refusal(self, policy: LayerPolicy, converted: list[str], model: nn.Module) -> str | None:
        """Why this case cannot run torchao's NVFP4Linear (its contract, nvfp4_linear.py), or None."""
        recipe = self.recipe()
        if recipe != parse_fp4_recipe(self.name, ""):
            return f"torchao's NVFP4 Linear always runs sr,rht,2d; this case's recipe is {recipe.text()}"
        if policy.gemms:
            return f"torchao's NVFP4 Linear quantizes every GEMM; this case keeps {','.join(policy.gemms)} in bf16"
        for fqn in converted:
            layer = model.get_submodule(fqn)
            if layer.in_features % NATIVE_MULTIPLE or layer.out_features % NATIVE_MULTIPLE:
                return (f"torchao's NVFP4 Linear needs in and out features that are multiples of {NATIVE_MULTIPLE}; "
                        f"{fqn} is {layer.in_features} x {layer.out_features}")  # fmt: skip
        return None

    def native_linear(self, policy: LayerPolicy, converted: list[str], model: nn.Module) -> object | None:
        if self.emulated:  # the device has no native kernels: the record already says why
            return None
        self.native_refused = self.native_refusal(policy, converted, model)
        if self.native_refused:
            self.emulated = True
            return None
        ao, missing = import_torchao(NATIVE_MODULE)
        if missing:
            raise RuntimeError(f"nvfp4 {missing}")
        model.register_forward_pre_hook(check_sequence)

        native = native_class(ao)

        def rebuild(old: nn.Linear) -> nn.Module:
            new = native.from_linear(old)  # reuses old's Parameters; SR seed and RHT signs drawn here
            # the Triton casts take bf16: the weight seen as bf16 (gradient to the fp32 master), the input cast to it
            parametrize.register_parametrization(new, "weight", AsDtype(torch.bfloat16), unsafe=True)
            new.register_forward_pre_hook(to_bf16)
            return new

        return rebuild


def native_class(ao: object) -> type:
    """torchao's NVFP4Linear with the bias added outside its autograd Function, in the output's dtype.

    torchao's `nvfp4_mm_triton.forward` adds the bias as given (`output = output + bias`, nvfp4_linear.py): GPT-2's
    fp32 bias makes the bf16 output fp32, so the Function's backward gets an fp32 output gradient and its Triton
    casts raise ("Expected bfloat16", triton_rht_amax). Here the Function gets no bias and the bias is added to its
    bf16 output cast to bf16, as autocast adds a plain Linear's: the output gradient stays bf16, and the bias's
    gradient reaches the fp32 Parameter through the cast."""

    class BiasOutsideNVFP4Linear(ao.NVFP4Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = ao.nvfp4_linear(x, self.weight, None, kernel_preference=self.kernel_preference,
                                  sr_seed=self._sr_seed, sign_vector=self.rht_sign_vector)  # fmt: skip
            return out if self.bias is None else out + self.bias.to(out.dtype)

    return BiasOutsideNVFP4Linear


def check_sequence(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the model on the native path: torchao's NVFP4 GEMMs take a (B, T, C) input's T as their
    M and need it a multiple of 128; fail with one line naming the fix before any kernel does."""
    idx = args[0]  # (B, T) token ids
    if idx.shape[-1] % NATIVE_MULTIPLE:
        raise ValueError(
            f"seq_len={idx.shape[-1]}: nvfp4's native kernels need a multiple of {NATIVE_MULTIPLE}; change --seq-len"
        )
