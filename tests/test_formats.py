"""Formats (suite/modes/formats.py): known answers, torchao bit for bit, hand-written formats against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from suite.modes import format_stats, formats
from suite.modes.format_stats import tensor_stats, tensor_stats_many
from suite.modes.formats import FORMATS, roundtrip


def _sqnr(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The library's SQNR of whole tensors, torchao's compute_error (20 log10(|x| / |x - q|)): what the chunked
    statistics must equal (they cannot call it: it takes whole tensors, and their fp64 copies)."""
    from torchao.float8.float8_utils import compute_error

    return compute_error(x, q)


TORCHAO = [f for f in FORMATS if formats.format_unavailable(f) is None]
needs_torchao = pytest.mark.skipif(len(TORCHAO) < len(FORMATS), reason="torchao is not importable here")


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns: torch.equal on these tells -0.0 from 0.0."""
    return t.contiguous().view(torch.int32)


def wide(shape: tuple[int, ...], lo: int = -40, hi: int = 40, seed: int = 0) -> torch.Tensor:
    """Random fp32 with exponents spread over [lo, hi), random signs, some exact zeros and negative zeros."""
    g = torch.Generator().manual_seed(seed)
    mant = 1 + torch.rand(shape, generator=g)
    exp = torch.randint(lo, hi, shape, generator=g).float()
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    x = sign * mant * torch.exp2(exp)
    flat = x.view(-1)
    flat[::17] = 0.0
    flat[5::23] = -0.0
    return x


# ---- known answers from the issue ----------------------------------------------------------------------


def test_fp16_flushes_values_below_2_pow_minus_24_and_keeps_the_smallest_subnormal():
    x = torch.tensor([2.0**-26, 2.0**-24, 1.0, -(2.0**-25), 3 * 2.0**-25])
    q, saturated = roundtrip(x, "fp16")
    # 2^-25 is the tie between 0 and 2^-24: to even, 0; 3 * 2^-25 rounds up to 2^-23
    assert q.tolist() == [0.0, 2.0**-24, 1.0, -0.0, 2.0**-23]
    assert not saturated.any()
    assert tensor_stats(x, "fp16").underflow == pytest.approx(2 / 5)
    # with a loss scale (amax 1 -> 2^15) nothing underflows
    scaled = tensor_stats(x, "fp16-scaled")
    assert scaled.underflow == 0 and scaled.scale == 2.0**15


def test_fp16_saturates_above_65504_and_fp16_scaled_does_not():
    # 65510 rounds down to 65504 (a rounding error, not saturation); 65520 is the tie that rounds to inf
    x = torch.tensor([70000.0, 1.0, 65510.0, 65520.0, -1e6, float("inf")])
    q, saturated = roundtrip(x, "fp16")
    assert saturated.tolist() == [True, False, False, True, True, False]  # inf as it arrived is not counted
    assert q[2] == 65504 and torch.isinf(q[[0, 3, 4]]).all()
    assert tensor_stats(x, "fp16").saturation == pytest.approx(3 / 6)
    finite = x[:-1]
    qs, sat_s = roundtrip(finite, "fp16-scaled")
    stats = tensor_stats(finite, "fp16-scaled")
    assert not sat_s.any() and stats.saturation == 0 and torch.isfinite(qs).all()
    assert stats.scale == 2.0**-4  # 1e6 * 2^-4 = 62500 <= 65504 < 125000
    # an inf or nan element (an overflowed gradient) leaves the scale to the finite ones
    assert tensor_stats(x, "fp16-scaled").scale == 2.0**-4
    assert tensor_stats(torch.tensor([float("nan"), 2.0]), "fp16-scaled").scale == 2.0**14


def test_an_exactly_representable_tensor_has_infinite_sqnr_in_every_format():
    ints = torch.arange(-8, 9, dtype=torch.float32).repeat(4, 2)[:, :32]  # small integers, row amax 8
    assert tensor_stats(ints, "fp32").sqnr_db == math.inf
    assert tensor_stats(ints, "int8-rowwise").sqnr_db < math.inf  # scale 8/127: not exact, a control
    for fmt in ("tf32", "fp16", "fp16-scaled", "bf16"):
        assert tensor_stats(ints, fmt).sqnr_db == math.inf, fmt
    bf = wide((16, 32), -20, 20).bfloat16().float()
    assert tensor_stats(bf, "bf16").sqnr_db == math.inf and tensor_stats(bf, "tf32").sqnr_db == math.inf
    assert tensor_stats(wide((16, 32), -20, 20), "bf16").sqnr_db < math.inf  # fp32 values: not exact
    int8 = torch.tensor([[127.0, -3.0, 0.0, 64.0], [-127.0, 1.0, 2.0, 5.0]])  # row amax 127: scale 1
    assert tensor_stats(int8, "int8-rowwise").sqnr_db == math.inf
    if "mxfp8" in TORCHAO:
        for fmt in ("e4m3-rowwise-pow2", "mxfp8"):  # power-of-two scales keep small integers exact
            assert tensor_stats(ints, fmt).sqnr_db == math.inf, fmt
        fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4).view(1, 32)  # e2m1's values, amax 6
        assert tensor_stats(fp4, "mxfp4").sqnr_db == math.inf
        assert tensor_stats(fp4 * 1.1, "mxfp4").sqnr_db < math.inf


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_all_zero_tensor_has_nan_sqnr_and_nothing_lost(fmt):
    if fmt not in TORCHAO:
        pytest.skip("torchao is not importable here")
    x = torch.zeros(3, 50)
    q, saturated = roundtrip(x, fmt)
    assert torch.equal(q, x) and not saturated.any()  # NVFP4 included (torchao's own gives NaN here)
    s = tensor_stats(x, fmt)
    assert math.isnan(s.sqnr_db) and s.underflow == 0 and s.saturation == 0 and s.amax == 0


# ---- the planted outlier, and where saturation really happens ------------------------------------------


@needs_torchao
def test_an_outlier_flushes_other_rows_under_tensorwise_scaling_and_not_under_rowwise():
    """The issue expected the outlier to saturate e4m3 under tensorwise scaling. With an amax scale nothing
    saturates (the outlier maps to 448); what it does is shrink every other row into e4m3's subnormals:
    their small elements flush to zero and their SQNR drops. Rowwise scales keep them."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    x[0, 3] = 1e5  # scale 448 / 1e5: |x| < 2^-10 / scale = 0.22 flushes (about 17% of N(0, 1))
    tw, rw = tensor_stats(x, "e4m3-tensorwise"), tensor_stats(x, "e4m3-rowwise")
    assert tw.saturation == 0 and rw.saturation == 0
    q_tw, _ = roundtrip(x, "e4m3-tensorwise")
    q_rw, _ = roundtrip(x, "e4m3-rowwise")
    flushed_tw = ((x[1:] != 0) & (q_tw[1:] == 0)).float().mean()
    flushed_rw = ((x[1:] != 0) & (q_rw[1:] == 0)).float().mean()
    assert flushed_tw > 0.1 and flushed_rw == 0  # the rows without the outlier
    # overall: rowwise flushes only within the outlier's own row (1/8 of the tensor)
    assert tw.underflow > 0.1 and 0 < rw.underflow <= 1 / 8
    for row in range(1, 8):  # every row without the outlier
        sqnr_tw = _sqnr(x[row].double(), q_tw[row].double())
        sqnr_rw = _sqnr(x[row].double(), q_rw[row].double())
        assert sqnr_tw < sqnr_rw - 10, row
    assert tw.scale == pytest.approx(448 / 1e5) and rw.scale is None


@needs_torchao
def test_mxfp8_floor_scale_saturates_a_blocks_largest_element():
    """FLOOR scale: 2^(floor(log2 amax) - 8). 1000 -> scale 2 -> 500, beyond e4m3's 448 (and beyond the
    464 that rounds down to 448): clamped to 448 * 2. 460 -> scale 1 -> 460, which rounds to 448 anyway."""
    x = torch.ones(4, 32)
    x[0, 5] = 1000.0
    x[1, 0] = 460.0
    x[2, 0] = 464.0  # the tie between 448 and 480: to even, 448 (not saturation)
    x[3, 0] = 465.0  # past the tie: saturated
    q, saturated = roundtrip(x, "mxfp8")
    assert saturated.nonzero().tolist() == [[0, 5], [3, 0]]
    assert q[0, 5] == 896 and q[1:, 0].tolist() == [448, 448, 448]
    assert tensor_stats(x, "mxfp8").saturation == pytest.approx(2 / 128)
    x[1, 7] = math.inf  # an inf as it arrived is not saturation (its block's e8m0 scale is NaN)
    assert not roundtrip(x, "mxfp8")[1][1].any()


@needs_torchao
def test_mxfp4_saturates_from_the_tie_at_7_and_nvfp4_flushes_a_small_block():
    x = torch.ones(3, 32)
    x[0, 0], x[1, 0], x[2, 0] = 7.5, 7.0, 6.5  # each block scales by 2^0 (amax in [4, 8)); e2m1 max 6
    q, saturated = roundtrip(x, "mxfp4")
    assert saturated[:, 0].tolist() == [True, True, False]  # 7 ties to 8 (6's mantissa is odd); 6.5 -> 6
    assert q[:, 0].tolist() == [6.0, 6.0, 6.0] and saturated[:, 1:].sum() == 0
    # NVFP4: a block of 1e-3 beside a block of 1e4: its e4m3 block scale clamps to e4m3's smallest normal
    # under the per-tensor scale 1e4 / 2688, and 1e-3 * (2688 / 1e4) / 2^-6 = 0.017 rounds to 0
    y = torch.cat([torch.full((1, 16), 1e4), torch.full((1, 16), 1e-3)], dim=1)
    # NVFP4 under its per-tensor scale never saturates: an e4m3 block scale (clamped to normals) rounds by
    # at most 1/16, and 6 * (1 + 1/16) < 7
    assert tensor_stats(wide((64, 64), -40, 40), "nvfp4").saturation == 0
    s = tensor_stats(y, "nvfp4")
    assert s.underflow == 0.5 and s.saturation == 0 and s.scale is None
    assert roundtrip(y, "nvfp4")[0][0, :16].sub(1e4).abs().max() < 1


# ---- bit for bit -------------------------------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize(
    "fmt", ["e4m3-tensorwise", "e5m2-tensorwise", "e4m3-rowwise", "e5m2-rowwise", "e4m3-rowwise-pow2"]
)
def test_float8_formats_equal_torchaos_float8_training_cast(fmt):
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_training_tensor import hp_tensor_and_scale_to_float8
    from torchao.float8.float8_utils import tensor_to_scale

    dtype = torch.float8_e4m3fn if fmt.startswith("e4m3") else torch.float8_e5m2
    rowwise = "rowwise" in fmt
    for lo, hi in ((-40, 40), (-3, 3), (-140, -120)):  # the last: fp32 denormals
        x = wide((32, 96), lo, hi, seed=lo)
        kw = {"scaling_granularity": ScalingGranularity.AXISWISE, "axiswise_dim": -1} if rowwise else {}
        scale = tensor_to_scale(x, dtype, round_scales_to_power_of_2=fmt.endswith("pow2"), **kw)
        ref = hp_tensor_and_scale_to_float8(x, scale, dtype, axiswise_dim=-1 if rowwise else None)
        q, _ = roundtrip(x, fmt)
        assert torch.equal(bits(q), bits(ref.to_original_precision())), (fmt, lo)


@needs_torchao
def test_mxfp8_rceil_is_the_mxfp8_training_linears_cast_and_does_not_saturate():
    """The mxfp8 mode's MXFP8Linear scales with RCEIL (its default scale_calculation_mode): a block whose
    amax is 1.9 x 2^k saturates under FLOOR (1.9 x 256 = 486 > 464) and not under RCEIL (scaled to <= 448)."""
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    assert MXFP8Linear(32, 32).scale_calculation_mode == ScaleCalculationMode.RCEIL
    x = torch.ones(4, 64)
    x[:, ::32] = 1.9
    assert roundtrip(x, "mxfp8")[1].any()
    q, saturated = roundtrip(x, "mxfp8-rceil")
    assert not saturated.any() and tensor_stats(x, "mxfp8-rceil").saturation == 0
    for lo, hi in ((-40, 40), (-3, 3), (-140, -120)):
        x = wide((32, 128), lo, hi, seed=hi)
        ref = MXTensor.to_mx(x, torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL).dequantize(torch.float32)
        assert torch.equal(bits(roundtrip(x, "mxfp8-rceil")[0]), bits(ref)), lo
    x[0, 0] = 3.4e38  # fp32's largest: ceil(log2(3.4e38 / 448)) = 120, within e8m0; still no saturation
    assert not roundtrip(x, "mxfp8-rceil")[1].any()


@needs_torchao
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_block_formats_equal_torchaos_tensors_and_padding_crops_back(fmt):
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    def ref(x: torch.Tensor) -> torch.Tensor:
        if fmt == "nvfp4":
            t = NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))
        else:
            t = MXTensor.to_mx(x, torch.float8_e4m3fn if fmt == "mxfp8" else torch.float4_e2m1fn_x2, 32)
        return t.dequantize(torch.float32)

    for lo, hi in ((-40, 40), (-3, 3), (-140, -120)):
        x = wide((32, 128), lo, hi, seed=hi)
        q, saturated = roundtrip(x, fmt)
        assert torch.equal(bits(q), bits(ref(x))), (fmt, lo)
        if fmt == "mxfp8" and lo == -140:  # every block's e8m0 scale clamps to 2^-127, divided as 2^-126
            assert not saturated.any()
    x = wide((12, 50), -10, 10, seed=3)  # 50: padded with zeros to 64, cropped back
    assert torch.equal(bits(roundtrip(x, fmt)[0]), bits(ref(F.pad(x, (0, 14)))[:, :50]))
    x3 = x.view(2, 6, 50)  # leading dims flatten into rows: the same numbers and statistics
    q3, sat3 = roundtrip(x3, fmt)
    q2, sat2 = roundtrip(x, fmt)
    assert (
        q3.shape == x3.shape and torch.equal(bits(q3.view(12, 50)), bits(q2)) and torch.equal(sat3.view(12, 50), sat2)
    )
    assert tensor_stats(x3, fmt) == tensor_stats(x, fmt)


def tf32_reference(x: torch.Tensor) -> torch.Tensor:
    """Round to 11 significant bits (nearest, ties to even: np.rint) in fp64, where every step is exact; the
    quantum of fp32's subnormals, 2^-149, becomes 2^-136 once 13 bits are dropped."""
    a = x.double().numpy()
    out = a.copy()
    finite = np.isfinite(a) & (a != 0)
    _, e = np.frexp(a[finite])
    quantum = np.exp2(np.maximum(e - 11, -136).astype(np.float64))
    out[finite] = np.rint(a[finite] / quantum) * quantum
    with np.errstate(over="ignore"):
        return torch.from_numpy(out.astype(np.float32))  # 2^128 (past tf32's largest value) becomes inf


def test_tf32_equals_a_round_to_nearest_even_reference_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    raw = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = (raw & ~0x1FFF) | 0x1000  # exactly half an ulp of tf32: ties, both parities of the kept bit
    x = torch.cat([raw.view(torch.float32), ties.view(torch.float32), wide((5000,), -149, 128)])
    x = x[torch.isfinite(x)]
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4028235e38, -3.4028235e38, 2.0**-149, 1e-45])
    x = torch.cat([x, specials])
    q, saturated = roundtrip(x, "tf32")
    assert torch.equal(bits(q), bits(tf32_reference(x)))
    assert (q[-4:-2].abs() == math.inf).all() and saturated[-4:-2].all()  # fp32's max rounds past tf32's
    nans = torch.tensor([0x7FC00000, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)  # payloads
    assert torch.isnan(roundtrip(nans, "tf32")[0]).all()  # all ones would carry out of a rounded NaN
    # known ties: 1 + 2^-11 (kept bit even) stays 1; 1 + 3 * 2^-11 (odd) goes up to 1 + 2^-9
    assert roundtrip(torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-11]), "tf32")[0].tolist() == [1.0, 1 + 2.0**-9]


@needs_torchao
def test_int8_rowwise_equals_torchaos_int8_mixed_precision_quantizer_bit_for_bit():
    from torchao.prototype.quantized_training.int8 import quantize_int8_rowwise

    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 0.4, -0.0], [0.0] * 8])  # scale 1 and all zero
    for x in (wide((64, 96), -20, 20), wide((8, 40), -140, -120), torch.randn(16, 32) * 3, ties):
        i8, scale = quantize_int8_rowwise(x)
        ref = i8.float() * scale.view(-1, 1)  # its int8 matmul scales the integer result by the row scale
        q, saturated = roundtrip(x, "int8-rowwise")
        assert torch.equal(bits(q), bits(ref)) and not saturated.any()
    assert roundtrip(ties, "int8-rowwise")[0][0].tolist() == [127, 0, 2, 2, 0, -2, 0, 0]
    # a bf16 tensor (a gradient under autocast): torchao's row scale is bf16, rounded
    xb = wide((64, 96), -20, 20, seed=9).bfloat16()
    i8, scale = quantize_int8_rowwise(xb)
    assert scale.dtype == torch.bfloat16
    assert torch.equal(bits(roundtrip(xb, "int8-rowwise")[0]), bits(i8.float() * scale.float().view(-1, 1)))
    assert not torch.equal(roundtrip(xb, "int8-rowwise")[0], roundtrip(xb.float(), "int8-rowwise")[0])


def fp16_scale_reference(amax: float) -> float:
    """The largest 2^k (k in fp32's normal exponents) with amax * 2^k <= 65504, by counting."""
    if amax == 0:
        return 1.0
    k = 127
    while k > -126 and amax * 2.0**k > 65504:
        k -= 1
    return 2.0**k


def test_fp16_scaled_equals_a_reference_loss_scale_then_cast_bit_for_bit():
    cases = [65504.0, float(np.nextafter(np.float32(65504), np.float32(1e9))), 1.0, 2.0**-20, 3e38, 1e-40, 0.75]
    for i, amax in enumerate(cases):
        x = wide((16, 48), -30, 0, seed=i) * amax
        x.view(-1)[7] = amax
        scale = fp16_scale_reference(float(x.abs().max()))
        ref = (x * scale).half().float() / scale
        q, saturated = roundtrip(x, "fp16-scaled")
        assert tensor_stats(x, "fp16-scaled").scale == scale, amax
        assert torch.equal(bits(q), bits(ref)) and not saturated.any(), amax
    assert tensor_stats(torch.tensor([65504.0]), "fp16-scaled").scale == 1.0
    assert tensor_stats(torch.tensor([65505.0]), "fp16-scaled").scale == 0.5


# ---- fields on hand-made tensors -------------------------------------------------------------------------


def test_plain_casts_saturate_only_past_their_range():
    assert roundtrip(torch.tensor([3.4e38, 3.38e38]), "bf16")[1].tolist() == [True, False]
    assert tensor_stats(torch.tensor([1e-39, 1.0]), "bf16").underflow == 0  # bf16 keeps fp32's exponents
    stats = tensor_stats(torch.tensor([2.0**-149, 1.0]), "tf32")
    assert stats.underflow == 0.5 and stats.scale == 1.0  # 2^-149 is below tf32's subnormal quantum 2^-136


@needs_torchao
def test_float8_fields_scale_underflow_and_no_saturation_by_construction():
    x = torch.tensor([[448.0, 2.0**-10, 2.0**-9, 2.0**-11], [1.0, 0.0, -0.0, 3 * 2.0**-11]])
    s = tensor_stats(x, "e4m3-tensorwise")  # amax 448: scale 1; e4m3's smallest subnormal is 2^-9
    assert s.scale == 1.0 and s.saturation == 0 and s.amax == 448
    assert s.underflow == pytest.approx(2 / 6)  # 2^-10 (the tie, to even 0) and 2^-11; 3 * 2^-11 -> 2^-9
    assert tensor_stats(x, "e5m2-tensorwise").scale == 128.0  # 57344 / 448
    rows = torch.tensor([[3.0, 1.0], [1e-6, 2e-6]])  # tensorwise: 2e-6 * 448 / 3 = 3e-4 < 2^-10 flushes
    q, saturated = roundtrip(rows, "e4m3-rowwise-pow2")  # 448 / 3 -> 128, 448 / 2e-6 -> 2^27
    assert not saturated.any() and tensor_stats(rows, "e4m3-rowwise").scale is None
    assert tensor_stats(rows, "e4m3-rowwise").underflow == 0
    assert tensor_stats(rows, "e4m3-tensorwise").underflow == 0.5  # the second row under 3's scale


def test_int8_rowwise_fields():
    x = torch.tensor([[127.0, 0.4, 0.5, 0.6], [-254.0, 1.0, 2.0, 0.9]])  # scales 1 and 2
    q, saturated = roundtrip(x, "int8-rowwise")
    assert q.tolist() == [[127, 0, 0, 1], [-254, 0, 2, 0]]  # 0.5 and 1 / 2 are ties, to even 0
    s = tensor_stats(x, "int8-rowwise")
    assert s.underflow == pytest.approx(4 / 8) and s.saturation == 0 and s.scale is None


# ---- shapes, availability, randomness ---------------------------------------------------------------------


def test_odd_shapes_and_many_formats_agree_with_one():
    for x in (torch.tensor(3.0), torch.tensor([1.0, -2.0, 0.0]), torch.empty(0, 5)):
        for fmt in TORCHAO:
            q, saturated = roundtrip(x, fmt)
            assert q.shape == x.shape and saturated.shape == x.shape, fmt
    assert math.isnan(tensor_stats(torch.empty(0, 5), "fp16").sqnr_db)
    x = wide((6, 64), -8, 8)
    many = tensor_stats_many(x, TORCHAO)
    assert list(many) == TORCHAO and all(many[f] == tensor_stats(x, f) for f in TORCHAO)
    with pytest.raises(ValueError, match="format='fp12'"):
        tensor_stats(x, "fp12")


def test_no_draw_from_torchs_random_generator():
    state = torch.get_rng_state()
    tensor_stats_many(wide((8, 64)), TORCHAO)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_format_needing_torchao_is_unavailable_with_the_reason_when_the_import_fails(monkeypatch):
    x = wide((4, 32), -4, 4)
    fp16 = tensor_stats(x, "fp16")
    why = "needs torchao (torchao.float8.float8_utils: ImportError: no); pip install torchao"
    monkeypatch.setattr("suite.modes.torchao_calls.import_torchao", lambda module: (None, why))
    for fmt in FORMATS:
        needs = fmt.startswith(("e4m3", "e5m2", "mx", "nv"))
        assert formats.format_unavailable(fmt) == (why if needs else None), fmt
    with pytest.raises(RuntimeError, match="'mxfp8' cannot be computed here: needs torchao"):
        roundtrip(x, "mxfp8")
    assert tensor_stats(x, "fp16") == fp16  # the SQNR falls back to the same formula


def test_stats_read_the_device_once_and_sqnr_is_the_docstrings_formula(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):  # .item(), bool(t), float(t): each a host sync on a GPU
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    tolist, calls = torch.Tensor.tolist, []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(t.shape) or tolist(t))
    x = wide((16, 64), -6, 6)
    with Syncs():
        many = tensor_stats_many(x, TORCHAO)
    assert Syncs.count == 0 and len(calls) == 1
    a = x.double().numpy()
    for fmt in ("bf16", "int8-rowwise"):
        q = roundtrip(x, fmt)[0].double().numpy()
        assert many[fmt].sqnr_db == pytest.approx(10 * np.log10((a**2).sum() / ((a - q) ** 2).sum()), rel=1e-12)


# ---- chunks of rows: bounded memory, the whole tensor's answers ---------------------------------------------


def chunked(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """x's round trip as tensor_stats_many takes it, chunk by chunk, put back together (q, saturated, the
    tensor-level scale each chunk used)."""
    rows = x.reshape(-1, x.shape[-1])
    whole = format_stats._whole(rows, [fmt])
    parts = [formats._roundtrip(c, fmt, x.dtype, whole) for c in format_stats._chunks(rows)]
    q, saturated = (torch.cat([p[i] for p in parts]).reshape(x.shape) for i in (0, 1))
    return q, saturated, [p[2] for p in parts]


def unchunked_stats(x: torch.Tensor, fmt: str) -> tuple[float, float, float, float]:
    """amax, underflow, saturation, SQNR as tensor_stats computed them before chunks: the whole tensor's round
    trip, torchao's compute_error on fp64 copies of it."""
    xf = x.float()
    q, saturated = roundtrip(x, fmt)
    nonzero = xf != 0
    under = (nonzero & (q == 0)).sum().double() / nonzero.sum().clamp(min=1)
    sat = saturated.sum().double() / max(x.numel(), 1)
    return xf.abs().amax().item(), under.item(), sat.item(), _sqnr(xf.double(), q.double()).item()


def with_outlier(inf_first: bool = False) -> torch.Tensor:
    """(4, 3, 50): 12 rows of 50 columns (not a multiple of 16 or 32), an outlier of 2^20 in the last row."""
    x = wide((4, 3, 50), -8, 8, seed=3)
    x[-1, -1, 7] = 2.0**20
    if inf_first:  # fp16-scaled's loss scale comes from the finite amax, in another chunk than the inf
        x[0, 0, 3] = float("inf")
    return x


@needs_torchao
@pytest.mark.parametrize("rows_per_chunk", [1, 3, 5])
@pytest.mark.parametrize("fmt", FORMATS)
def test_chunks_round_trip_bit_for_bit_as_the_whole_tensor(fmt, rows_per_chunk, monkeypatch):
    monkeypatch.setattr(format_stats, "CHUNK_ELEMENTS", rows_per_chunk * 50 + 7)  # 12 / 3 rows: 4 chunks; 5: 3
    for x in (with_outlier(), with_outlier(inf_first=True), with_outlier().bfloat16()):
        q, saturated, scales = chunked(x, fmt)
        q_whole, sat_whole, scale_whole = formats._roundtrip(x.float().contiguous(), fmt, x.dtype)
        assert torch.equal(bits(q), bits(q_whole)) and torch.equal(saturated, sat_whole), (fmt, x.dtype)
        assert len(scales) == -(-12 // rows_per_chunk)
        for scale in scales:  # every chunk used the whole tensor's scale
            assert (scale is None) == (scale_whole is None) and (scale is None or torch.equal(scale, scale_whole))


@needs_torchao
@pytest.mark.parametrize("fmt", ["e4m3-tensorwise", "e5m2-tensorwise", "fp16-scaled", "nvfp4"])
def test_the_first_chunk_underflows_under_the_last_chunks_outlier_as_in_the_whole_tensor(fmt, monkeypatch):
    monkeypatch.setattr(format_stats, "CHUNK_ELEMENTS", 3 * 50)
    x = with_outlier() * 2.0**-10  # values 2^-18 to 2^-2
    x[-1, -1, 7] = 2.0**30  # amax / smallest ~2^48: beyond e5m2's 2^32 range too
    first = x[0]  # the first chunk: 3 rows
    lost = ((first != 0) & (chunked(x, fmt)[0][0] == 0)).sum()
    alone = ((first != 0) & (roundtrip(first, fmt)[0] == 0)).sum()
    assert lost > alone, (fmt, lost, alone)  # its own amax would have kept more of them
    assert tensor_stats(x, fmt).underflow == unchunked_stats(x, fmt)[1]


@needs_torchao
@pytest.mark.parametrize("chunk", [7, 150, 2**22])
def test_chunked_statistics_equal_the_unchunked_ones_in_every_format(chunk, monkeypatch):
    monkeypatch.setattr(format_stats, "CHUNK_ELEMENTS", chunk)  # 7: a row per chunk; 150: 3 rows; 2^22: one chunk
    for x in (with_outlier(), with_outlier(inf_first=True), with_outlier().bfloat16(), torch.zeros(5, 40)):
        many = tensor_stats_many(x, FORMATS)
        for fmt in FORMATS:
            amax, under, sat, sqnr = unchunked_stats(x, fmt)
            s = many[fmt]
            assert (s.amax, s.underflow, s.saturation) == (amax, under, sat), (fmt, x.dtype)
            # the sums' order differs: fp64 rounding, here within 1e-12 relative
            assert s.sqnr_db == pytest.approx(sqnr, rel=1e-12, nan_ok=True), (fmt, x.dtype)


def test_the_memory_a_big_tensors_statistics_take_is_bounded_by_the_chunk(tmp_path):
    # a fresh process: its peak resident memory (maxrss) is its own, whatever else the machine runs. 1 MiB
    # chunks of fp32: the round trips' temporaries stay ~15 chunk sizes; before chunks (the whole tensor
    # copied to fp64, padded, scaled, masked) they took 7.5 to 11x the 49 MiB tensor
    script = """
import resource, sys, torch
from suite.modes import format_stats, formats
format_stats.CHUNK_ELEMENTS = 2**18
fmts = ["fp16", "e4m3-tensorwise", "mxfp4", "nvfp4"]
fmts = [f for f in fmts if formats.format_unavailable(f) is None]
format_stats.tensor_stats_many(torch.randn(4, 100), fmts)  # imports and first calls, before x
x = torch.randn(256, 50257, generator=torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
format_stats.tensor_stats_many(x, fmts)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / x.nbytes)
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    growth = float(done.stdout.split()[-1])
    assert growth < 1.0, f"maxrss grew by {growth:.2f}x the tensor"
