"""MXFP8 training: torchao's MXFP8 Linear (32-element blocks, one power-of-two e8m0 scale each).

Stored: fp32 master weights, grads and AdamW state. Each block Linear quantizes its input,
weight and output gradient to MXFP8 (e4m3 elements) inside the forward and both backward
matmuls, and returns a high-precision result. Blackwell (10.0) tensor cores scale the
blocks in hardware; elsewhere the matmuls are emulated (dequantize, high-precision matmul:
torchao's `KernelPreference.EMULATED`).

Why `MXFP8Linear` and not `quantize_(model, MXFP8TrainingOpConfig(...))`: in torchao 0.18
the latter drops the Linear bias (pytorch/ao#4846). Here each Linear is rebuilt with its bias
and its old weights loaded (tests check the bias survives and trains). The layer adds its
bias in the dtype of its output and needs input and weight in one dtype, so inputs are cast
to the weight's dtype (fp32) on the way in; the matmul itself is MXFP8 either way.
"""

from __future__ import annotations

import torch.nn as nn

from suite.hardware import DeviceInfo
from suite.modes.base import needs_emulation
from suite.modes.torchao_calls import SwappedLinearsMode, check_tokens, import_torchao, select_linears, swap_linears

MX_BLOCK = 32  # elements per scale, along the reduction dimension of every matmul
_MXFP8 = "torchao.prototype.moe_training.mxfp8_linear"
_KERNELS = "torchao.quantization.quantize_.common.kernel_preference"


def _to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x.to(module.weight.dtype), *args[1:])


class MXFP8(SwappedLinearsMode):
    name = "mxfp8"
    compute_dtype = "mxfp8"
    summary = "fp32 master, MXFP8 block-scaled matmuls (torchao), bf16 autocast elsewhere on a GPU"
    needs = "torchao; CUDA 10.0+ (emulated on a CPU, or below 10.0 with --emulate)"
    cpu_default = False  # emulated: several times fp32's step time on a CPU

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        for module in (_MXFP8, _KERNELS):
            _, missing = import_torchao(module)
            if missing:
                return f"mxfp8 {missing}"
        return None

    @classmethod
    def emulation_reason(cls, device: DeviceInfo) -> str | None:
        return needs_emulation(device, (10, 0), "MXFP8 matmuls")

    def prepare(self, model: nn.Module) -> nn.Module:
        mx, missing = import_torchao(_MXFP8)
        kernels, missing_kernels = import_torchao(_KERNELS)
        if missing or missing_kernels:
            raise RuntimeError(f"mxfp8 {missing or missing_kernels}")
        pref = kernels.KernelPreference.EMULATED if self.emulated else kernels.KernelPreference.AUTO
        converted, kept = select_linears(model, MX_BLOCK, "MXFP8")

        def rebuild(old: nn.Linear) -> nn.Module:
            new = mx.MXFP8Linear(old.in_features, old.out_features, bias=old.bias is not None,
                                 kernel_preference=pref, device=old.weight.device, dtype=old.weight.dtype)  # fmt: skip
            new.load_state_dict(old.state_dict())  # weight and bias, exactly
            new.register_forward_pre_hook(_to_weight_dtype)
            return new

        swap_linears(model, converted, rebuild)
        check_tokens(model, MX_BLOCK, self.name)
        self.keep_layers(converted, kept)
        return model
