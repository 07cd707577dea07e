"""Number formats and what a tensor loses in each: amax, underflow, saturation and SQNR of a round trip.

A format is a name (FORMATS). `roundtrip(x, fmt)` quantizes x to the format the way the mode that uses it
does (its scaling included) and dequantizes back to fp32; `tensor_stats(x, fmt)` says what that cost:

- amax: max |x| of the tensor as it arrived;
- underflow: the share of x's nonzero elements that the round trip flushes to zero;
- saturation: the share of x's elements whose scaled magnitude lies above the format's largest finite
  value (clamped by a saturating cast, or inf for a plain cast such as fp16's);
- sqnr_db: signal to quantization-noise ratio, 10 log10(sum x^2 / sum (x - q(x))^2); inf when the round
  trip is exact, nan for an all-zero tensor;
- scale: the one tensor-level multiplier applied before the cast (tensorwise float8's amax scale, fp16's
  power-of-two loss scale), 1.0 for a plain cast, None for per-row and per-block formats.

Per-row and per-block scales run along the LAST dimension of the tensor (a Linear's input (tokens, in) and
weight (out, in): the forward GEMM's reduction dimension). A last dimension that is not a multiple of the
block size is padded with zeros for the round trip (zeros change no amax and are never counted as
underflow). Statistics are computed in fp32 on the tensor's device, one host transfer per tensor.

torchao's primitives are used for the formats it has (float8 scales and saturated casts, MX and NVFP4
tensors, SQNR); `format_unavailable` says why a format cannot run here (torchao missing or broken).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Every format a mode's tensors can be in (a mode names these in `tensor_formats`).
FORMATS: tuple[str, ...] = (
    "fp32", "tf32", "fp16", "fp16-scaled", "bf16",
    "e4m3-tensorwise", "e4m3-rowwise", "e4m3-rowwise-pow2", "e5m2-tensorwise", "e5m2-rowwise",
    "int8-rowwise", "mxfp8", "mxfp4", "nvfp4",
)  # fmt: skip
# What `mpbench numerics` compares by default (issue 24): fp16 without and with loss scaling, bf16, float8
# e4m3 and e5m2 with tensorwise and rowwise scales, MXFP8, MXFP4, NVFP4.
WHATIF_FORMATS: tuple[str, ...] = (
    "fp16", "fp16-scaled", "bf16", "e4m3-tensorwise", "e4m3-rowwise", "e5m2-tensorwise", "e5m2-rowwise",
    "mxfp8", "mxfp4", "nvfp4",
)  # fmt: skip

_CASTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TensorStats:
    """What one tensor loses in one format (see the module docstring for each field)."""

    amax: float
    underflow: float
    saturation: float
    sqnr_db: float
    scale: float | None


def check_format(name: str) -> None:
    """ValueError naming the format and the choices when `name` is not a format."""
    if name not in FORMATS:
        raise ValueError(f"format={name!r} is unknown; choose from {', '.join(FORMATS)}")


def format_unavailable(name: str) -> str | None:
    """Why format `name` cannot be computed here (torchao missing or broken); None when it can."""
    check_format(name)
    return None


def roundtrip(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x quantized to `fmt` and back, in fp32 and x's shape; a bool mask of the saturated elements)."""
    check_format(fmt)
    x = x.detach().float()
    if fmt in _CASTS:
        q = x.to(_CASTS[fmt]).float()
        return q, torch.isinf(q) & torch.isfinite(x)
    raise NotImplementedError(f"format {fmt!r}: not written yet")


def tensor_stats(x: torch.Tensor, fmt: str) -> TensorStats:
    """amax, underflow, saturation, SQNR and scale of `x` in format `fmt`."""
    x = x.detach().float()
    q, saturated = roundtrip(x, fmt)
    nonzero = x != 0
    signal = x.double().square().sum()
    noise = (x.double() - q.double()).square().sum()
    sqnr = torch.where(noise > 0, 10 * torch.log10(signal / noise), torch.where(signal > 0, torch.inf, torch.nan))
    amax, under, sat, sqnr_db = torch.stack(
        [
            x.abs().max() if x.numel() else x.new_zeros(()),
            (nonzero & (q == 0)).sum() / nonzero.sum().clamp(min=1),
            saturated.sum() / max(x.numel(), 1),
            sqnr.float(),
        ]
    ).tolist()  # the one host transfer
    return TensorStats(amax, under, sat, sqnr_db, 1.0 if fmt in _CASTS else None)
