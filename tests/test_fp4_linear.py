"""FP4Linear (suite/modes/fp4_linear.py): which operands each GEMM quantizes and how, the recipe switches acting
where they should and nowhere else, Parameters kept, seeded determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from suite.modes import fp4_linear
from suite.modes.fp4_linear import FP4Linear
from suite.modes.fp4_quant import mxfp4_qdq, nvfp4_qdq
from suite.policy import GEMM_KINDS, FP4Recipe, parse_fp4_recipe

N, IN, OUT = 64, 32, 48  # tokens, in, out: distinct, so a GEMM is known by its output's shape
KIND_OF_SHAPE = {(N, OUT): "forward", (N, IN): "grad_input", (OUT, IN): "grad_weight"}
QDQ = {"nvfp4": nvfp4_qdq, "mxfp4": mxfp4_qdq}


def _layer(fmt: str, recipe: str, high: tuple[str, ...] = (), seed: int = 0, tokens: int = N) -> tuple:
    """(FP4Linear, its input x, an output gradient dy), all drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    old = nn.Linear(IN, OUT)
    layer = FP4Linear.from_linear(old, fmt, parse_fp4_recipe(fmt, recipe), high)
    x = torch.randn(2, tokens // 2, IN, requires_grad=True)
    x.data[0, 1, 3] = 40.0  # an outlier token
    dy = torch.randn(2, tokens // 2, OUT).bfloat16()
    return layer, x, dy


def _run(layer: FP4Linear, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(y, grad x, grad W, grad b) of one forward and backward under bf16 autocast, as the modes run it."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


class _MatmulSpy(TorchDispatchMode):
    """The operands of every aten.mm, keyed by GEMM kind (known by the output's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default and tuple(out.shape) in KIND_OF_SHAPE:
            self.seen[KIND_OF_SHAPE[tuple(out.shape)]] = (args[0].clone(), args[1].clone())
        return out


@pytest.mark.parametrize("fmt,recipe", [("nvfp4", "none"), ("nvfp4", "2d"), ("mxfp4", "none")])
@pytest.mark.parametrize("high", [(), ("forward",), ("grad_input",), ("grad_weight",), ("forward", "grad_weight")])
def test_each_gemm_runs_on_quantized_fp32_or_bf16_operands(fmt: str, recipe: str, high: tuple[str, ...]) -> None:
    """A kind kept high multiplies the bf16 operands; the others multiply fp32 operands equal to the operands'
    quantization along the GEMM's reduction dim (RN here: no sr, no rht), so they lie on the format's grid."""
    layer, x, dy = _layer(fmt, recipe, high)
    spy = _MatmulSpy()
    with spy:
        _run(layer, x, dy)
    assert set(spy.seen) == set(GEMM_KINDS)
    xb, wb, dyb = x.detach().reshape(N, IN).bfloat16(), layer.weight.detach().bfloat16(), dy.reshape(N, OUT)
    q = QDQ[fmt]
    w_q = nvfp4_qdq(wb, two_d=True) if recipe == "2d" else None
    want = {
        "forward": (xb, wb.t()) if "forward" in high else (q(xb), (q(wb) if w_q is None else w_q).t()),
        "grad_input": (dyb, wb) if "grad_input" in high else (q(dyb), q(wb.t()).t() if w_q is None else w_q),
        "grad_weight": (dyb.t(), xb) if "grad_weight" in high else (q(dyb.t()), q(xb.t()).t()),
    }
    for kind in GEMM_KINDS:
        a, b = spy.seen[kind]
        dtype = torch.bfloat16 if kind in high else torch.float32
        assert a.dtype == b.dtype == dtype, kind
        assert torch.equal(a, want[kind][0]) and torch.equal(b, want[kind][1]), kind


def test_layer_formats_say_what_each_kind_ran_in() -> None:
    """The record's answer (the mode's layer_formats) for an FP4Linear keeping grad_weight high."""
    from models import GPT, GPTConfig
    from suite.hardware import DeviceInfo
    from suite.modes import build_mode

    mode = build_mode("mxfp4", DeviceInfo("cpu", "test cpu"), "grad_weight", "sr")
    model = mode.prepare(GPT(GPTConfig.preset("tiny"), seed=0))
    assert isinstance(model.blocks[0].mlp.c_fc, FP4Linear) and model.blocks[0].mlp.c_fc.high_gemms == ("grad_weight",)
    formats = mode.layer_fields()["layer_formats"]["blocks.0.mlp.c_fc"]
    assert formats == {"forward": "mxfp4", "grad_input": "mxfp4", "grad_weight": "bf16"}


def test_stochastic_rounding_touches_the_gradients_only() -> None:
    """Spy on the quantizer: a generator goes with dy's quantizations (both backward GEMMs) and nothing else;
    and a layer with another SR seed gives a bit-identical forward but other input and weight gradients."""
    layer, x, dy = _layer("nvfp4", "sr,rht,2d")
    calls = []
    real = fp4_linear.nvfp4_qdq

    def spy(t: torch.Tensor, **kw) -> torch.Tensor:
        calls.append((tuple(t.shape), kw.get("generator") is not None))
        return real(t, **kw)

    fp4_linear.nvfp4_qdq = spy
    try:
        y, gx, gw, _ = _run(layer, x, dy)
    finally:
        fp4_linear.nvfp4_qdq = real
    with_generator = {shape for shape, sr in calls if sr}
    assert with_generator == {(N, OUT), (OUT, N)}  # dy for grad_input, dy^T (after RHT) for grad_weight
    assert {shape for shape, sr in calls if not sr} == {(N, IN), (OUT, IN), (IN, N)}  # x, W (2d), x^T

    other, _, _ = _layer("nvfp4", "sr,rht,2d")
    other.sr_seed += 1
    y2, gx2, gw2, _ = _run(other, x, dy)
    assert torch.equal(y, y2)
    assert not torch.equal(gx, gx2) and not torch.equal(gw, gw2)


def test_hadamard_changes_the_weight_gradient_gemm_only() -> None:
    with_rht, x, dy = _layer("nvfp4", "sr,rht,2d")
    without, _, _ = _layer("nvfp4", "sr,2d")  # same seed: same weights, signs and SR seed
    y, gx, gw, gb = _run(with_rht, x, dy)
    y2, gx2, gw2, gb2 = _run(without, x, dy)
    assert torch.equal(y, y2) and torch.equal(gx, gx2) and torch.equal(gb, gb2)
    assert not torch.equal(gw, gw2)
    # both estimate the same product: with RN, the 4-bit error is of the order of the gradient's size / 10
    exact = dy.reshape(N, OUT).float().t() @ x.detach().reshape(N, IN).float()
    for g in (gw, gw2):
        assert (g - exact).norm() < 0.3 * exact.norm()


def test_weight_gradient_pads_tokens_with_zero_tokens() -> None:
    """20 tokens (not a multiple of 16) give the grad_weight of the same 20 plus 12 zero tokens (32, no pad)."""
    layer, x, dy = _layer("nvfp4", "rht", tokens=20)
    _, _, gw, _ = _run(layer, x, dy)
    x32 = torch.cat([x.detach().reshape(20, IN), torch.zeros(12, IN)]).reshape(2, 16, IN)
    dy32 = torch.cat([dy.reshape(20, OUT), torch.zeros(12, OUT, dtype=torch.bfloat16)]).reshape(2, 16, OUT)
    _, _, gw32, _ = _run(layer, x32, dy32)
    assert torch.equal(gw, gw32)
    mx, x, dy = _layer("mxfp4", "sr,rht", tokens=20)  # mxfp4 pads to 32
    assert torch.isfinite(_run(mx, x, dy)[2]).all()


def test_from_linear_keeps_the_parameters_and_a_tie() -> None:
    torch.manual_seed(0)
    emb, head = nn.Embedding(50, IN), nn.Linear(IN, 50, bias=False)
    head.weight = emb.weight  # GPT-2's tied LM head
    new = FP4Linear.from_linear(head, "nvfp4", FP4Recipe(True, True, True), ())
    assert new.weight is emb.weight and new.bias is None
    idx = torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", torch.bfloat16):
        logits = new(emb(idx))
    logits.float().logsumexp(-1).sum().backward()
    g = emb.weight.grad
    assert g is not None and g.dtype == torch.float32
    unused = sorted(set(range(50)) - set(idx.flatten().tolist()))
    assert g[unused].abs().sum() > 0  # the head's gradient reached the shared Parameter (rows not looked up)
    old = nn.Linear(IN, OUT)
    layer = FP4Linear.from_linear(old, "nvfp4", parse_fp4_recipe("nvfp4", ""), ())
    assert layer.weight is old.weight and layer.bias is old.bias
    assert list(layer.parameters()) == [old.weight, old.bias]
    _, x, dy = _layer("nvfp4", "")
    _run(layer, x, dy)
    assert old.weight.grad.dtype == old.bias.grad.dtype == torch.float32 and old.weight.grad.abs().sum() > 0
    torch.testing.assert_close(old.bias.grad, dy.float().sum((0, 1)), rtol=1e-2, atol=1e-2)
    assert list(layer.state_dict()) == ["weight", "bias"]  # the RHT buffer is not persistent


@pytest.mark.parametrize("fmt,recipe", [("nvfp4", "sr,rht,2d"), ("mxfp4", "sr,rht")])
def test_seeded_layers_are_bit_identical(fmt: str, recipe: str) -> None:
    a = _run(*_layer(fmt, recipe, seed=0))
    b = _run(*_layer(fmt, recipe, seed=0))
    c = _run(*_layer(fmt, recipe, seed=1))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[2], c[2])
    first, _, _ = _layer(fmt, recipe, seed=0)
    again, _, _ = _layer(fmt, "none", seed=0)  # the draws do not depend on the recipe
    assert torch.equal(first.rht, again.rht) and first.sr_seed == again.sr_seed


def test_bad_arguments_are_refused_in_one_line() -> None:
    lin = nn.Linear(IN, OUT)
    with pytest.raises(ValueError, match="fmt='int4'"):
        FP4Linear.from_linear(lin, "int4", FP4Recipe(), ())
    with pytest.raises(ValueError, match="mxfp4 has none: drop 2d"):
        FP4Linear.from_linear(lin, "mxfp4", FP4Recipe(False, False, True), ())
    with pytest.raises(ValueError, match="high_gemms='backward'"):
        FP4Linear.from_linear(lin, "nvfp4", FP4Recipe(), ("backward",))
    with pytest.raises(ValueError, match=r"nvfp4_qdq: x has shape \(\); give a 2-D tensor for two_d"):
        nvfp4_qdq(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"nvfp4_qdq: x has shape \(4,\)"):
        nvfp4_qdq(torch.ones(4), two_d=True)
    with pytest.raises(ValueError, match="mxfp4_qdq: x is 0-d"):
        mxfp4_qdq(torch.tensor(1.0))


def test_its_repr_says_format_recipe_and_kept_gemms() -> None:
    layer = FP4Linear.from_linear(nn.Linear(IN, OUT), "nvfp4", parse_fp4_recipe("nvfp4", "sr,2d"), ("grad_weight",))
    assert repr(layer).endswith("bias=True, fmt=nvfp4, recipe=sr,2d, high_gemms=grad_weight)")
    plain = FP4Linear.from_linear(nn.Linear(IN, OUT), "mxfp4", parse_fp4_recipe("mxfp4", "none"), ())
    assert "recipe=none, high_gemms=none" in repr(plain)


def test_runs_on_a_meta_model_and_under_torch_compile() -> None:
    with torch.device("meta"):
        meta = nn.Linear(IN, OUT)
    layer = FP4Linear.from_linear(meta, "nvfp4", FP4Recipe(True, True, True), ())
    assert layer(torch.empty(4, IN, device="meta")).shape == (4, OUT) and layer.rht.is_meta
    layer, x, dy = _layer("nvfp4", "sr,rht,2d")
    eager = _run(layer, x, dy)
    layer, x, dy = _layer("nvfp4", "sr,rht,2d")
    compiled = torch.compile(layer, backend="aot_eager")  # the GEMMs run eagerly between graphs
    assert all(torch.equal(u, v) for u, v in zip(eager, _run(compiled, x, dy), strict=True))


@pytest.mark.parametrize("amax", [1.0, 1.2, 1.3, 1.5, 1.9, 7.0])
def test_mxfp4_stochastic_rounding_is_unbiased_at_the_top_of_a_block(amax: float) -> None:
    """MXFP4's FLOOR scale puts a block's amax in [4, 8) (in units of its scale) and e2m1 stops at 6: without the
    3/4 taken after the scale, a block whose amax mantissa is above 1.5 saturates its largest values and SR
    rounds them low every time. Over amax mantissas across [1, 2) (1.2 broke a pre-scale applied before the
    scale), the layer's SR path averages to x on every element, the top one included."""
    spec = fp4_linear._Spec("mxfp4", sr=True, rht=False, two_d=False, high=frozenset())
    t = torch.linspace(0.05, 1.0, 32).reshape(1, 32) * amax
    gen = torch.Generator().manual_seed(0)
    n = 4000
    draws = torch.stack([spec.q(t, gen) for _ in range(n)])
    step = 2.0 ** (int(torch.tensor(amax).log2().floor()) - 2) * 2 / 0.75  # the widest grid step, in x's units
    bound = 6 * step * 0.5 / n**0.5  # 6 sigma of a mean of n draws, sigma <= step / 2
    assert (draws.mean(0) - t).abs().max() < bound
    if amax in (1.9, 7.0):  # round to nearest: the top value saturates to 6 x scale, as SR without 3/4 would
        assert (mxfp4_qdq(t) - t)[0, -1] < -bound


def test_each_data_parallel_rank_draws_its_own_stochastic_rounding(monkeypatch) -> None:
    """Every rank builds its layers under the same case seed; the SR stream is offset by the rank, so two ranks'
    gradients are rounded independently (averaged by DDP, their rounding errors shrink) and one rank's stays
    the seeded one."""
    grads = []
    for rank in (0, 1):
        monkeypatch.setattr(fp4_linear.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(fp4_linear.dist, "get_rank", lambda rank=rank: rank)
        layer, x, dy = _layer("nvfp4", "sr")
        grads.append(_run(layer, x, dy))
    assert torch.equal(grads[0][0], grads[1][0])  # the forward has no SR
    assert not torch.equal(grads[0][1], grads[1][1])  # the input gradient's SR differs per rank
    monkeypatch.setattr(fp4_linear.dist, "is_initialized", lambda: False)
    layer, x, dy = _layer("nvfp4", "sr")
    assert torch.equal(_run(layer, x, dy)[1], grads[0][1])  # rank 0 is the single-process stream
