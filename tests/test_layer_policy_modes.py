"""What a layer policy makes the torchao modes run: every GEMM of every Linear is captured at dispatch (the
operands' dtypes, inside torchao's float8/MX tensors too) and must be what the record's `layer_formats` says; the
LM head, converted when the policy lets it, stays tied to the token embedding; the roofline follows the policy."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import GPT, GPTConfig
from suite.hardware import DeviceInfo
from suite.metrics.roofline import converted_layers, mode_formats, model_gemms
from suite.modes import build_mode
from suite.modes.torchao_calls import master_weight

CPU = DeviceInfo("cpu", "test cpu")
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
TINY = GPTConfig.preset("tiny")
TOKENS = (2, 32)  # 64 tokens: a dimension no Linear of tiny has, so a GEMM's reduction size names its kind
GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten._int_mm.default}


def operand_class(t: torch.Tensor) -> str:
    """What a GEMM operand really holds: a torchao float8/MX tensor's element dtype, else its own."""
    inner = getattr(t, "_data", None)
    inner = getattr(t, "qdata", None) if inner is None else inner
    dtype = (inner if inner is not None else t).dtype
    return "float8" if dtype.itemsize == 1 and dtype.is_floating_point else str(dtype).removeprefix("torch.")


def format_class(fmt: str) -> str:
    """The class of operands a layer_formats entry promises ("e5m2-tensorwise x e4m3-tensorwise": float8)."""
    if fmt.startswith(("e4m3", "e5m2", "mxfp8")):
        return "float8"
    return {"bf16": "bfloat16", "fp32": "float32", "int8-rowwise": "int8"}[fmt]


class GemmSpy(TorchDispatchMode):
    """Each GEMM dispatched: ({its three sizes}, its reduction size, its operands' class)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            a, b = args[-2:]  # addmm: (bias, a, b)
            classes = {operand_class(a), operand_class(b)}
            assert len(classes) == 1, (func, classes)  # both operands of one GEMM in one arithmetic
            self.seen[(frozenset((*a.shape, b.shape[1])), a.shape[1], classes.pop())] += 1
        return func(*args, **(kwargs or {}))


def expected_gemms(model: GPT, layer_formats: dict[str, dict[str, str]]) -> Counter:
    """The GEMMs `layer_formats` promises, keyed as GemmSpy sees them."""
    tokens = TOKENS[0] * TOKENS[1]
    out: Counter = Counter()
    for fqn, kinds in layer_formats.items():
        layer = model.get_submodule(fqn)
        dims = frozenset((tokens, layer.in_features, layer.out_features))
        reduction = {"forward": layer.in_features, "grad_input": layer.out_features, "grad_weight": tokens}
        for kind, fmt in kinds.items():
            out[(dims, reduction[kind], format_class(fmt))] += 1
    return out


def prepared(mode: str, keep_high: str) -> tuple[object, GPT]:
    m = build_mode(mode, CPU, keep_high)
    torch.manual_seed(0)
    with m.numerics():  # torchao's process-wide inductor patch undone on exit, as a run does
        return m, m.prepare(GPT(TINY, seed=0))


def step_gemms(m: object, model: GPT) -> Counter:
    """One forward and backward of `model` under the mode, every GEMM captured."""
    idx = torch.randint(0, TINY.vocab_size, TOKENS, generator=torch.Generator().manual_seed(1))
    spy = GemmSpy()
    with spy:
        with m.forward_context():  # type: ignore[attr-defined]
            loss = torch.nn.functional.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten())
        loss.backward()
    return spy.seen


@pytest.mark.parametrize(
    "mode, keep_high",
    [
        ("fp8-tensorwise", "block:0"),  # block 0 kept, block 1 and the LM head converted
        ("fp8-tensorwise", "lm_head,grad_input"),  # one GEMM kind kept (the weight seen as bf16 for it)
        ("fp8-rowwise", "first:1,forward,grad_weight"),
        ("int8-mixed", "last:1"),
        ("int8-mixed", "lm_head,forward"),
        ("int8-mixed", "forward"),  # the converted LM head has no bias: its kept forward must not return bf16
        ("int8-mixed", "grad_weight"),  # the backward kind torchao runs in fp32
        ("mxfp8", "block:1,grad_weight"),
    ],
)
def test_every_gemm_runs_in_the_arithmetic_layer_formats_says(mode, keep_high):
    m, model = prepared(mode, keep_high)
    formats = m.layer_fields()["layer_formats"]
    linears = [f for f, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert sorted(formats) == sorted(linears)  # every Linear, kept or converted
    assert step_gemms(m, model) == expected_gemms(model, formats)


def test_a_kept_layer_runs_bf16_and_the_converted_ones_do_not():
    m, model = prepared("fp8-tensorwise", "block:0")
    f = m.layer_fields()
    assert [x.split(" ")[0] for x in f["unconverted_layers"]] == [f"blocks.0.{n}" for n in LINEARS]
    assert "kept in bf16 by the layer policy block:0 (block 0)" in f["unconverted_layers"][0]
    assert f["converted_layers"] == [f"blocks.1.{n}" for n in LINEARS] + ["lm_head"]
    assert f["layer_formats"]["blocks.0.mlp.c_fc"] == dict.fromkeys(KINDS, "bf16")
    assert f["layer_formats"]["blocks.1.mlp.c_fc"] == {
        "forward": "e4m3-tensorwise",
        "grad_input": "e5m2-tensorwise x e4m3-tensorwise",
        "grad_weight": "e5m2-tensorwise x e4m3-tensorwise",
    }
    seen = step_gemms(m, model)
    c_attn = frozenset((64, 128, 384))  # blocks' c_attn only: 128 -> 384 is theirs alone
    assert seen[(c_attn, 128, "bfloat16")] == 1 and seen[(c_attn, 128, "float8")] == 1  # forward: kept, converted


def test_a_kept_gemm_kind_runs_high_while_the_others_stay_8_bit():
    m, model = prepared("fp8-tensorwise", "lm_head,grad_weight")
    assert m.layer_fields()["layer_formats"]["blocks.0.attn.c_attn"] == {
        "forward": "e4m3-tensorwise",
        "grad_input": "e5m2-tensorwise x e4m3-tensorwise",
        "grad_weight": "bf16",
    }
    seen = step_gemms(m, model)
    c_attn = frozenset((64, 128, 384))
    assert seen[(c_attn, 64, "bfloat16")] == 2 and seen[(c_attn, 64, "float8")] == 0  # weight grads: bf16
    assert seen[(c_attn, 128, "float8")] == 2 and seen[(c_attn, 384, "float8")] == 2  # forward, grad_input
    # int8-mixed: torchao's config leaves the kind to a plain matmul on the fp32 operands of its int8 kernel
    m, _ = prepared("int8-mixed", "lm_head,grad_weight")
    assert m.layer_fields()["layer_formats"]["blocks.0.attn.c_attn"] == {
        "forward": "int8-rowwise",
        "grad_input": "int8-rowwise",
        "grad_weight": "fp32",
    }
    assert m.tensor_formats()["input"] == "int8-rowwise"  # still quantized for the forward


LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
KINDS = ("forward", "grad_input", "grad_weight")


@pytest.mark.parametrize("mode", ["fp8-tensorwise", "fp8-rowwise", "int8-mixed", "mxfp8"])
def test_the_converted_lm_head_stays_tied_to_the_embedding_through_a_step(mode):
    m, model = prepared(mode, "grad_input" if mode == "fp8-tensorwise" else "none")  # fp8: a parametrized head
    assert "lm_head" in m.layer_fields()["converted_layers"]
    assert master_weight(model.lm_head) is model.wte.weight
    before = model.wte.weight.detach().clone()
    opt = m.make_optimizer(model, 1e-2, 0.0)
    idx = torch.randint(0, TINY.vocab_size, TOKENS, generator=torch.Generator().manual_seed(1))
    with m.forward_context():
        loss = torch.nn.functional.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten())
    m.backward_and_step(loss, opt)
    assert master_weight(model.lm_head) is model.wte.weight  # one matrix, stepped once
    assert not torch.equal(model.wte.weight, before)
    # rows no token of the batch used still move: the LM head's gradient reaches the shared matrix
    unused = sorted(set(range(TINY.vocab_size)) - set(idx.flatten().tolist()))[:4]
    assert not torch.equal(model.wte.weight[unused], before[unused])
    copy = m.eval_model(model)  # the strict-fp32 copy keeps the tie too
    assert copy.lm_head.weight is copy.wte.weight and torch.equal(copy.wte.weight, model.wte.weight)


def test_the_roofline_converts_what_the_policy_converts_and_counts_kept_gemms_at_the_bf16_peak():
    kinds = {}
    for keep_high in ("lm_head", "last:1,lm_head", "grad_weight"):
        m = build_mode("fp8-tensorwise", H100, keep_high)
        converted = converted_layers(m, TINY)
        gemms = model_gemms(TINY, 2, 32, *mode_formats(m, converted))
        kinds[keep_high] = Counter((g.layer.split(".")[0], g.kind, g.compute) for g in gemms if g.kind in KINDS)
    assert kinds["lm_head"][("lm_head", "forward", "bf16")] == 1
    assert kinds["lm_head"][("blocks", "forward", "fp8")] == 8
    assert kinds["last:1,lm_head"][("blocks", "forward", "fp8")] == 4  # block 1 kept: its 4 Linears in bf16
    assert kinds["last:1,lm_head"][("blocks", "forward", "bf16")] == 4
    weight_grads = kinds["grad_weight"]  # every Linear converted, the LM head too; weight gradients bf16
    assert weight_grads[("lm_head", "forward", "fp8")] == 1 and weight_grads[("lm_head", "grad_weight", "bf16")] == 1
    assert weight_grads[("blocks", "grad_weight", "bf16")] == 8 and weight_grads[("blocks", "grad_input", "fp8")] == 8


def test_the_records_roofline_follows_the_cases_policy():
    from suite.metrics.roofline_predict import predict

    a = predict(TINY, 2, 32, "fp8-tensorwise", H100, None, keep_high="lm_head")
    b = predict(TINY, 2, 32, "fp8-tensorwise", H100, None, keep_high="lm_head,grad_weight")
    assert a.inputs["gemm_bytes"] < b.inputs["gemm_bytes"]  # bf16 operands in the kept weight-gradient GEMMs


@pytest.mark.parametrize(
    "mode, keep_high",
    [("fp8-tensorwise", "none"), ("fp8-rowwise", "none"), ("int8-mixed", "none"), ("mxfp8", "none"),
     ("fp8-tensorwise", "grad_input"), ("int8-mixed", "forward,grad_weight"), ("mxfp8", "grad_weight")],
)  # fmt: skip
def test_the_gpu_kernels_contracts_hold_with_the_lm_head_converted_and_gemm_kinds_kept(mode, keep_high, monkeypatch):
    """tests/test_kernel_contracts.py's spies (the dtypes, layouts and shapes torchao's GPU kernels accept) on the
    CPU run of a policy: the converted LM head and the GEMMs around a kept kind keep them too."""
    import torch.nn.functional as F

    from tests.test_kernel_contracts import BATCH, PER_LAYER, KernelSpies

    m = build_mode(mode, CPU, keep_high)
    spies = KernelSpies(monkeypatch)
    with m.numerics():
        model = m.prepare(GPT(TINY, seed=0))
        with m.forward_context():
            loss = F.cross_entropy(model(BATCH[:, :-1]).float().flatten(0, 1), BATCH[:, 1:].flatten())
        spies.phase = "backward"
        loss.backward()
    assert spies.broken == [], spies.broken[:5]
    converted = m.layer_fields()["converted_layers"]
    assert "lm_head" in converted
    if keep_high == "none":  # every GEMM of every converted Linear through the checked kernel boundary
        ((boundary, _),) = {(b, None) for b, _ in spies.calls}
        forward, backward = PER_LAYER[boundary]
        assert spies.count(boundary, "forward") == forward * len(converted) == forward * 9
        assert spies.count(boundary, "backward") == backward * len(converted)


def test_a_converted_lm_head_leaves_the_activation_traffic_as_it_was():
    """The activations between layers stay bf16 when a policy converts the LM head (they were counted at the head's
    1-byte input format: 17% less traffic); a converted int8-mixed head writes fp32 logits (its fp32 operands)."""
    from suite.metrics.roofline_predict import predict

    h100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 1)
    cfg = GPTConfig.preset("gpt2-small", vocab_multiple=64)
    rest = {(m, k): predict(cfg, 8, 1024, m, h100, keep_high=k).inputs["rest_bytes"]
            for m in ("fp8-tensorwise", "int8-mixed") for k in ("lm_head", "none")}  # fmt: skip
    assert rest["fp8-tensorwise", "none"] == rest["fp8-tensorwise", "lm_head"]  # bf16 logits either way
    logits = 8 * 1024 * 50304
    assert rest["int8-mixed", "none"] > rest["int8-mixed", "lm_head"] + logits  # 4-byte logits, read and written
