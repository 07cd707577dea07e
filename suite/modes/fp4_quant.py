"""Emulated 4-bit numerics for the nvfp4 and mxfp4 training modes: quantize-dequantize in fp32, pure torch.

Both formats hold e2m1 elements (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives) under a block scale:

- NVFP4: 16-element blocks along the last dim, one e4m3 scale each, under an fp32 per-tensor scale
  amax / (448 * 6) so the largest block's scale lands near e4m3's top (448). `nvfp4_qdq` is torchao 0.18's
  `nvfp4_quantize` + `NVFP4Tensor.dequantize` op for op (bit for bit, tests/test_fp4_quant.py); `two_d=True`
  takes one scale per 16 x 16 block from that block's amax (torchao's Triton `_nvfp4_2d_quantize` for NVFP4
  weights), so W and W^T quantize to the same values: one quantized weight serves the forward GEMM (reduced
  along `in`) and the input-gradient GEMM (reduced along `out`). The Triton kernels compute the same scales
  as a product with 448 * 6 / amax instead of a quotient by amax / (448 * 6); the two can differ in the last
  fp32 bit before the e4m3 rounding. Here both paths use NVFP4Tensor's quotient.
- MXFP4: 32-element blocks, e8m0 scale 2^(floor(log2 block amax) - 2) (the OCP spec's FLOOR, torchao's
  `to_mx` default), so the block's amax scales to [4, 8) and the largest elements can saturate at 6.

Rounding: to nearest even (a tie goes to the even code: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), or, given a
torch.Generator, stochastic: each scaled value goes to one of its two neighbouring e2m1 values with probability
proportional to proximity (E[q] = x inside the range), one fp32 uniform draw per element from the generator (on
x's device). Scaled values beyond 6 saturate to 6 in both. The random Hadamard transform (RHT, `rht_matrix`,
`hadamard_blocks`) is torchao's NVFP4 training one: 16 x 16 blocks, v @ (diag(signs) @ H16 / 4); torchao rounds
the transformed operand to bf16 before quantizing it, this keeps it in fp32.

A last dim that is not a multiple of the block (and, for `two_d`, a first dim that is not a multiple of 16) is
padded with zeros for the blocks and cropped back: zeros change no amax. An all-zero tensor returns zeros
(torchao's per-tensor scale 0 turns it into NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from suite.modes.formats import pad_last

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_TINY = torch.finfo(torch.float8_e4m3fn).tiny  # 2^-6, the smallest block scale NVFP4 stores
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
# Sylvester's 16 x 16 Hadamard matrix, H_2k = [[H_k, H_k], [H_k, -H_k]]: torchao's get_hadamard_matrix
_H16 = torch.ones(1, 1)
for _ in range(4):
    _H16 = torch.cat([torch.cat([_H16, _H16], 1), torch.cat([_H16, -_H16], 1)], 0)


def _round_e2m1(v: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """fp32 values already scaled, saturated to +-6 and rounded onto the e2m1 grid (sign kept, -0 too).
    The grid's spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]: a / step is exact (a power of two), so
    round-half-even of it is e2m1's round to nearest even, and floor(a / step) its lower neighbour."""
    a = v.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    if generator is None:
        q = torch.round(a / step) * step
    else:
        lo = torch.floor(a / step) * step
        u = torch.rand(a.shape, generator=generator, device=a.device, dtype=torch.float32)
        # up with probability (a - lo) / step: E[q] = a; a on the grid stays (probability 0 of going up)
        q = lo + step * (u < (a - lo) / step)
    return torch.copysign(q, v)


def nvfp4_qdq(
    x: torch.Tensor,
    *,
    amax: torch.Tensor | None = None,
    two_d: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x quantized to NVFP4 along its last dim and dequantized, fp32, x's shape. `amax`: the per-tensor
    amax (default x's own); `two_d`: one scale per 16 x 16 block of a 2-D x; `generator`: stochastic rounding."""
    if x.dim() == 0 or (two_d and x.dim() != 2):
        raise ValueError(f"nvfp4_qdq: x has shape {tuple(x.shape)}; give a 2-D tensor for two_d, 1-D+ otherwise")
    x = x.float()
    amax = x.abs().amax() if amax is None else amax.float()
    per_tensor = amax / (E4M3_MAX * E2M1_MAX)  # torchao per_tensor_amax_to_scale
    if two_d:
        m, k = x.shape
        xp = F.pad(x, (0, -k % NVFP4_BLOCK, 0, -m % NVFP4_BLOCK))
        blocks = xp.view(xp.shape[0] // 16, 16, xp.shape[1] // 16, 16)  # (M/16, 16, K/16, 16)
        block_amax = blocks.abs().amax(dim=(1, 3), keepdim=True)  # (M/16, 1, K/16, 1)
    else:
        xp = pad_last(x.reshape(-1, x.shape[-1]), NVFP4_BLOCK)  # (rows, K) with K % 16 == 0
        blocks = xp.view(xp.shape[0], -1, NVFP4_BLOCK)  # (rows, K/16, 16)
        block_amax = blocks.abs().amax(dim=-1, keepdim=True)  # (rows, K/16, 1)
    # the block scale relative to the per-tensor one, rounded to e4m3 (nvfp4_quantize, two-level branch)
    scale = ((block_amax / E2M1_MAX) / per_tensor).clamp(E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn).float()
    q = _round_e2m1(blocks * ((1.0 / per_tensor) / scale), generator)
    deq = q * (per_tensor * scale)  # NVFP4Tensor.dequantize: e2m1 value * (per-tensor * block scale)
    deq = torch.where(amax == 0, 0.0, deq)
    deq = deq.view(xp.shape)[: x.shape[0], : x.shape[1]] if two_d else deq.view(xp.shape)[:, : x.shape[-1]]
    return deq.reshape(x.shape)


def mxfp4_qdq(x: torch.Tensor, *, generator: torch.Generator | None = None, prescale: float = 1.0) -> torch.Tensor:
    """x quantized to MXFP4 along its last dim (32-blocks, e8m0 FLOOR scale) and dequantized, fp32, x's
    shape; `generator`: stochastic rounding. `prescale`: the block, once divided by its scale (computed from the
    block as it is), is multiplied by this before rounding and divided by it after: 3/4 takes FLOOR's [4, 8)
    amax into [3, 6), where e2m1 does not saturate (Tseng et al., arXiv 2502.20586), so SR stays unbiased."""
    if x.dim() == 0:
        raise ValueError("mxfp4_qdq: x is 0-d; give a tensor of 1 or more dims")
    x = x.float()
    xp = pad_last(x.reshape(-1, x.shape[-1]), MXFP4_BLOCK)
    blocks = xp.view(xp.shape[0], -1, MXFP4_BLOCK)  # (rows, K/32, 32)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    # to_mx FLOOR: the amax's fp32 exponent less e2m1's largest (2), clamped to e8m0's range, biased by 127;
    # a NaN amax gives e8m0's NaN (255)
    exponent = ((block_amax.view(torch.int32) >> 23) & 0xFF) - 127 - 2
    biased = torch.where(torch.isnan(block_amax), 255, exponent.clamp(-127, 128) + 127)
    # to_mx divides by the scale raised to fp32's smallest normal (an all-zero block's 2^-127 would be 0 in
    # triton); get_fp_scale multiplies back by 2^(biased - 127) itself: 2^-127 is fp32 bits 0x00400000
    divisor = (biased << 23).view(torch.float32).clamp(min=2.0**-126)
    multiplier = torch.where(biased == 0, 0x00400000, biased << 23).view(torch.float32)
    multiplier = torch.where(biased == 255, float("nan"), multiplier)
    q = _round_e2m1(blocks / divisor * prescale, generator) / prescale
    return (q * multiplier).view(xp.shape)[:, : x.shape[-1]].reshape(x.shape)


def rht_matrix(signs: torch.Tensor) -> torch.Tensor:
    """diag(signs) @ H16 / 4: 16 x 16, fp32, orthogonal (entries +-1/4, exact), on the signs' device."""
    if signs.shape != (16,):
        raise ValueError(f"rht_matrix: signs has shape {tuple(signs.shape)}; give 16 values of +1 or -1")
    return signs.float().unsqueeze(1) * _H16.to(signs.device) / 4


def hadamard_blocks(x: torch.Tensor, rht: torch.Tensor, dim: int) -> torch.Tensor:
    """x (fp32) with each run of 16 elements along `dim` replaced by v @ rht (dim's size a multiple of 16).
    For the weight-gradient GEMM dy^T @ x, transforming both along the token dim changes nothing exactly
    (R R^T = I) but spreads each block's outliers over 16 values before quantization."""
    xt = x.float().movedim(dim, -1)
    n = xt.shape[-1]
    if n % 16:
        raise ValueError(f"hadamard_blocks: dim {dim} has size {n}; pad it to a multiple of 16")
    y = (xt.reshape(*xt.shape[:-1], n // 16, 16) @ rht.float()).reshape(xt.shape)
    return y.movedim(-1, dim)
