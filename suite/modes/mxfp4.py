"""MXFP4 training: e2m1 values with one power-of-two (e8m0) scale per 32 elements, in all three GEMMs.

Stored: fp32 master weights, grads and AdamW state; bf16 autocast elsewhere. The recipe follows Tseng et al.,
"Training LLMs with MXFP4" (arXiv 2502.20586): stochastic rounding of the output gradient (`sr`) and a random
Hadamard transform on the weight-gradient GEMM's operands (`rht`), both on by default and each a recorded switch
(`--fp4-recipe`); MX scales are per 1 x 32 block, so there is no 2-D weight switch. The layer policy default is
the NVFP4 recipe's (`last:15%,lm_head`), so the two 4-bit formats compare alike (docs/fp4.md).

Always emulated: torchao 0.18 has MXFP4 tensors (prototype/mx_formats) but no MXFP4 training Linear (its MX
training Linear, prototype/moe_training/mxfp8_linear.py, is MXFP8 only), so every device runs FP4Linear
(suite/modes/fp4_linear.py: quantize-dequantize around each GEMM in fp32). Marked `emulated`, speed figures null;
on a GPU it is skipped unless the case asks for --emulate, as every emulated mode is.
"""

from __future__ import annotations

from suite.hardware import DeviceInfo
from suite.modes.nvfp4 import FP4Mode

NO_NATIVE = (
    "MXFP4 matmuls: torchao 0.18 has no MXFP4 training Linear (its MX training Linear is MXFP8 only), "
    "so they are emulated on every device"
)


class MXFP4(FP4Mode):
    name = "mxfp4"
    compute_dtype = "mxfp4"
    fmt = "mxfp4"
    block = 32
    summary = "fp32 master, MXFP4 matmuls (32-blocks, e8m0 scales; sr, rht), emulated, bf16 autocast elsewhere"
    needs = "any device, emulated (torchao 0.18 has no MXFP4 training kernels); on a GPU with --emulate"

    @classmethod
    def emulation_reason(cls, device: DeviceInfo) -> str | None:
        return NO_NATIVE
