import pytest
import torch

from suite.hardware import DeviceInfo
from suite.modes import MODES, get_mode
from suite.modes.base import fp32_precision_state, tf32_enabled, tf32_matmuls
from suite.modes.int8_weight import is_int8_weight
from suite.modes.pure_fp16 import DynamicLossScaler
from suite.running.runner import run_cases
from suite.training.data import make_corpus
from suite.training.train import run_case
from tests.helpers import numerics_globals, small_case

CPU = DeviceInfo("cpu", "test cpu")
T4 = DeviceInfo("cuda", "Tesla T4", (7, 5))
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))

# What each mode stores where, on a CPU: (weights, grads, optimizer state, compute).
EXPECTED_STORAGE = {
    "fp32": (["float32"], ["float32"], ["float32"], "fp32"),
    "amp-fp16": (["float32"], ["float32"], ["float32"], "fp16"),
    "bf16": (["float32"], ["float32"], ["float32"], "bf16"),
    "pure-fp16": (["float16"], ["float16"], ["float16"], "fp16"),
    # bf16 block Linears (int8 data, bf16 scales and biases), fp32 embeddings and norms
    "int8-weight": (["bfloat16", "float32", "int8"], ["bfloat16", "float32"], ["bfloat16", "float32"], "bf16"),
}


def test_registry_names_match_classes():
    assert list(MODES) == ["fp32", "tf32", "amp-fp16", "bf16", "pure-fp16", "int8-weight", "pure-bf16",
                           "pure-bf16-sr", "int8-mixed", "fp8-tensorwise", "fp8-rowwise", "mxfp8", "nvfp4",
                               "mxfp4"]  # fmt: skip
    for name, mode in MODES.items():
        assert mode.name == name and mode.summary


def test_unknown_mode_lists_known_ones():
    with pytest.raises(ValueError, match="amp-fp16"):
        get_mode("fp8")


@pytest.fixture(scope="module")
def cpu_records():
    return {r["mode"]: r for r in run_cases([small_case(mode=m) for m in EXPECTED_STORAGE], log=None, isolate=False)}


@pytest.mark.parametrize("mode", EXPECTED_STORAGE)
def test_storage_dtypes_per_mode(cpu_records, mode):
    r = cpu_records[mode]
    assert r["status"] == "ok", r["reason"]
    weights, grads, state, compute = EXPECTED_STORAGE[mode]
    assert (r["weight_dtypes"], r["grad_dtypes"], r["optimizer_state_dtypes"], r["compute_dtype"]) == (
        weights,
        grads,
        state,
        compute,
    )


# The AdamW each mode's record says ran on a CPU (suite.modes.optimizer; the same on CUDA): fused where every
# parameter allows; torchao's int8 weights are tensor subclasses that fused and foreach refuse.
EXPECTED_OPTIMIZER = {
    "fp32": "torch AdamW (fused)",
    "amp-fp16": "torch AdamW (fused)",
    "bf16": "torch AdamW (fused)",
    "pure-fp16": "torch AdamW (fused)",
    "int8-weight": "torch AdamW (fused: 20 tensors; for-loop: 8 tensors)",
}


@pytest.mark.parametrize("mode", EXPECTED_STORAGE)
def test_optimizer_impl_per_mode(cpu_records, mode):
    assert cpu_records[mode]["optimizer_impl"] == EXPECTED_OPTIMIZER[mode]


def test_all_modes_start_from_the_same_weights_and_batches(cpu_records):
    assert len({r["init_digest"] for r in cpu_records.values()}) == 1
    assert len({r["data_digest"] for r in cpu_records.values()}) == 1
    # same weights and first batch: the first losses differ only by each mode's rounding
    first = [r["loss_curve"][0] for r in cpu_records.values()]
    assert max(first) - min(first) < 0.02, first


def test_int8_weight_quantizes_exactly_the_block_linears():
    import models

    case = small_case(mode="int8-weight")
    mode = get_mode("int8-weight")(CPU)
    model = mode.prepare(models.GPT(case.model_config))
    quantized = {n for n, p in model.named_parameters() if is_int8_weight(p)}
    block_linears = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")
    }
    assert quantized == block_linears and len(quantized) == 4 * case.model_config.n_layer
    assert model.wte.weight.dtype == torch.float32 and model.lm_head.weight is model.wte.weight


def test_int8_weight_decay_is_applied_to_int8_weights():
    """With zero gradients Adam moves nothing, so only decoupled decay shrinks the weights."""
    import models

    mode = get_mode("int8-weight")(CPU)
    model = mode.prepare(models.GPT(small_case().model_config))
    opt = mode.make_optimizer(model, lr=0.1, weight_decay=1.0)  # shrink by 10% a step
    w = model.blocks[0].mlp.c_fc.weight
    before = w.dequantize().norm().item()
    loss = sum((p.float() * 0).sum() for p in model.parameters())
    mode.backward_and_step(loss, opt)
    after = w.dequantize().norm().item()
    assert after == pytest.approx(0.9 * before, rel=0.02)


@pytest.fixture
def caller_enabled_tf32():
    """The caller's process runs with TF32 on: 'reset to default' would then be caught too."""
    with tf32_matmuls(True):
        yield


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_restores_globals(mode, caller_enabled_tf32):
    before = numerics_globals()
    cls = get_mode(mode)
    if cls.unavailable_reason(CPU) is None:
        case = small_case(mode=mode, steps=2)
        corpus = make_corpus(None, case.model_config.vocab_size)
        train = corpus.batches(2, 2, 32, 0)
        run_case(case, CPU, corpus, train, train[:1])
    else:  # tf32 cannot train here, but its numerics context still sets and restores globals
        with cls(H100).numerics():
            assert tf32_enabled()
    assert numerics_globals() == before


def test_fp32_turns_tf32_off_inside_even_when_caller_enabled_it(caller_enabled_tf32):
    with get_mode("fp32")(CPU).numerics():
        state = fp32_precision_state()
        assert not tf32_enabled() and torch.get_float32_matmul_precision() == "highest"
        assert state["cudnn.allow_tf32"] is False and state["mkldnn.matmul"] == "ieee"  # oneDNN (CPU): full fp32
    assert tf32_enabled()


def _flags_agree() -> bool:
    """Both generations of TF32 flags read without raising and say the same (Inductor reads the legacy one)."""
    state = fp32_precision_state()
    assert not [name for name, value in state.items() if str(value).startswith("unreadable")], state
    tf32 = state["cuda.matmul"] == "tf32"
    assert (torch.get_float32_matmul_precision() != "highest") is tf32 is torch.backends.cuda.matmul.allow_tf32
    assert state["cudnn.allow_tf32"] is (state["cudnn.conv"] == "tf32") is (state["cudnn.rnn"] == "tf32")
    return tf32


@pytest.mark.parametrize("caller_tf32", [False, True])
@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_sets_legacy_and_new_tf32_flags_in_agreement(mode, caller_tf32):
    """pytorch/pytorch#166387: with only the new flag set, torch.get_float32_matmul_precision() raises, and
    Inductor calls it while compiling a CUDA matmul (tf32 --compile). Checked inside each mode's numerics()
    and after it, from a caller with TF32 off and on (set through the legacy API, as a user's script may)."""
    with tf32_matmuls(caller_tf32):
        before = fp32_precision_state()
        cls = get_mode(mode)
        with cls(CPU if cls.unavailable_reason(CPU) is None else H100).numerics():
            assert _flags_agree() is cls.allow_tf32
        assert _flags_agree() is caller_tf32 and fp32_precision_state() == before


def test_tf32_context_restores_after_an_exception():
    before = numerics_globals()
    with pytest.raises(RuntimeError), tf32_matmuls(True):
        raise RuntimeError("boom")
    assert numerics_globals() == before


@pytest.mark.parametrize(
    "mode, device, expected",
    [
        ("tf32", CPU, "needs a CUDA GPU"),
        ("tf32", T4, "tf32 needs compute capability 8.0; this GPU (Tesla T4) is 7.5"),
        ("tf32", H100, None),
        ("bf16", T4, "bf16 needs compute capability 8.0; this GPU (Tesla T4) is 7.5"),
        ("bf16", CPU, None),
        ("bf16", H100, None),
        ("int8-weight", T4, "compute capability 8.0"),
        ("int8-weight", H100, None),
        ("fp32", T4, None),
        ("amp-fp16", T4, None),
        ("pure-fp16", CPU, None),
    ],
)
def test_unavailable_reasons_on_fake_devices(mode, device, expected):
    reason = get_mode(mode).unavailable_reason(device)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_int8_weight_computes_in_bf16_on_cuda_and_on_cpu():
    assert get_mode("int8-weight")(H100).compute == get_mode("int8-weight")(CPU).compute == "bf16"


def _fp16_param(value: float) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    return p, torch.optim.SGD([p], lr=1.0)


def test_loss_scaler_skips_and_backs_off_on_overflow():
    scaler = DynamicLossScaler(init_scale=2.0**16)
    p, opt = _fp16_param(1.0)
    loss = (p.float() * 1e4).sum()  # grad 1e4 * 65536 overflows fp16's 65504
    assert scaler.backward_and_step(loss, opt) is False
    assert scaler.scale == 2.0**15
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.float16))  # untouched


def test_loss_scaler_unscales_fp16_grads_and_grows():
    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=2)
    p, opt = _fp16_param(1.0)
    for _ in range(2):
        opt.zero_grad()
        assert scaler.backward_and_step((p.float() * 0.5).sum(), opt) is True
        assert p.grad.dtype == torch.float16
        assert torch.allclose(p.grad.float(), torch.full((4,), 0.5))  # unscaled
    assert scaler.scale == 2048.0  # doubled after two clean steps


def test_tf32_mode_turns_tf32_on_and_restores():
    before = numerics_globals()
    assert not tf32_enabled()
    with get_mode("tf32")(H100).numerics():
        assert tf32_enabled()
    assert numerics_globals() == before


def test_int8_weight_bf16_path_runs_every_matmul_in_bf16():
    """The CUDA path (bf16), which the CPU now takes too: forward and backward matmuls all in bf16, and
    it trains. With fp32 scales torchao's backward would mix fp32 and bf16 and fail."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    import models
    from suite.training.train import storage_dtypes, train_step

    mode = get_mode("int8-weight")(CPU)
    model = mode.prepare(models.GPT(small_case().model_config))
    opt = mode.make_optimizer(model, lr=3e-3, weight_decay=0.1)
    matmuls: Counter = Counter()

    class CountMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("mm", "addmm", "bmm")):
                matmuls[tuple(str(a.dtype) for a in args if torch.is_tensor(a))] += 1
            return func(*args, **(kwargs or {}))

    batch = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with CountMatmuls():
        first, stepped = train_step(model, mode, opt, batch)
    assert stepped and set(matmuls) == {("torch.bfloat16", "torch.bfloat16")} and sum(matmuls.values()) > 20
    losses = [train_step(model, mode, opt, batch)[0].item() for _ in range(3)]
    assert losses[-1] < first.item() - 0.5
    storage = storage_dtypes(model, opt)
    assert storage["weight_dtypes"] == ["bfloat16", "float32", "int8"]
    assert storage["grad_dtypes"] == storage["optimizer_state_dtypes"] == ["bfloat16", "float32"]
