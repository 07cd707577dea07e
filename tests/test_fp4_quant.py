"""The emulated 4-bit quantizers (suite/modes/fp4_quant.py): round to nearest bit for bit with torchao,
stochastic rounding unbiased and onto the two neighbours, 2-D NVFP4 weight scales, the Hadamard transform."""

from __future__ import annotations

import math

import pytest
import torch

from suite.modes.formats import format_unavailable, roundtrip
from suite.modes.fp4_quant import hadamard_blocks, mxfp4_qdq, nvfp4_qdq, rht_matrix

QDQ = {"nvfp4": nvfp4_qdq, "mxfp4": mxfp4_qdq}
GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # e2m1's magnitudes, code order
needs_torchao = pytest.mark.skipif(
    format_unavailable("nvfp4") is not None or format_unavailable("mxfp4") is not None,
    reason="torchao's NVFP4 / MX tensors are not importable here",
)


def _cases() -> dict[str, torch.Tensor]:
    """Inputs that reach each branch: plain, outliers, scattered zeros, an all-zero block, rows that are not
    a multiple of either block (padded inside), values in fp32's subnormal range, a 3-D and a bf16 input."""
    g = torch.Generator().manual_seed(1)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    outliers = randn(8, 64)
    outliers[::3, 5] = 3e4
    outliers[1, 40] = -1e-4
    zeros = randn(6, 96) * (torch.rand(6, 96, generator=g) > 0.4)
    zero_block = randn(4, 64)
    zero_block[:, :32] = 0.0
    tiny = randn(4, 64) * 1e-39  # MXFP4's e8m0 scale at its floor (2^-127), NVFP4's e4m3 scale at its floor
    return {
        "randn": randn(16, 128) * 3,
        "outliers": outliers,
        "zeros": zeros,
        "zero_block": zero_block,
        "ragged_17": randn(5, 17),
        "ragged_33": randn(7, 33) * 100,
        "tiny": tiny,
        "three_d": randn(2, 3, 48),
        "bf16": randn(8, 64).bfloat16(),
        "all_zero": torch.zeros(4, 32),
    }


@needs_torchao
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("case", list(_cases()))
def test_round_to_nearest_is_torchaos_bit_for_bit(fmt: str, case: str) -> None:
    x = _cases()[case]
    want, _ = roundtrip(x, fmt)  # torchao's to_nvfp4 / to_mx and dequantize (zero padding to the block)
    got = QDQ[fmt](x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bits: -0.0 and 0.0 differ too


@needs_torchao
def test_round_to_nearest_matches_torchaos_tensors_called_directly() -> None:
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    x = _cases()["outliers"]
    nv = NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))
    assert torch.equal(nvfp4_qdq(x), nv.dequantize(torch.float32))
    mx = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32)
    assert torch.equal(mxfp4_qdq(x), mx.dequantize(torch.float32))


def test_nvfp4_amax_makes_rows_round_as_in_the_whole_tensor() -> None:
    x = _cases()["outliers"]
    whole = nvfp4_qdq(x)
    assert torch.equal(nvfp4_qdq(x[2:5], amax=x.abs().amax()), whole[2:5])
    assert not torch.equal(nvfp4_qdq(x[1:2]), whole[1:2])  # its own amax (no outlier in row 1) differs


def _ref_e2m1(v: torch.Tensor) -> torch.Tensor:
    """e2m1 round to nearest by table lookup: the nearest magnitude, a tie to the even code; saturating."""
    dist = (v.abs().clamp(max=6).unsqueeze(-1) - GRID).abs()
    best = dist.min(-1, keepdim=True).values
    ties = dist == best
    code = torch.where(ties.sum(-1) > 1, (ties * torch.arange(8)).amax(-1) // 2 * 2, dist.argmin(-1))
    return torch.copysign(GRID[code], v)


@pytest.mark.parametrize("shape", [(64, 48), (40, 72)])
def test_nvfp4_two_d_is_one_scale_per_16x16_block(shape: tuple[int, int]) -> None:
    """Against a block-by-block reference with the table rounding above (the 40 x 72 case pads both dims)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g)
    w[3, 20] = 50.0  # one block with an outlier: only its 16 x 16 block gets a coarser scale
    got = nvfp4_qdq(w, two_d=True)
    pt = w.abs().amax() / (448 * 6)
    want = torch.empty_like(w)
    for i in range(0, shape[0], 16):
        for j in range(0, shape[1], 16):
            b = w[i : i + 16, j : j + 16]
            s = ((b.abs().amax() / 6) / pt).clamp(2.0**-6, 448).to(torch.float8_e4m3fn).float()
            want[i : i + 16, j : j + 16] = _ref_e2m1(b * ((1.0 / pt) / s)) * (pt * s)
    assert torch.equal(got, want)
    assert not torch.equal(got, nvfp4_qdq(w))  # 1x16 blocks give other values: the test can tell them apart


@pytest.mark.parametrize("shape", [(64, 48), (40, 72), (16, 16)])
def test_nvfp4_two_d_quantizes_w_and_w_transposed_alike(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])  # column scales differ widely
    assert torch.equal(nvfp4_qdq(w.t(), two_d=True), nvfp4_qdq(w, two_d=True).t())
    assert not torch.equal(nvfp4_qdq(w.t().contiguous()), nvfp4_qdq(w).t())  # 1-D blocks do not commute


def _unit_scale_input(fmt: str, n: int) -> tuple[torch.Tensor, dict]:
    """n copies of one row whose scale is exactly 1 (each block holds a 6; NVFP4's per-tensor amax 2688 =
    448 * 6 makes the per-tensor scale 1), so the scaled values are x itself and the grid is e2m1's."""
    g = torch.Generator().manual_seed(4)
    row = (torch.rand(64, generator=g) * 12 - 6).clamp(-5.99, 5.99)
    row[::16] = 6.0
    row[1:8] = torch.tensor([0.25, 0.75, 2.5, 5.0, -0.3, 1.5, 0.0])  # ties, a negative, grid points
    kwargs = {"amax": torch.tensor(448.0 * 6)} if fmt == "nvfp4" else {}
    return row.expand(n, 64).contiguous(), kwargs


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(fmt: str) -> None:
    n = 4000
    x, kw = _unit_scale_input(fmt, n)
    assert torch.equal(QDQ[fmt](x, **kw)[0], _ref_e2m1(x[0]))  # the scale is 1: RN is the table's rounding
    q = QDQ[fmt](x, generator=torch.Generator().manual_seed(0), **kw)
    a = x[0].abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    lo, hi = torch.floor(a / step) * step, torch.floor(a / step) * step + step
    mag = q.abs()
    assert bool(((mag == lo) | (mag == hi)).all()) and bool((torch.sign(q) * torch.sign(x) >= 0).all())
    # q = lo + step * Bernoulli(p), p = (|x| - lo) / step: the mean of n draws has standard deviation
    # step * sqrt(p (1 - p) / n); 6 of them bound 64 elements' deviations with probability 1 - 64 * 2e-9
    p = (a - lo) / step
    bound = 6 * step * torch.sqrt(p * (1 - p) / n)
    assert bool(((q.mean(0) - x[0]).abs() <= bound + 1e-6).all())
    assert bool((q.std(0)[p == 0] == 0).all())  # a value on the grid never moves
    rn_bias = (QDQ[fmt](x[:1], **kw)[0] - x[0]).abs().sum()
    assert (q.mean(0) - x[0]).abs().sum() < rn_bias / 10  # the test would catch SR falling back to RN


def test_stochastic_rounding_follows_its_generator() -> None:
    x = _cases()["randn"]
    draw = lambda seed: nvfp4_qdq(x, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(nvfp4_qdq(x, generator=g), nvfp4_qdq(x, generator=g))  # the stream advances
    # the scales are RN's: every SR value lies within one grid step of RN's, on the same block scale
    assert (draw(7) - nvfp4_qdq(x)).abs().max() <= 2 * (x.abs().amax() / (448 * 6)) * 448


@needs_torchao
def test_rht_matrix_is_torchaos_and_orthogonal() -> None:
    from torchao.prototype.moe_training.nvfp4_training.hadamard_utils import get_rht_matrix

    signs = torch.tensor([1, -1, -1, 1, 1, 1, -1, 1, -1, -1, 1, -1, 1, 1, -1, 1])
    r = rht_matrix(signs)
    assert r.dtype == torch.float32 and r.shape == (16, 16)
    assert torch.equal(r @ r.T, torch.eye(16))  # entries +-1/4: every product and sum is exact
    assert torch.equal(r, get_rht_matrix(tuple(signs.tolist()), "cpu", torch.float32, 16))
    with pytest.raises(ValueError, match="16 values"):
        rht_matrix(signs[:8])


def test_hadamard_blocks_transforms_runs_of_16_along_dim() -> None:
    g = torch.Generator().manual_seed(5)
    r = rht_matrix(torch.randint(0, 2, (16,), generator=g).float() * 2 - 1)
    x = torch.randn(48, 5, generator=g)
    y = hadamard_blocks(x, r, 0)
    for i in (0, 16, 32):
        torch.testing.assert_close(y[i : i + 16].T, x[i : i + 16].T @ r, rtol=0, atol=1e-6)
    torch.testing.assert_close(hadamard_blocks(x.T, r, 1), y.T, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        hadamard_blocks(x[:20], r, 0)


def test_hadamard_on_both_wgrad_operands_leaves_dy_t_x_unchanged() -> None:
    g = torch.Generator().manual_seed(6)
    r = rht_matrix(torch.randint(0, 2, (16,), generator=g).float() * 2 - 1)
    dy, x = torch.randn(128, 24, generator=g), torch.randn(128, 40, generator=g)
    dy[7, 3] = 80.0  # an outlier token: the transform spreads it over its 16-token block
    want = dy.double().T @ x.double()
    got = hadamard_blocks(dy, r, 0).T @ hadamard_blocks(x, r, 0)
    # fp32 rounding of the transform (16 terms) and the product (128 terms), relative to the inputs' size
    tol = 1e-6 * math.sqrt(128) * dy.abs().amax() * x.abs().amax()
    assert (got.double() - want).abs().max() < tol
    assert hadamard_blocks(dy, r, 0).abs().amax() < dy.abs().amax() / 3  # the outlier is spread
