"""fp8 training with torchao's float8 Linear, one scale per tensor (as torchtitan uses it).

Stored: fp32 master weights, fp32 grads and AdamW state (the record's dtypes say so). Each
block Linear casts its input, weight and output gradient to float8 (e4m3 forward, e5m2 for
gradients) inside the matmul, with dynamic scales, and returns a high-precision result; nothing
float8 is kept between steps. Everything runs under bf16 autocast, on a CPU as on a GPU: torchao's
Float8Linear casts its input to the autocast dtype only under CUDA autocast, so a pre-hook does the
same on every device (a no-op on a GPU), and the layers' outputs are bf16 on both. On a CPU or a GPU
below 8.9 the float8 matmuls are emulated (torchao `emulate=True`: dequantized operands,
high-precision matmul), so the numerics are fp8's and the speed is not.

`convert_to_float8_training` also patches inductor's Triton min/max code generation for the
whole process (a numerically identical workaround for a Triton fp8 store bug); `numerics()`
puts it back when the case ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from suite.hardware import DeviceInfo
from suite.modes.base import needs_emulation
from suite.modes.torchao_calls import (
    AsDtype,
    SwappedLinearsMode,
    check_tokens,
    import_torchao,
    inductor_patch_restored,
    select_linears,
    to_autocast_dtype,
)

FLOAT8_MULTIPLE = 16  # torch._scaled_mm on CUDA: every matmul dimension a multiple of 16
# Float8LinearConfig's cast configs, one per operand per GEMM (torchao 0.18 float8/config.py), and which two cast
# the operands of each GEMM kind (float8_linear.py: output, grad_input, grad_weight)
_CASTS = ("input", "weight", "grad_output", "input_for_grad_weight", "weight_for_grad_input",
          "grad_output_for_grad_weight")  # fmt: skip
_GEMM_CASTS = {
    "forward": ("input", "weight"),
    "grad_input": ("grad_output", "weight_for_grad_input"),
    "grad_weight": ("input_for_grad_weight", "grad_output_for_grad_weight"),
}


class FP8Tensorwise(SwappedLinearsMode):
    name = "fp8-tensorwise"
    compute_dtype = "fp8"
    summary = "fp32 master, float8 block matmuls (torchao, tensorwise scales), bf16 autocast elsewhere"
    needs = "torchao; CUDA 8.9+ (emulated on a CPU, or below 8.9 with --emulate)"
    recipe: ClassVar[str] = "tensorwise"
    minimum: ClassVar[tuple[int, int]] = (8, 9)
    cpu_default = False  # emulated: several times fp32's step time on a CPU

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        _, missing = import_torchao("torchao.float8")
        return f"{cls.name} {missing}" if missing else None

    @classmethod
    def emulation_reason(cls, device: DeviceInfo) -> str | None:
        return needs_emulation(device, cls.minimum, f"float8 {cls.recipe} matmuls")

    @contextlib.contextmanager
    def numerics(self) -> Iterator[None]:
        """TF32 off (the base's), and torchao's process-wide inductor patch undone at the end."""
        with super().numerics(), inductor_patch_restored():
            yield

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # torchao 0.18 float8/config.py: Float8LinearConfig() casts input and weight to e4m3 and grad_output to
        # e5m2 (CastConfig target_dtype defaults in __post_init__), TENSORWISE granularity, no power-of-2
        # rounding of scales. The float8 GEMMs return their operand's original dtype (bf16 here: the pre-hook
        # casts the input to the autocast dtype), so the weight gradient is produced in bf16 before autograd
        # casts it to the fp32 master's .grad (CPU emulation and _scaled_mm alike).
        return self.kept_formats(layer) or self.with_high_gemms(
            {
                "input": "e4m3-tensorwise",
                "weight": "e4m3-tensorwise",
                "grad_output": "e5m2-tensorwise",
                "grad_weight": "bf16",
            }
        )

    def config(self) -> object:
        """torchao's Float8LinearConfig for this recipe (frozen: replaced, not mutated), with the GEMM kinds the
        policy keeps high left unscaled: torchao's per-GEMM cast configs (ScalingType.DISABLED on both operands of
        that GEMM, as its "rowwise_with_gw_hp" recipe keeps grad_weight high); an operand keeps its cast in the
        other GEMM it enters (the `_for_grad_*` configs are set explicitly, else they would copy the disabled one)."""
        float8, _ = import_torchao("torchao.float8")
        if self.recipe == "tensorwise":
            base = float8.Float8LinearConfig()
        else:
            base = float8.Float8LinearConfig.from_recipe_name(self.recipe)
        casts = {name: getattr(base, f"cast_config_{name}") for name in _CASTS}  # post-init: every one set
        for kind in self.high_gemms:
            for name in _GEMM_CASTS[kind]:  # disabled keeps the dtype: torchao checks both GEMMs of an operand agree
                casts[name] = float8.CastConfig(float8.ScalingType.DISABLED, target_dtype=casts[name].target_dtype)
        return dataclasses.replace(base, emulate=self.emulated, **{f"cast_config_{n}": c for n, c in casts.items()})

    def prepare(self, model: nn.Module) -> nn.Module:
        float8, missing = import_torchao("torchao.float8")
        if missing:
            raise RuntimeError(f"{self.name} {missing}")
        converted, kept = select_linears(model, FLOAT8_MULTIPLE, "float8", self.policy(model))
        chosen = set(converted)
        float8.convert_to_float8_training(
            model, module_filter_fn=lambda module, fqn: fqn in chosen, config=self.config()
        )
        for fqn in converted:
            layer = model.get_submodule(fqn)
            layer.register_forward_pre_hook(to_autocast_dtype)
            if "grad_input" in self.high_gemms:
                # torchao multiplies dy by the weight as it holds it (float8_linear.py, outside autocast in the
                # backward): an fp32 master would meet a bf16 dy. Seen as bf16 (a differentiable cast, as FSDP's bf16
                # param dtype gives torchtitan), the kept GEMM is bf16 x bf16 and the others cast bf16 to float8
                parametrize.register_parametrization(layer, "weight", AsDtype(torch.bfloat16), unsafe=True)
        check_tokens(model, FLOAT8_MULTIPLE, self.name)
        self.keep_layers(converted, kept)
        return model
