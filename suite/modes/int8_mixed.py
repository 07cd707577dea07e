"""int8 mixed-precision training: torchao's int8 Linear, int8 matmuls with dynamic row scales.

Stored: fp32 master weights, grads and AdamW state. Each block Linear quantizes its operands
row-wise to int8 (one scale per row, computed every step) for the forward and both backward
matmuls (`torch._int_mm`, int32 accumulate), then rescales. Elsewhere: bf16 autocast, on a CPU as
on a GPU (on a CPU the int8 matmuls are real, not emulated, and slow).

Why the swapped layers take fp32 inputs: each int8 matmul is rescaled by one row scale and one column
scale, each in the dtype of its operand, and on CUDA torchao's Triton kernel `scaled_int8_mm` asserts
`row_scale.dtype is col_scale.dtype` (torchao 0.18, prototype/quantized_training/int8_mm.py; the CPU
fallback, `torch._int_mm`, does not check). Under autocast, SDPA hands attn.c_proj a bf16 input: the
function casts the weight to bf16, adds the fp32 bias (output fp32), and the backward then pairs fp32
output-gradient scales with bf16 weight scales and asserts. A pre-hook casts every input to the
weight's dtype (fp32), as LayerNorm and GELU already hand the other three layers: forward, output,
gradients and all scales are fp32, the int8 matmul is the same, and the contract holds
(tests/test_kernel_contracts.py checks it at every layer, forward and backward).

Why `module_swap=True`: torchao 0.18's default config registers its `F.linear` override where
it is never called, so training is bit-identical to fp32 (FACTS.md). The swap replaces each
Linear by torchao's `Int8MixedPrecisionTrainingLinear`, whose forward calls the int8 function
itself; a test counts the `aten._int_mm` calls to prove it ran.
"""

from __future__ import annotations

import torch.nn as nn

from suite.hardware import DeviceInfo
from suite.modes.base import needs_capability
from suite.modes.torchao_calls import (
    SwappedLinearsMode,
    check_tokens,
    import_torchao,
    select_linears,
    to_weight_dtype,
)
from suite.policy import GEMM_KINDS

INT8_MULTIPLE = 8  # torch._int_mm on CUDA: K and N multiples of 8 (and M > 16)
_INT8 = "torchao.prototype.quantized_training"
_QUANTIZE = "torchao.quantization"


class Int8Mixed(SwappedLinearsMode):
    name = "int8-mixed"
    compute_dtype = "int8"
    summary = "fp32 master, int8 block matmuls with dynamic row scales (torchao), bf16 autocast elsewhere"
    needs = "torchao; CUDA 8.0+ or a CPU (real int8 matmuls, slow)"
    cpu_default = False

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        for module in (_INT8, _QUANTIZE):
            _, missing = import_torchao(module)
            if missing:
                return f"int8-mixed {missing}"
        if device.type == "cuda":  # int8 tensor-core matmuls from Ampere on (and bf16 elsewhere)
            return needs_capability(device, (8, 0), "int8-mixed")
        return None

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # Int8MixedPrecisionTrainingConfig: all three GEMMs in int8 (output, grad_input, grad_weight all True),
        # each operand quantized with one absmax scale per row (the format's rows run along the last dimension;
        # for the weight-gradient GEMM torchao scales along the token dimension instead). The int8 GEMMs
        # accumulate in int32 exactly and are rescaled into their fp32 operands' dtype (the pre-hook keeps the
        # inputs fp32), so the weight gradient is produced in fp32
        return self.kept_formats(layer) or self.with_high_gemms({"input": "int8-rowwise", "weight": "int8-rowwise",
                                            "grad_output": "int8-rowwise", "grad_weight": "fp32"})  # fmt: skip

    def kept_gemm_format(self, kind: str) -> str:
        # a GEMM kind torchao's config leaves out runs as `input @ weight.T` (or its backward twin) on the operands
        # as they are: fp32 (the pre-hook's), the forward under the mode's bf16 autocast, which casts the matmul's
        # operands to bf16, the backward outside it (the autograd Function's backward runs with autocast off), in
        # fp32 (torchao 0.18 prototype/quantized_training/int8_mixed_precision.py; a test captures the dtypes)
        return "bf16" if kind == "forward" else "fp32"

    def prepare(self, model: nn.Module) -> nn.Module:
        qt, missing = import_torchao(_INT8)
        quantization, missing_q = import_torchao(_QUANTIZE)
        if missing or missing_q:
            raise RuntimeError(f"int8-mixed {missing or missing_q}")
        converted, kept = select_linears(model, INT8_MULTIPLE, "int8 matmul", self.policy(model))
        chosen = set(converted)
        low = {kind: kind not in self.high_gemms for kind in GEMM_KINDS}  # kept kinds: torchao's plain matmuls
        config = qt.Int8MixedPrecisionTrainingConfig(
            output=low["forward"], grad_input=low["grad_input"], grad_weight=low["grad_weight"], module_swap=True
        )
        quantization.quantize_(model, config, filter_fn=lambda module, fqn: fqn in chosen)
        swapped = [f for f, m in model.named_modules() if isinstance(m, qt.Int8MixedPrecisionTrainingLinear)]
        if swapped != converted:  # torchao changed what module_swap does: say so, don't train fp32 silently
            raise RuntimeError(f"int8-mixed: torchao swapped {swapped}, expected {converted}")
        for fqn in converted:
            model.get_submodule(fqn).register_forward_pre_hook(to_weight_dtype)  # fp32: the scales' dtypes agree
        check_tokens(model, INT8_MULTIPLE, self.name)
        self.keep_layers(converted, kept)
        return model
