"""The format each torchao-backed mode names in `tensor_formats` is what torchao does to its GEMM operands.

`mpbench run --numerics` records, per Linear and role, `suite.modes.formats.roundtrip` of the tensor `watch`
hands over in the format `mode.tensor_formats(layer)[role]` names. Nothing else ties that name to torchao: the
mxfp8 mode was once recorded with FLOOR scales while MXFP8Linear casts with RCEIL. So one training step of each
mode on the tiny CPU model runs with torchao's casting functions wrapped, and every operand torchao quantized
(the high-precision tensor it was given and what it made of it, dequantized in fp32) is compared bit for bit:

- with `roundtrip` in the mode's format, in the orientation torchao scales it (all three GEMMs captured);
- with the tensors `watch` hands the record for that layer (same values, up to the cast the mode applies
  before torchao: its bf16 pre-hook, the bf16 weight view);
- end to end: `roundtrip` of `watch`'s tensor, as the record computes it, against torchao's operand.

Orientation: formats.py scales rows along the LAST dimension. The record's three roles meet torchao in that
orientation at their first GEMM: the forward's input (tokens, in) and weight (out, in) (float8 hands torchao
W^T and scales along its dim 0: W's rows), and the input-gradient GEMM's grad_output (tokens, out). The other
casts run along another dimension: the input-gradient GEMM's weight along `out` (W^T's rows), and the
weight-gradient GEMM's grad_output and input along the token dimension; for those, the same format applied to
the transposed tensor is what torchao does (tensorwise scales have no orientation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from models import GPT
from suite.hardware import DeviceInfo
from suite.modes import get_mode
from suite.modes.formats import roundtrip
from suite.modes.torchao_calls import import_torchao
from suite.training.numerics import watch
from suite.training.train import train_step
from tests.helpers import small_case

_NEEDED = (
    "torchao.float8.float8_linear",
    "torchao.prototype.moe_training.mxfp8_linear",
    "torchao.prototype.quantized_training.int8_mixed_precision",
)
_MISSING = next((why for why in (import_torchao(m)[1] for m in _NEEDED) if why), None)
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"torchao is missing or broken: {_MISSING}")

CPU = DeviceInfo("cpu", "test cpu")
RECORDED = ("input", "weight", "grad_output")  # the roles torchao quantizes (grad_weight is a GEMM's result)


@dataclass(frozen=True)
class Operand:
    """One cast inside a converted Linear: which role's tensor torchao got, in which GEMM, whether it is that
    tensor transposed (W^T, input^T...), and whether torchao's rows/blocks run along its last dimension."""

    role: str
    gemm: str
    transposed: bool
    along_last: bool

    @property
    def record_orientation(self) -> bool:
        """Whether torchao scales it as formats.py does the record's tensor (rows along the role's last dim)."""
        return self.along_last != self.transposed


FWD, DGRAD, WGRAD = "forward", "input-gradient", "weight-gradient"
# The casts of one converted Linear, in call order (forward, then backward), read in torchao 0.18:
# float8/float8_linear.py matmul_with_hp_or_float8_args: hp_tensor_to_float8_dynamic(input, axiswise_dim=-1),
# (W^T, 0); backward: (grad_output, -1), (W^T, -1), (grad_output, 0), (input, 0).
_FLOAT8 = (
    Operand("input", FWD, False, True), Operand("weight", FWD, True, False),
    Operand("grad_output", DGRAD, False, True), Operand("weight", DGRAD, True, True),
    Operand("grad_output", WGRAD, False, False), Operand("input", WGRAD, False, False),
)  # fmt: skip
# prototype/moe_training/mxfp8_linear.py mx_mm: to_mx(input), (W); backward: (grad_output), (W^T contiguous,
# emulated), then the dim1 wrapper's to_mx(grad_output^T), (input^T) for the weight-gradient GEMM.
_MXFP8 = (
    Operand("input", FWD, False, True), Operand("weight", FWD, False, True),
    Operand("grad_output", DGRAD, False, True), Operand("weight", DGRAD, True, True),
    Operand("grad_output", WGRAD, True, True), Operand("input", WGRAD, True, True),
)  # fmt: skip
# prototype/quantized_training/int8_mixed_precision.py _dynamic_int8_mm(A, B) quantizes A and B^T row-wise:
# forward (input, W^T) -> input, W; grad_input (grad_output, W) -> grad_output, W^T; grad_weight
# (input^T, grad_output) -> input^T, grad_output^T.
_INT8 = (
    Operand("input", FWD, False, True), Operand("weight", FWD, False, True),
    Operand("grad_output", DGRAD, False, True), Operand("weight", DGRAD, True, True),
    Operand("input", WGRAD, True, True), Operand("grad_output", WGRAD, True, True),
)  # fmt: skip
OPERANDS = {"fp8-tensorwise": _FLOAT8, "fp8-rowwise": _FLOAT8, "mxfp8": _MXFP8, "int8-mixed": _INT8}
MODES = tuple(OPERANDS)


@dataclass
class Cast:
    hp: torch.Tensor  # what torchao was given (a copy)
    deq: torch.Tensor  # what it made of it, dequantized to fp32, in hp's shape


@dataclass
class Step:
    formats: dict[str, dict[str, str]]  # layer -> role -> format
    casts: dict[str, list[Cast]]  # layer -> its casts in call order
    watched: dict[str, dict[str, torch.Tensor]]  # layer -> role -> copy of what watch handed over


def _spy(mode: str, monkeypatch: pytest.MonkeyPatch, record) -> None:
    """Wrap the function through which torchao casts each operand of the mode's GEMMs."""
    if mode.startswith("fp8"):
        from torchao.float8 import float8_linear

        real = float8_linear.hp_tensor_to_float8_dynamic

        def float8(hp_tensor, *args, **kwargs):
            out = real(hp_tensor, *args, **kwargs)
            # dequantized as the emulated GEMM does (float8_ops.py: a._data.float() / a._scale). Not
            # to_original_precision(): it divides in the original dtype (bf16 for the input), a rounding the
            # GEMM never sees; the float8 value itself is the same.
            record(hp_tensor, out._data.float() / out._scale)
            return out

        monkeypatch.setattr(float8_linear, "hp_tensor_to_float8_dynamic", float8)
    elif mode == "mxfp8":
        from torchao.prototype.mx_formats import mx_tensor

        real = mx_tensor.to_mx

        def to_mx(data_hp, elem_dtype, block_size, *args, **kwargs):
            # the module-level cast: MXTensor.to_mx calls it on the emulated path, and the weight-gradient GEMM's
            # dim1 wrapper (utils._to_mxfp8_dim1_kernel_wrapper, EMULATED) calls it directly on the transpose
            scale, data = real(data_hp, elem_dtype, block_size, *args, **kwargs)
            # to_dtype: what MXTensor.dequantize calls; elements x 2^e, exact in fp32 (and in bf16)
            deq = mx_tensor.to_dtype(data, scale, elem_dtype, block_size, torch.float32)
            record(data_hp, deq.reshape(data_hp.shape))
            return scale, data

        monkeypatch.setattr(mx_tensor, "to_mx", to_mx)
    else:
        from torchao.prototype.quantized_training import int8_mixed_precision

        real = int8_mixed_precision.quantize_int8_rowwise

        def quantize(tensor, *args, **kwargs):
            q, scale = real(tensor, *args, **kwargs)
            # int8 has no dequantize of its own: scaled_int8_mm rescales the exact int32 sums by the row scales
            # (in the tensor's dtype); the operand's value in that GEMM is int8 value x its row's scale
            record(tensor, q.float() * scale.float().view(-1, 1))
            return q, scale

        monkeypatch.setattr(int8_mixed_precision, "quantize_int8_rowwise", quantize)


@functools.cache
def one_step(mode_name: str) -> Step:
    """One training step (batch 2 x 32) of the mode on the tiny model, torchao's casts and `watch` recorded."""
    case = small_case(mode=mode_name)
    mode = get_mode(mode_name)(CPU)
    # the CPU path read in torchao: emulated float8/MX GEMMs (int8's CPU matmuls are real, torch._int_mm)
    assert mode.emulated or mode_name == "int8-mixed"
    torch.manual_seed(case.seed)
    model = GPT(case.model_config, seed=case.seed)
    batch = torch.randint(0, case.model_config.vocab_size, (case.batch_size, case.seq_len + 1))
    casts: dict[str, list[Cast]] = {}
    watched: dict[str, dict[str, torch.Tensor]] = {}
    current: list[str] = []  # the layer whose casts run now

    def record(hp: torch.Tensor, deq: torch.Tensor) -> None:
        assert current, "torchao cast an operand outside a converted layer"
        casts.setdefault(current[0], []).append(Cast(hp.detach().clone(), deq.detach().clone()))

    def on_tensor(layer: str, role: str, tensor: torch.Tensor) -> None:
        watched.setdefault(layer, {})[role] = tensor.detach().clone()
        if role == "grad_output":  # fires just before this layer's backward, where its backward casts run
            current[:] = [layer]

    with mode.numerics(), pytest.MonkeyPatch.context() as mp:
        model = mode.prepare(model)
        layers = mode.layer_fields()["converted_layers"]
        for fqn in layers:
            model.get_submodule(fqn).register_forward_pre_hook(
                lambda m, a, fqn=fqn: current.__setitem__(slice(None), [fqn])
            )
        optimizer = mode.make_optimizer(model, case.learning_rate, case.weight_decay)
        _spy(mode_name, mp, record)
        with watch(model, layers, on_tensor):
            train_step(model, mode, optimizer, batch)
    return Step({fqn: mode.tensor_formats(fqn) for fqn in layers}, casts, watched)


def _operands(mode: str) -> list[tuple[str, int, Operand, Cast, str]]:
    """(layer, index, operand, cast, format) of every cast in the step, checking each layer cast as expected."""
    step, expected = one_step(mode), OPERANDS[mode]
    assert step.casts and set(step.casts) == set(step.formats), "every converted layer, and only those, cast"
    rows = []
    for layer, casts in step.casts.items():
        assert len(casts) == len(expected), f"{layer}: {len(casts)} casts, expected {len(expected)}"
        for i, (op, cast) in enumerate(zip(expected, casts, strict=True)):
            rows.append((layer, i, op, cast, step.formats[layer][op.role]))
    return rows


def _roundtrip_as_torchao(cast: Cast, fmt: str, along_last: bool) -> torch.Tensor:
    """formats.py's round trip of torchao's input, its rows along the dimension given."""
    if along_last:
        return roundtrip(cast.hp, fmt)[0]
    return roundtrip(cast.hp.t(), fmt)[0].t()


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    bad = got != want
    i = bad.nonzero()[0].tolist() if bad.any() else []
    return f"{int(bad.sum())} of {bad.numel()} elements differ, first at {i}: {got[tuple(i)]} vs {want[tuple(i)]}"


@pytest.mark.parametrize("mode", MODES)
def test_the_recorded_roles_round_trip_exactly_as_torchao_quantizes_them(mode):
    """Input and weight of the forward GEMM, grad_output of the input-gradient GEMM: `roundtrip` in the format
    `tensor_formats` names, in formats.py's orientation (the record's), equals torchao's operand bit for bit."""
    seen = set()
    for layer, _, op, cast, fmt in _operands(mode):
        if op.gemm == (DGRAD if op.role == "grad_output" else FWD) and op.role in RECORDED:
            assert op.record_orientation, f"{mode} {op}: the table says torchao scales it across the record's rows"
            got = _roundtrip_as_torchao(cast, fmt, op.along_last)
            assert got.shape == cast.deq.shape and torch.equal(got, cast.deq), (
                f"{mode} {layer} {op.role} ({fmt}): " + _mismatch(got, cast.deq)
            )
            seen.add(op.role)
    assert seen == set(RECORDED)


@pytest.mark.parametrize("mode", MODES)
def test_the_other_gemms_use_the_same_format_along_another_dimension(mode):
    """The casts the record does not see as such (the weight in the input-gradient GEMM, grad_output and input
    in the weight-gradient GEMM): the same format, applied in torchao's orientation, equals torchao's operand
    bit for bit. (Whether formats.py's orientation would differ depends on the data: at initialisation every
    row and column of a weight can share one power-of-two scale, and then rowwise-pow2 and MX agree both ways.)"""
    checked = 0
    for layer, i, op, cast, fmt in _operands(mode):
        if op.record_orientation:
            continue
        got = _roundtrip_as_torchao(cast, fmt, op.along_last)
        assert torch.equal(got, cast.deq), f"{mode} {layer} cast {i} {op} ({fmt}): " + _mismatch(got, cast.deq)
        checked += 1
    assert checked == sum(not op.record_orientation for op in OPERANDS[mode]) * len(one_step(mode).casts)


def _first(mode: str, layer: str, role: str) -> tuple[Operand, Cast]:
    """The cast where the record's role meets torchao in the record's orientation."""
    for op, cast in zip(OPERANDS[mode], one_step(mode).casts[layer], strict=True):
        if op.role == role and op.record_orientation:
            return op, cast
    raise AssertionError(f"{mode}: no cast of {role} in the record's orientation")


def _as_torchao(tensor: torch.Tensor, op: Operand, cast: Cast) -> torch.Tensor:
    """`tensor` (in the record's layout) laid out as torchao's operand: transposed, tokens flattened."""
    return (tensor.t() if op.transposed else tensor).reshape(cast.hp.shape)


@pytest.mark.parametrize("mode", MODES)
def test_watch_hands_over_the_tensors_torchao_quantizes(mode):
    """The record's statistics are taken of `watch`'s tensors: they are torchao's high-precision operands (the
    same values and dtype: mxfp8's weight is its bf16 view, as the parametrization presents it)."""
    step = one_step(mode)
    for layer in step.casts:
        for role in RECORDED:
            op, cast = _first(mode, layer, role)
            mine = step.watched[layer][role]
            assert torch.equal(_as_torchao(mine, op, cast).to(cast.hp.dtype), cast.hp), f"{mode} {layer} {role}"
            assert mine.dtype == cast.hp.dtype, f"{mode} {layer} {role}: {mine.dtype} vs torchao's {cast.hp.dtype}"


# Every recorded role, mxfp8's weight included: `watch` hands over the weight as the module presents it to its GEMM
# (mxfp8's bf16 view of the fp32 master), so the record rounds it once, as torchao does (taking the fp32 master
# rounded twice: ~3% of the elements landed one e4m3 step away, a bf16 midpoint tied to even).
END_TO_END = [(m, r) for m in MODES for r in RECORDED]


@pytest.mark.parametrize(("mode", "role"), END_TO_END)
def test_the_record_round_trips_the_operand_torchao_multiplies(mode, role):
    """End to end, as the Sampler computes it: `roundtrip` of the tensor `watch` hands over, in the mode's format,
    equals torchao's dequantized operand bit for bit."""
    step = one_step(mode)
    for layer in step.casts:
        op, cast = _first(mode, layer, role)
        recorded = roundtrip(step.watched[layer][role], step.formats[layer][role])[0]
        got = _as_torchao(recorded, op, cast)
        assert torch.equal(got, cast.deq), f"{mode} {layer} {role}: " + _mismatch(got, cast.deq)
