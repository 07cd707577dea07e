"""int8 weight-only quantized training with torchao.

Stored in int8 with one fp32 scale per output row: the weights of every Linear inside the
transformer blocks (attention qkv and projection, MLP up and down), updated in place with
stochastic rounding. Kept in fp32: token and position embeddings and the LM head (they are
one tied matrix, and quantizing it would untie it), LayerNorm gains, all biases.
Compute: bf16 autocast, with the quantized Linears themselves in bf16 (bf16 scales and biases; so
their grads and AdamW state are bf16, as torchao's recipe has it), on a CPU as on a GPU: the CPU
runs the GPU's dtype flow. bf16 does not cost the CPU default run time: tiny at 8 x 64 on the 2-core
AVX512-BF16 CPU, train steps interleaved with the old fp32 path in one process (load average 6 from
other jobs): bf16 median 706 ms (p10 187), fp32 783 ms (p10 287). A CPU without native bf16 gets the
smaller defaults `run_defaults` already gives the `bf16` mode. The held-out loss is taken in strict
fp32 from the dequantized int8 weights (`eval_model`).

Weight decay: torch's AdamW decays with `param.mul_`, which torchao's int8 weight tensor
does not implement. So the int8 weights sit in a group with weight_decay=0 and this mode
applies the same decoupled decay itself just before the step, `w <- w - lr*wd*w`, through
`add_`, which the tensor supports (dequantize, add, requantize). Same rule and rate as the
other modes; the cost is a second stochastic requantization per step on those weights.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from suite.hardware import DeviceInfo
from suite.modes.base import ADAM_BETAS, PrecisionMode, cast_formats, decay_groups
from suite.modes.optimizer import adamw
from suite.modes.torchao_calls import fp32_copy, to_weight_dtype


def _torchao_missing() -> str | None:
    """Import torchao (quietly where its CUDA extensions cannot load); why it can't be used, or None."""
    log = logging.getLogger("torchao")
    level = log.level
    if torch.version.cuda is None:
        # a CPU build of torch: torchao's CUDA extensions failing to load is expected and
        # harmless here, so don't print it on every run (on a CUDA build it would matter)
        log.setLevel(logging.ERROR)
    try:
        import torchao.prototype.quantized_training  # noqa: F401
    except ImportError as exc:
        return f"int8-weight needs torchao ({exc}); pip install torchao"
    finally:
        log.setLevel(level)
    return None


def is_int8_weight(p: torch.Tensor) -> bool:
    """True for torchao's int8 training weight (int8 data + per-row scale)."""
    return getattr(p, "int_data", None) is not None and p.int_data.dtype == torch.int8


class Int8Weight(PrecisionMode):
    name = "int8-weight"
    summary = "int8 Linear weights (torchao, stochastic rounding), bf16 compute"
    needs = "torchao; bf16-capable GPU (8.0+) or a CPU"
    no_data_parallel = (
        "int8-weight does not run under DistributedDataParallel: torchao's int8 weight tensor "
        "refuses DDP's gradient bucketing (Int8QTLinearWeight.cat); run it with --nproc 1"
    )
    no_fsdp = (
        "is not sharded: FSDP2 wraps torchao's int8 weight in a DTensor, which hides the int8 data "
        "this mode's weight decay and optimizer groups look for (not checked to train correctly); "
        "run it with --nproc 1"
    )

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.compute = "bf16"
        self.autocast_dtype = torch.bfloat16
        self._quantized: list[str] = []

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        missing = _torchao_missing()
        if missing or device.type != "cuda":
            return missing
        if device.capability is None or device.capability < (8, 0):
            return f"int8-weight computes in bf16, which needs compute capability 8.0; {device.describe()}"
        return None

    def prepare(self, model: nn.Module) -> nn.Module:
        _torchao_missing()  # the first import in this process, without CPU-build noise
        from torchao.prototype.quantized_training import int8_weight_only_quantized_training
        from torchao.quantization import quantize_

        def in_block_linear(module: nn.Module, fqn: str) -> bool:
            return isinstance(module, nn.Linear) and fqn.startswith("blocks.")

        quantize_(model, int8_weight_only_quantized_training(), filter_fn=in_block_linear)
        # torchao's int8 linear computes in its input's dtype, and its backward runs outside
        # autocast: with fp32 inputs and scales, the backward would mix fp32 grads with bf16
        # activations and fail. So the quantized Linears themselves run in bf16: scale and
        # bias in bf16, inputs cast to the weight's bf16 on the way in. Their grads and AdamW
        # state are then bf16 too, as in torchao's own int8 training recipe.
        self._quantized = [fqn for fqn, module in model.named_modules() if in_block_linear(module, fqn)]
        for fqn in self._quantized:
            model.get_submodule(fqn).to(self.autocast_dtype).register_forward_pre_hook(to_weight_dtype)
        return model

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        # Every role in the compute dtype, the autocast dtype on every device: the layers themselves are cast to
        # it (bf16 on a CPU as on a GPU; see the module docstring), so the answer does not depend on
        # self.device. The weight is stored in int8 with one scale per output row, but its GEMM operand is that
        # int8 x scale dequantized in the compute dtype: the int8 rounding happens when the optimizer step
        # requantizes it, with no higher-precision weight left to compare with (there is no master), so a
        # per-step round trip through int8 of the dequantized weight would measure the compute dtype's rounding,
        # not int8's. The LM head (kept in fp32) runs as a plain Linear under the same autocast.
        return cast_formats(self.autocast_dtype)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The dequantized int8 weights in plain fp32 Linears: the held-out loss in strict fp32."""
        return fp32_copy(model, self._quantized)

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        groups = decay_groups(model, weight_decay)
        int8 = [p for p in groups[0]["params"] if is_int8_weight(p)]
        groups[0]["params"] = [p for p in groups[0]["params"] if not is_int8_weight(p)]
        groups.append({"params": int8, "weight_decay": 0.0, "int8_decay": weight_decay})
        # the int8 weights are torchao tensor subclasses: torch's fused and foreach AdamW raise on them
        # (NotImplementedError for aten._fused_adamw_ / _foreach_addcdiv_), so their group runs the for-loop;
        # the other groups (fp32 embeddings and LM head, norms, biases) are fused where the device allows
        return adamw(groups, self.device, lr=lr, betas=ADAM_BETAS, eps=self.adam_eps)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        loss.backward()
        with torch.no_grad():
            for group in optimizer.param_groups:
                rate = group["lr"] * group.get("int8_decay", 0.0)
                if rate:
                    for p in group["params"]:
                        p.add_(p.dequantize(), alpha=-rate)
        optimizer.step()
        return True
