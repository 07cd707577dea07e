"""What a tensor loses in a format: amax, underflow, saturation and SQNR of its round trip, chunk by chunk.

`tensor_stats(x, fmt)` and `tensor_stats_many(x, fmts)` (one tensor in several formats, sharing its copies)
measure `suite.modes.formats`' round trips; the module docstring there defines each field.

Memory: `tensor_stats_many` runs over chunks of whole rows of at most CHUNK_ELEMENTS (2^22) elements,
summing counts, amax and the signal and noise powers (in fp64, per chunk: the squares are exact, and x - q is
taken in fp64 as before, since fp32 rounds it where q is far from x). Tensor-level scales (tensorwise float8,
fp16-scaled, NVFP4's per-tensor scale) come from the whole tensor's amax, one reduction, so every chunk rounds
exactly as in `roundtrip(x)`; the statistics equal the unchunked ones but for the SQNR sums' order (fp64
rounding: ~1e-12 relative against the unchunked torch.linalg.vector_norm, whose own error that is; the
chunked sums match an exact math.fsum to all printed digits). On a 1024 x 50257 fp32 CPU tensor (196 MiB),
WHATIF_FORMATS in one call, maxrss growth in a fresh process: 2593 MiB (13.2x the tensor) unchunked, ~295
MiB (1.5x: ~18 chunks of fp32, glibc's free lists included; ~190 MiB with MALLOC_MMAP_THRESHOLD_=65536),
time 15-16 s -> 8-9 s on 2 CPU cores. On a GPU the extra is as many chunks, not 12-17 GiB for gpt2-small's
8192 x 50257 lm_head grad_output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from suite.modes.formats import _TENSOR_SCALED, _finite_amax, _roundtrip, _Whole, check_format

# Statistics run over chunks of whole rows of at most this many elements (one row when a row is longer):
# a round trip's temporaries (scaled copies, padding, masks, the fp64 difference) then scale with a chunk,
# 16 MiB of fp32 here, not with the tensor (gpt2-small's lm_head grad_output is 1.57 GiB in fp32).
CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class TensorStats:
    """What one tensor loses in one format (see the module docstring for each field)."""

    amax: float
    underflow: float
    saturation: float
    sqnr_db: float
    scale: float | None


def _chunks(rows: torch.Tensor) -> Iterator[torch.Tensor]:
    """2-D `rows` in chunks of whole rows of at most CHUNK_ELEMENTS elements (one row at least), fp32 and
    contiguous: a view of an fp32 tensor, a chunk-sized copy of any other."""
    step = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for i in range(0, rows.shape[0], step):
        yield rows[i : i + step].float().contiguous()


def _whole(rows: torch.Tensor, fmts: list[str]) -> _Whole:
    """The whole tensor's amaxes: max |x| in one reduction that copies nothing (max(-min, max); abs turns
    -0.0 into 0.0, a nan propagates); the finite max only for fp16-scaled, chunk by chunk."""
    lo, hi = torch.aminmax(rows)
    amax = torch.maximum(-lo, hi).abs().float()
    finite = None
    if "fp16-scaled" in fmts:
        finite = amax.new_zeros(())
        for chunk in _chunks(rows):
            finite = torch.maximum(finite, _finite_amax(chunk))
    return _Whole(amax, finite)


def tensor_stats_many(x: torch.Tensor, fmts: Iterable[str]) -> dict[str, TensorStats]:
    """`tensor_stats` of one tensor in several formats, chunk by chunk of rows (CHUNK_ELEMENTS), the formats
    sharing each chunk's fp32/fp64 copies; one host transfer.
    RuntimeError for a format that cannot be computed here: ask `format_unavailable` first."""
    fmts = list(dict.fromkeys(fmts))
    for fmt in fmts:
        check_format(fmt)
    dtype, x = x.dtype, x.detach()
    rows = x.reshape(1, 1) if x.dim() == 0 else x.reshape(-1, x.shape[-1])  # a view of a contiguous x
    # sums over the chunks in fp64 (counts are exact to 2^53): x's nonzero elements and signal power sum x^2,
    # then per format its underflowed and saturated elements and its noise power sum (x - q)^2
    sums = torch.zeros(2 + 3 * len(fmts), dtype=torch.float64, device=x.device)
    one = sums.new_ones((), dtype=torch.float32)
    scales: list[torch.Tensor | None] = [one if fmt in _TENSOR_SCALED else None for fmt in fmts]
    whole = _whole(rows, fmts) if rows.numel() else None
    for xc in _chunks(rows) if whole is not None else ():
        # fp64 per chunk, for the exact squares and the difference the unchunked code took: x - q in fp32 is
        # not exact where q is far from x (Sterbenz needs q/2 <= x <= 2q), e.g. a value clamped far below x.
        # Sums by torch.sum (pairwise on a CPU: ~1e-16 relative; torch.dot and vector_norm drift to ~1e-13)
        xd = xc.double()
        nonzero = xc != 0
        sums[0] += nonzero.sum()
        sums[1] += xd.square().sum()
        for i, fmt in enumerate(fmts):
            q, saturated, scales[i] = _roundtrip(xc, fmt, dtype, whole)
            noise = q.double().sub_(xd)  # q - x: the same square
            sums[2 + 3 * i] += (nonzero & (q == 0)).sum()
            sums[3 + 3 * i] += saturated.sum()
            sums[4 + 3 * i] += noise.square_().sum()
            del q, saturated, noise  # before the next format's round trip: one format's temporaries at a time
    nonzero_count, n = sums[0].clamp(min=1), max(rows.numel(), 1)
    values = [sums.new_zeros(()) if whole is None else whole.amax.double()]
    for i, scale in enumerate(scales):
        # 10 log10(signal / noise): inf for an exact round trip, nan (0/0) for all zeros, nan for inf/nan in x
        sqnr = 10 * torch.log10(sums[1] / sums[4 + 3 * i])
        values += [sums[2 + 3 * i] / nonzero_count, sums[3 + 3 * i] / n, sqnr, one if scale is None else scale]
    got = torch.stack([v.double() for v in values]).tolist()  # the one host transfer
    out = {}
    for i, fmt in enumerate(fmts):
        under, sat, sqnr, scale = got[1 + 4 * i : 5 + 4 * i]
        out[fmt] = TensorStats(got[0], under, sat, sqnr, scale if fmt in _TENSOR_SCALED else None)
    return out


def tensor_stats(x: torch.Tensor, fmt: str) -> TensorStats:
    """amax, underflow, saturation, SQNR and scale of `x` in format `fmt`."""
    return tensor_stats_many(x, [fmt])[fmt]
