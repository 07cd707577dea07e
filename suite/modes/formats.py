"""Number formats and what a tensor loses in each: amax, underflow, saturation and SQNR of a round trip.

A format is a name (FORMATS). `roundtrip(x, fmt)` quantizes x to the format the way the mode that uses it
does (its scaling included) and dequantizes back to fp32; `tensor_stats(x, fmt)` (suite.modes.format_stats,
chunk by chunk of rows) says what that cost:

- amax: max |x| of the tensor as it arrived;
- underflow: the share of x's nonzero elements that the round trip flushes to zero;
- saturation: the share of x's elements, finite as they arrived, whose scaled magnitude lies beyond the
  format's range: it would round (to nearest even, exponent unbounded) to a value above the format's
  largest finite one, so a saturating cast clamps it and a plain cast such as fp16's gives inf. (A value
  just above the largest finite one that rounds down to it anyway is a rounding error, not saturation.)
- sqnr_db: signal to quantization-noise ratio, 10 log10(sum x^2 / sum (x - q(x))^2); inf when the round
  trip is exact, nan for an all-zero tensor and for one holding inf or nan (its amax is then inf or nan);
- scale: the one tensor-level multiplier applied before the cast (tensorwise float8's amax scale, fp16's
  power-of-two loss scale), 1.0 for a plain cast, None for per-row and per-block formats (NVFP4's fp32
  per-tensor scale, amax / (448 * 6), follows from amax and is not repeated).

Per-row and per-block scales run along the LAST dimension of the tensor (a Linear's input (tokens, in) and
weight (out, in): the forward GEMM's reduction dimension); leading dimensions are flattened into rows. A
last dimension that is not a multiple of the block size is padded with zeros for the round trip and cropped
back (zeros change no amax and are never counted as underflow). Statistics are computed on the tensor's
device, one host transfer per tensor; nothing draws from torch's random generator.

torchao's primitives are used for the formats it has (float8 scales and saturated casts, MX and NVFP4
tensors, SQNR); `format_unavailable` says why a format cannot run here (torchao missing or broken). tf32,
fp16-scaled and int8-rowwise are written here and tested bit for bit against torchao or a reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

# Every format a mode's tensors can be in (a mode names these in `tensor_formats`).
FORMATS: tuple[str, ...] = (
    "fp32", "tf32", "fp16", "fp16-scaled", "bf16",
    "e4m3-tensorwise", "e4m3-rowwise", "e4m3-rowwise-pow2", "e5m2-tensorwise", "e5m2-rowwise",
    "int8-rowwise", "mxfp8", "mxfp8-rceil", "mxfp4", "nvfp4",
)  # fmt: skip
# What `mpbench numerics` compares by default (issue 24): fp16 without and with loss scaling, bf16, float8
# e4m3 and e5m2 with tensorwise and rowwise scales, MXFP8, MXFP4, NVFP4.
WHATIF_FORMATS: tuple[str, ...] = (
    "fp16", "fp16-scaled", "bf16", "e4m3-tensorwise", "e4m3-rowwise", "e5m2-tensorwise", "e5m2-rowwise",
    "mxfp8", "mxfp4", "nvfp4",
)  # fmt: skip

_CASTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_F8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_FP16_MAX = 65504.0
# Formats with one tensor-level multiplier (the `scale` field); every other format reports None.
_TENSOR_SCALED = {"fp32", "tf32", "fp16", "bf16", "fp16-scaled", "e4m3-tensorwise", "e5m2-tensorwise"}
# The torchao module each format needs; formats not named here need only torch.
_NEEDS = {
    **{f: "torchao.float8.float8_utils" for f in FORMATS if f.startswith(("e4m3", "e5m2"))},
    "mxfp8": "torchao.prototype.mx_formats.mx_tensor",
    "mxfp8-rceil": "torchao.prototype.mx_formats.mx_tensor",
    "mxfp4": "torchao.prototype.mx_formats.mx_tensor",
    "nvfp4": "torchao.prototype.mx_formats.nvfp4_tensor",
}
# Where a scaled magnitude starts to round above the largest finite value (max + half its ulp), and
# whether that exact tie does too: round to nearest even goes up when max's last mantissa bit is odd.
# e4m3fn 448 = 1.110b x 2^8 (even: 464 rounds down), e5m2 57344 = 1.11b x 2^15 (odd: 61440 overflows),
# e2m1 6 = 1.1b x 2^2 (odd: 7 rounds to 8).
_BEYOND = {torch.float8_e4m3fn: (464.0, False), torch.float8_e5m2: (61440.0, True), "e2m1": (7.0, True)}


@dataclass(frozen=True)
class _Whole:
    """What tensor-level scales take from the whole tensor when its rows are round-tripped chunk by chunk
    (fp32, 0-d, on its device)."""

    amax: torch.Tensor  # max |x|; nan when x holds a nan (float8 tensorwise, nvfp4's per-tensor scale)
    finite_amax: torch.Tensor | None  # max |x| over its finite elements (fp16-scaled's loss scale)


def check_format(name: str) -> None:
    """ValueError naming the format and the choices when `name` is not a format."""
    if name not in FORMATS:
        raise ValueError(f"format={name!r} is unknown; choose from {', '.join(FORMATS)}")


def _import(module: str) -> tuple[ModuleType | None, str | None]:
    """torchao's module through the project's boundary; torch's pytree logs a deprecation warning for each
    enum torchao's MX module registers, which says nothing to a user of mpbench: keep it quiet."""
    from suite.modes import torchao_calls  # here, not at the top: torchao_calls imports the modes' base

    log = logging.getLogger("torch.utils._pytree")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return torchao_calls.import_torchao(module)
    finally:
        log.setLevel(level)


def format_unavailable(name: str) -> str | None:
    """Why format `name` cannot be computed here (torchao missing or broken); None when it can."""
    check_format(name)
    if name not in _NEEDS:
        return None
    return _import(_NEEDS[name])[1]


def _ao(fmt: str) -> ModuleType:
    return _ao_module(_NEEDS[fmt], fmt)


def _ao_module(name: str, fmt: str) -> ModuleType:
    module, why = _import(name)
    if module is None:
        raise RuntimeError(f"format {fmt!r} cannot be computed here: {why}")
    return module


def _beyond(scaled: torch.Tensor, kind: object) -> torch.Tensor:
    """Elements of `scaled` that round above the largest finite value of `kind` (see _BEYOND)."""
    edge, tie_up = _BEYOND[kind]
    mag = scaled.abs()
    return mag >= edge if tie_up else mag > edge


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to tf32's 10 mantissa bits, to nearest even: add half an ulp of the kept bits less
    one, plus the lowest kept bit (the tie goes to the even side), then clear the 13 dropped bits. A carry
    into the exponent is the correct result (up to inf past tf32's largest value); inf and nan stay."""
    bits = x.view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x)


def _finite_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the finite elements (0 when there is none), fp32."""
    mag = x.abs().float()
    return torch.where(torch.isfinite(mag), mag, 0).amax()


def _fp16_scale(finite_amax: torch.Tensor) -> torch.Tensor:
    """The largest 2^k with amax * 2^k <= 65504 (what dynamic loss scaling settles on), k within fp32's
    normal exponents (the scale is an fp32 number); amax from the finite elements (a loss scaler skips
    inf/nan steps and keeps its scale); 1.0 for a tensor with no finite nonzero element."""
    amax = finite_amax.double()
    # exact in fp64 for an fp32 amax: the quotient is either exactly 2^j or at least ~2^-24 (relative) away
    # from it, far beyond fp64's rounding of the division and the log
    k = torch.floor(torch.log2(_FP16_MAX / amax))
    return torch.exp2(torch.where(amax > 0, k, 0).clamp(-126, 127)).float()


def _float8(
    x: torch.Tensor, fmt: str, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchao's float8 training cast: amax scale (per tensor, or per row along the last dim), x * scale,
    saturated cast; dequantized as Float8TrainingTensor does (fp8 / scale). `amax`: the whole tensor's, for
    a tensorwise scale of rows that are part of it (tensor_to_scale is amax_to_scale of x's own amax)."""
    fu = _ao(fmt)
    dtype = _F8[fmt[:4]]
    rowwise = "rowwise" in fmt
    if amax is not None and not rowwise:
        scale = fu.amax_to_scale(amax, dtype, round_scales_to_power_of_2=fmt.endswith("pow2"))
    else:
        scale = fu.tensor_to_scale(
            x,
            dtype,
            scaling_granularity=fu.ScalingGranularity.AXISWISE if rowwise else fu.ScalingGranularity.TENSORWISE,
            axiswise_dim=-1 if rowwise else None,
            round_scales_to_power_of_2=fmt.endswith("pow2"),
        )
    scaled = x * scale
    q = fu.to_fp8_saturated(scaled, dtype).float() / scale
    return q, _beyond(scaled, dtype) & torch.isfinite(x), scale


def _int8_rowwise(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's int8 mixed-precision training quantizer (prototype/quantized_training/int8.py,
    quantize_int8_rowwise, stochastic_rounding=False), op for op: scale = row amax / 127, x * (1 /
    max(scale, 1e-12)), round half to even, clip to [-128, 127]; dequantized as its int8 matmul output is
    (int value * row scale). Its scale keeps the tensor's dtype: a bf16/fp16 tensor's is rounded to it."""
    amax = x.abs().amax(1, keepdim=True)
    scale = (amax.to(dtype) / 127).float() if dtype in (torch.bfloat16, torch.float16) else amax / 127
    scaled = x * (1.0 / scale.clip(1e-12))
    # + 0.0: an int8 has no negative zero (-0.4 rounds to -0.0, torchao's int8 holds 0)
    q = (scaled.round().clip(-128, 127) + 0.0) * scale
    # 127.5 rounds to 128 (even) and is clipped; -128.5 rounds to -128, representable
    return q, ((scaled >= 127.5) | (scaled < -128.5)) & torch.isfinite(x)


def pad_last(x: torch.Tensor, block: int) -> torch.Tensor:
    """x with its last dim zero-padded to a multiple of `block`, contiguous (block views split it)."""
    pad = -x.shape[-1] % block
    return F.pad(x, (0, pad)).contiguous() if pad else x.contiguous()


def _mx(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's MXTensor.to_mx (32-element blocks, e8m0 scale) and its dequantize. "mxfp8" and "mxfp4": the
    OCP spec's FLOOR scale (to_mx's default), 2^(floor(log2 block amax) - emax of the element format), so the
    block's amax scales to [256, 512) in e4m3 (max 448) and [4, 8) in e2m1 (max 6): the largest elements can
    saturate. "mxfp8-rceil": RCEIL, 2^ceil(log2(block amax / 448)), what torchao's MXFP8 training Linear
    (prototype/moe_training/mxfp8_linear.py, MXFP8Linear's default scale_calculation_mode) and its Blackwell
    cast kernels use: the amax scales to at most 448, so no finite fp32 element saturates."""
    mx = _ao(fmt)
    elem = torch.float4_e2m1fn_x2 if fmt == "mxfp4" else torch.float8_e4m3fn
    xp = pad_last(x, 32)
    if fmt == "mxfp8-rceil":
        modes = _ao_module("torchao.prototype.mx_formats.config", fmt).ScaleCalculationMode
        t = mx.MXTensor.to_mx(xp, elem, 32, modes.RCEIL)
        # the multiplier _to_mx_rceil applied: 2^(127 - e), or 1.0 for e = 0 (as torchao sets it)
        e = t.scale.view(torch.uint8).to(torch.int32)
        rcp = torch.where(e == 0, 1.0, torch.exp2(127.0 - e.float()))
        scaled = xp.view(*rcp.shape, 32) * rcp.unsqueeze(-1)
    else:
        t = mx.MXTensor.to_mx(xp, elem, 32)
        # the scale to_mx divided by: e8m0 bits as an fp32 exponent, raised to fp32's smallest normal as it does
        scale = (t.scale.view(torch.uint8).to(torch.int32) << 23).view(torch.float32).clamp(min=2.0**-126)
        scaled = xp.view(*scale.shape, 32) / scale.unsqueeze(-1)
    q = t.dequantize(torch.float32)
    saturated = _beyond(scaled, "e2m1" if fmt == "mxfp4" else elem).view(xp.shape)
    k = x.shape[-1]
    return q[:, :k], saturated[:, :k] & torch.isfinite(x)


def _nvfp4(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's NVFP4Tensor.to_nvfp4: 16-element blocks, e4m3 block scales under an fp32 per-tensor scale
    from the tensor's amax (per_tensor_amax_to_scale), e2m1 elements; its dequantize. `amax`: the whole
    tensor's, for rows that are part of it (the blocks are within rows, the per-tensor scale is not)."""
    nv = _ao("nvfp4")
    xp = pad_last(x, 16)
    amax = x.abs().amax() if amax is None else amax
    per_tensor = nv.per_tensor_amax_to_scale(amax)
    t = nv.NVFP4Tensor.to_nvfp4(xp, 16, per_tensor_scale=per_tensor)
    # an all-zero tensor gets a per-tensor scale of 0 and torchao's round trip turns it into NaN: it is 0
    q = torch.where(amax > 0, t.dequantize(torch.float32), 0.0)
    # the multiplier nvfp4_quantize applied, computed as it does: (1 / per-tensor scale) / block scale
    reciprocal = (1.0 / per_tensor) / t.scale.float()
    scaled = xp.view(*reciprocal.shape, 16) * reciprocal.unsqueeze(-1)
    k = x.shape[-1]
    return q[:, :k], _beyond(scaled, "e2m1").view(xp.shape)[:, :k] & torch.isfinite(x)


def _roundtrip(
    x: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32, whole: _Whole | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, saturated, tensor-level scale or None) for a contiguous fp32 x of any shape (`dtype`: the one it
    arrived in; only int8-rowwise's scale depends on it, the other formats see its values exactly in fp32).
    `whole`: x is some rows of a larger tensor, and these are its amaxes: tensor-level scales come from them,
    so the rows round exactly as they do in the whole tensor's round trip."""
    one = x.new_ones(())
    if x.numel() == 0:
        return x.clone(), torch.zeros_like(x, dtype=torch.bool), one if fmt in _TENSOR_SCALED else None
    if fmt in _CASTS:
        q = x.to(_CASTS[fmt]).float()
        return q, torch.isinf(q) & torch.isfinite(x), one
    if fmt == "tf32":
        q = _tf32(x)
        return q, torch.isinf(q) & torch.isfinite(x), one
    if fmt == "fp16-scaled":
        scale = _fp16_scale(_finite_amax(x) if whole is None else whole.finite_amax)
        h = (x * scale).half()
        return h.float() / scale, torch.isinf(h) & torch.isfinite(x), scale
    rows = x.reshape(1, 1) if x.dim() == 0 else x.reshape(-1, x.shape[-1])
    if fmt.startswith(("e4m3", "e5m2")):
        q, saturated, scale = _float8(rows, fmt, None if whole is None else whole.amax)
        scale = scale if fmt in _TENSOR_SCALED else None
    elif fmt == "int8-rowwise":
        (q, saturated), scale = _int8_rowwise(rows, dtype), None
    elif fmt == "nvfp4":
        (q, saturated), scale = _nvfp4(rows, None if whole is None else whole.amax), None
    else:
        (q, saturated), scale = _mx(rows, fmt), None
    return q.reshape(x.shape), saturated.reshape(x.shape), scale


def roundtrip(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x quantized to `fmt` and back, in fp32 and x's shape; a bool mask of the saturated elements)."""
    check_format(fmt)
    q, saturated, _ = _roundtrip(x.detach().float().contiguous(), fmt, x.dtype)
    return q, saturated
