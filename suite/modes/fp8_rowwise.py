"""fp8 training with torchao's float8 Linear, one scale per row (torchao's "rowwise" recipe).

As `fp8-tensorwise` (fp32 master, float8 casts inside the matmul only), with a scale per row
of each operand: finer scales, more accurate, more scaling work. Native from compute
capability 8.9; torchao's fast rowwise kernels are Hopper's (9.0).
"""

from __future__ import annotations

from suite.modes.fp8_tensorwise import FP8Tensorwise


class FP8Rowwise(FP8Tensorwise):
    name = "fp8-rowwise"
    summary = "fp32 master, float8 block matmuls (torchao, rowwise scales), bf16 autocast elsewhere"
    needs = "torchao; CUDA 8.9+, 9.0 for the fast path (emulated on a CPU, or below 8.9 with --emulate)"
    recipe = "rowwise"

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # torchao 0.18 float8/config.py, from_recipe_name("rowwise"): input, weight and grad_output all e4m3
        # with AXISWISE (per-row) scales and round_scales_to_power_of_2=True; the weight gradient in bf16, as
        # for tensorwise (the GEMM returns its operand's original dtype)
        return self.kept_formats(layer) or self.with_high_gemms(
            {
                "input": "e4m3-rowwise-pow2",
                "weight": "e4m3-rowwise-pow2",
                "grad_output": "e4m3-rowwise-pow2",
                "grad_weight": "bf16",
            }
        )
