"""FP4Linear: a Linear whose three GEMMs run on emulated NVFP4 or MXFP4 operands (suite.modes.fp4_quant).

The dtype flow is bf16 autocast's: the input is cast to bf16, the fp32 master weight is seen as bf16 (the
weight gradient comes back to it through that cast, in fp32), the output is bf16. Each GEMM then
quantize-dequantizes its two bf16 operands to the format in fp32, along that GEMM's reduction dimension, and
multiplies in fp32 (the tensor core's fp32 accumulation); the result is rounded to bf16:

    forward      y  = x  @ W^T    x (N, in) RN along in;  W (out, in) RN along in, or 16x16 blocks (2d)
    grad_input   dx = dy @ W      dy (N, out) along out, SR if recipe.stochastic_rounding;
                                  W along out: the same 16x16-block weight (2d), else W^T quantized 1-D
    grad_weight  dW = dy^T @ x    dy and x both along the N tokens; RHT on both first (recipe.hadamard);
                                  dy SR, x RN

N = B*T tokens. A GEMM kind in `high_gemms` runs on the bf16 operands instead, unquantized. This is the
recipe of NVIDIA's NVFP4 pretraining paper (arXiv 2509.25149) as torchao's nvfp4_training kernels run it,
emulated so it runs on any device, and Tseng et al.'s for MXFP4.

Tokens that are not a multiple of the weight-gradient blocks (16 for nvfp4, 32 for mxfp4) are padded with
zero tokens for that GEMM: a zero token adds nothing to dy^T @ x, changes no amax, and the Hadamard transform
is orthogonal, so the padded product equals the unpadded one before quantization. Every other dimension is
padded inside the quantizer the same way. The bias is added to the bf16 output (autocast adds it in the GEMM).

Randomness: the RHT signs and the SR seed are drawn from torch's global generator when the layer is built
(deterministic under the case's seed, the same draws whatever the recipe); the SR draws come from a
torch.Generator of the layer's own, made on the input's device at the first training forward. Its state is
not in the state_dict: a run resumed from a checkpoint restarts the SR stream from the seed.
torch.compile: the GEMMs are wrapped in `torch._dynamo.disable` (a torch.Generator argument cannot be traced),
so a compiled model runs them eagerly between its compiled graphs: one graph break per FP4Linear, the same
numbers as eager (tests/test_fp4_linear.py); `fullgraph=True` cannot compile it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from suite.modes.fp4_quant import MXFP4_BLOCK, NVFP4_BLOCK, hadamard_blocks, mxfp4_qdq, nvfp4_qdq, rht_matrix
from suite.policy import FP4_ALLOWED, GEMM_KINDS, FP4Recipe


@dataclass(frozen=True)
class _Spec:
    """What the autograd Function needs to know of its layer (hashable, no tensors)."""

    fmt: str
    sr: bool
    rht: bool
    two_d: bool
    high: frozenset[str]

    def q(self, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """t quantize-dequantized along its last dim (fp32). MXFP4 with stochastic rounding scales each block, once
        divided by its FLOOR scale (taken from the block as it is), by 3/4 before rounding and back after: FLOOR
        puts a block's amax in [4, 8) and e2m1 stops at 6, so its largest values would saturate and SR could not
        be unbiased there; at 3/4 the amax lands in [3, 6) and nothing saturates (Tseng et al., arXiv
        2502.20586). Scaling t itself by 3/4 would not do: the scale would follow it. NVFP4's scale maps the
        amax to 6 itself."""
        if self.fmt == "nvfp4":
            return nvfp4_qdq(t, generator=generator)
        if generator is None:
            return mxfp4_qdq(t)
        return mxfp4_qdq(t, generator=generator, prescale=0.75)

    def weight(self, w: torch.Tensor, reduce_dim: int) -> torch.Tensor:
        """W (out, in) quantized for a GEMM reducing over `reduce_dim` (1: forward, 0: grad_input), in W's
        layout. 2d: the same 16x16-block values for both (quantizing W or W^T gives the same numbers)."""
        if self.two_d:
            return nvfp4_qdq(w, two_d=True)
        return self.q(w) if reduce_dim == 1 else self.q(w.t()).t()


def _no_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off: the emulated GEMMs are fp32 on purpose (and the high ones bf16 on purpose). A meta
    tensor (a model built for its shapes) has no autocast to turn off."""
    return contextlib.nullcontext() if t.device.type == "meta" else torch.autocast(t.device.type, enabled=False)


class _FP4Matmul(torch.autograd.Function):
    """y = x @ w^T for a bf16 x (N, in) and w (out, in), each GEMM as the module docstring says."""

    @staticmethod
    def forward(ctx, x, w, rht, generator, spec: _Spec):
        ctx.save_for_backward(x, w, rht)
        ctx.generator, ctx.spec = generator, spec
        with _no_autocast(x):
            if "forward" in spec.high:
                return x @ w.t()  # (N, out) bf16
            return (spec.q(x) @ spec.weight(w, 1).t()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, dy):
        x, w, rht = ctx.saved_tensors
        spec, gen = ctx.spec, ctx.generator
        dy = dy.to(torch.bfloat16)  # (N, out)
        sr = gen if spec.sr else None
        grad_x = grad_w = None
        with _no_autocast(dy):
            if ctx.needs_input_grad[0]:
                if "grad_input" in spec.high:
                    grad_x = dy @ w  # (N, in) bf16
                else:
                    grad_x = (spec.q(dy, sr) @ spec.weight(w, 0)).to(torch.bfloat16)
            if ctx.needs_input_grad[1]:
                if "grad_weight" in spec.high:
                    grad_w = dy.t() @ x  # (out, in) bf16
                else:
                    grad_w = _grad_weight(dy, x, rht, sr, spec)
        return grad_x, grad_w, None, None, None


def _grad_weight(
    dy: torch.Tensor, x: torch.Tensor, rht: torch.Tensor, sr: torch.Generator | None, spec: _Spec
) -> torch.Tensor:
    """dy^T @ x with both operands quantized along the tokens (the GEMM's reduction dim), (out, in) bf16."""
    block = NVFP4_BLOCK if spec.fmt == "nvfp4" else MXFP4_BLOCK
    pad = -dy.shape[0] % block
    dy32, x32 = F.pad(dy.float(), (0, 0, 0, pad)), F.pad(x.float(), (0, 0, 0, pad))  # (Np, out), (Np, in)
    if spec.rht:
        # each 16-token run of every column goes through the same orthogonal R: (R^T dy)^T (R^T x) = dy^T x
        dy32, x32 = hadamard_blocks(dy32, rht, 0), hadamard_blocks(x32, rht, 0)
    dyq = spec.q(dy32.t(), sr)  # (out, Np), blocks along tokens
    xq = spec.q(x32.t())  # (in, Np)
    return (dyq @ xq.t()).to(torch.bfloat16)


@torch._dynamo.disable
def _fp4_matmul(x: torch.Tensor, w: torch.Tensor, rht: torch.Tensor, gen: torch.Generator | None, spec: _Spec):
    return _FP4Matmul.apply(x, w, rht, gen, spec)


class FP4Linear(nn.Linear):
    """nn.Linear with emulated 4-bit GEMMs; build it with `FP4Linear.from_linear`."""

    fmt: str
    recipe: FP4Recipe
    high_gemms: tuple[str, ...]
    sr_seed: int

    @classmethod
    def from_linear(cls, old: nn.Linear, fmt: str, recipe: FP4Recipe, high_gemms: tuple[str, ...] = ()) -> FP4Linear:
        """An FP4Linear that REUSES old's weight and bias Parameters (a tie with them survives)."""
        if fmt not in FP4_ALLOWED:
            raise ValueError(f"fmt={fmt!r} is not a 4-bit format; give one of {', '.join(FP4_ALLOWED)}")
        if recipe.weight_2d and "2d" not in FP4_ALLOWED[fmt]:
            raise ValueError(f"fp4_recipe '2d' is NVFP4's 16x16 weight scales; {fmt} has none: drop 2d")
        unknown = [k for k in high_gemms if k not in GEMM_KINDS]
        if unknown:
            raise ValueError(f"high_gemms={unknown[0]!r} is not a GEMM kind; give some of {', '.join(GEMM_KINDS)}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)  # no fresh weight: the old Parameters are the layer's
        new.in_features, new.out_features = old.in_features, old.out_features
        new.weight = old.weight
        new.register_parameter("bias", old.bias)
        new.fmt, new.recipe = fmt, recipe
        new.high_gemms = tuple(k for k in GEMM_KINDS if k in high_gemms)
        # drawn whatever the recipe, so the global generator advances alike for every recipe
        signs = torch.randint(0, 2, (16,)).float() * 2 - 1
        new.sr_seed = int(torch.randint(0, 2**62, ()).item())
        new.register_buffer("rht", rht_matrix(signs).to(old.weight.device), persistent=False)
        new._generators = {}
        new._spec = _Spec(fmt, recipe.stochastic_rounding, recipe.hadamard, recipe.weight_2d, frozenset(high_gemms))
        return new

    def _generator(self, device: torch.device) -> torch.Generator:
        """The layer's SR generator on `device`, seeded with sr_seed when first needed there."""
        key = str(device)
        if key not in self._generators:
            # every data-parallel rank builds its layers under the same case seed: without the rank, all ranks
            # would draw the same SR noise, and the averaged gradient's rounding errors would not average down
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._generators[key] = torch.Generator(device=device).manual_seed(self.sr_seed + rank)
        return self._generators[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in), N = B*T
        w = self.weight.to(torch.bfloat16)  # (out, in); its grad reaches the fp32 master through this cast
        needs_sr = self.recipe.stochastic_rounding and torch.is_grad_enabled() and x.device.type != "meta"
        gen = self._generator(x.device) if needs_sr else None
        y = _fp4_matmul(x2, w, self.rht, gen, self._spec)  # (N, out) bf16
        if self.bias is not None:
            y = y + self.bias.to(torch.bfloat16)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        high = ",".join(self.high_gemms) or "none"
        return f"{super().extra_repr()}, fmt={self.fmt}, recipe={self.recipe.text()}, high_gemms={high}"
