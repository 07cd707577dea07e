"""MXFP8 training: torchao's MXFP8 Linear (32-element blocks, one power-of-two e8m0 scale each).

Stored: fp32 master weights, grads and AdamW state. Each block Linear quantizes its input,
weight and output gradient to MXFP8 (e4m3 elements) inside the forward and both backward
matmuls, and returns a high-precision result. Blackwell (10.0) tensor cores scale the
blocks in hardware; elsewhere the matmuls are emulated (dequantize, high-precision matmul:
torchao's `KernelPreference.EMULATED`).

Why `MXFP8Linear` and not `quantize_(model, MXFP8TrainingOpConfig(...))`: in torchao 0.18
the latter drops the Linear bias (pytorch/ao#4846). Here each Linear is rebuilt with its bias
and its old weights loaded (tests check the bias survives and trains).

Why bf16 operands: on a Blackwell GPU (KernelPreference.AUTO) torchao casts the input, the weight and
the output gradient to MXFP8 with a Triton kernel that takes bf16 only (`triton_to_mxfp8_dim0`: "only
bfloat16 inputs are supported"; its CUDA dim1 kernel wants them contiguous, 2-D, both dimensions
multiples of 32; torchao 0.18, prototype/mx_formats/kernels.py and csrc mxfp8_extension.cpp); the
emulated path takes fp32 too. torchao expects FSDP's bf16 param dtype to supply a bf16 weight; here the
fp32 master weight is presented to the layer as bf16 through a parametrization (a differentiable cast,
as autocast does for a plain Linear: the gradient reaches the fp32 master) and the input is cast to
it, so the forward, the output (bf16, bias added in bf16) and the output gradient are bf16 on every
device, and a CPU test checks the GPU kernels' contract at every layer, forward and backward.

Why a Blackwell GPU can still be "emulated": the backward's dim1 casts call `torch.ops.torchao.mxfp8_quantize`
(`MXFP8Dim1CastKernelChoice.CUDA`, fixed in `_to_mxfp8_then_scaled_mm`), which torchao defines in Python on
10.0+ GPUs and implements in its `_C_mxfp8` C extension. A torchao build whose extension does not load here
(PyPI's wheel beside torch+cu130, say) would crash at the first backward; the mode is then skipped, or runs
emulated with --emulate, and says why (`mpbench doctor`'s torchao_c_extension check gives the fix).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from suite.hardware import DeviceInfo
from suite.modes.base import needs_emulation
from suite.modes.torchao_calls import (
    AsDtype,
    SwappedLinearsMode,
    check_tokens,
    has_cuda_kernel,
    import_torchao,
    select_linears,
    swap_linears,
    to_bf16,
)

MX_BLOCK = 32  # elements per scale, along the reduction dimension of every matmul
_MXFP8 = "torchao.prototype.moe_training.mxfp8_linear"
_KERNELS = "torchao.quantization.quantize_.common.kernel_preference"
_MX_CASTS = "torchao.prototype.mx_formats.kernels"  # defines torchao::mxfp8_quantize on 10.0+ GPUs
_CUDA_CAST = "torchao::mxfp8_quantize"


class MXFP8(SwappedLinearsMode):
    name = "mxfp8"
    compute_dtype = "mxfp8"
    summary = "fp32 master, MXFP8 block-scaled matmuls (torchao, bf16 operands), bf16 autocast elsewhere"
    needs = "torchao; CUDA 10.0+ (emulated on a CPU, or below 10.0 with --emulate)"
    cpu_default = False  # emulated: several times fp32's step time on a CPU

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # MXFP8Linear quantizes input, weight (its bf16 view) and grad_output to MXFP8 (e4m3 elements, one
        # e8m0 scale per 32) for all three GEMMs; the weight-gradient GEMM returns bf16 (the weight's dtype as
        # the parametrization presents it), which the cast's backward hands to the fp32 master's .grad. Its
        # scales are RCEIL (MXFP8Linear's default scale_calculation_mode, torchao 0.18 prototype/moe_training/
        # mxfp8_linear.py), not to_mx's FLOOR: FLOOR would report saturation the mode never has
        return self.kept_formats(layer) or self.with_high_gemms({"input": "mxfp8-rceil", "weight": "mxfp8-rceil",
                                            "grad_output": "mxfp8-rceil", "grad_weight": "bf16"})  # fmt: skip

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        for module in (_MXFP8, _KERNELS):
            _, missing = import_torchao(module)
            if missing:
                return f"mxfp8 {missing}"
        return None

    @classmethod
    def emulation_reason(cls, device: DeviceInfo) -> str | None:
        why = needs_emulation(device, (10, 0), "MXFP8 matmuls")
        if why is None:  # a Blackwell GPU: torchao's native path needs its CUDA cast kernel
            import_torchao(_MX_CASTS)
            if not has_cuda_kernel(_CUDA_CAST):
                why = (
                    f"MXFP8 matmuls: torchao's CUDA cast {_CUDA_CAST} (its _C_mxfp8 extension) is not loaded, "
                    "so the native kernels would fail at the first backward; `mpbench doctor` gives the fix"
                )
        return why

    def prepare(self, model: nn.Module) -> nn.Module:
        mx, missing = import_torchao(_MXFP8)
        kernels, missing_kernels = import_torchao(_KERNELS)
        if missing or missing_kernels:
            raise RuntimeError(f"mxfp8 {missing or missing_kernels}")
        pref = kernels.KernelPreference.EMULATED if self.emulated else kernels.KernelPreference.AUTO
        converted, kept = select_linears(model, MX_BLOCK, "MXFP8", self.policy(model))  # refuses forward, grad_input
        wgrad_hp = "grad_weight" in self.high_gemms  # MXFP8Linear's one per-GEMM switch: dy^T @ x on bf16 operands

        def rebuild(old: nn.Linear) -> nn.Module:
            new = mx.MXFP8Linear(old.in_features, old.out_features, bias=old.bias is not None, kernel_preference=pref,
                                 wgrad_with_hp=wgrad_hp, device="meta")  # fmt: skip
            # the same Parameter objects, not copies: the optimizer steps them, and a tied LM head stays tied
            new.weight, new.bias = old.weight, old.bias
            # the MX cast kernels' input dtype: the weight seen as bf16, the input cast to it
            parametrize.register_parametrization(new, "weight", AsDtype(torch.bfloat16), unsafe=True)
            new.register_forward_pre_hook(to_bf16)
            return new

        swap_linears(model, converted, rebuild)
        check_tokens(model, MX_BLOCK, self.name)
        self.keep_layers(converted, kept)
        return model
