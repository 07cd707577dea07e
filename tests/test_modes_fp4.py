"""The nvfp4 and mxfp4 modes: emulated where the kernels are not native, torchao's NVFP4 Linear where its contract
holds (checked on a CPU against a fake Blackwell GPU), the case's policy and recipe handed to FP4Linear, and a
short CPU run whose loss falls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import GPT, GPTConfig
from suite.hardware import DeviceInfo, resolve_device
from suite.modes import build_mode, get_mode
from suite.modes import nvfp4 as nvfp4_mode
from suite.modes.base import decide
from suite.modes.fp4_linear import FP4Linear
from suite.modes.torchao_calls import import_torchao
from suite.policy import FP4Recipe
from suite.running.runner import run_cases
from suite.training.case import Case

CPU = DeviceInfo("cpu", "test cpu")
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0))
TINY = GPTConfig.preset("tiny")  # n_embd 128, vocab 512: every Linear a multiple of 128
FP4 = ("nvfp4", "mxfp4")


@pytest.fixture
def native_b200(monkeypatch):
    """A Blackwell GPU with Triton, as far as the nvfp4 mode can tell (torchao's kernels are spied on, never run)."""
    monkeypatch.setattr(nvfp4_mode, "has_triton", lambda: True)
    return B200


@pytest.mark.parametrize("name", FP4)
def test_cpu_run_trains_marked_emulated_and_the_loss_falls(name):
    """Issue 26 'done when': `mpbench run --modes nvfp4,mxfp4` trains tiny on a CPU, emulated and marked, loss falls."""
    case = Case(mode=name, model="tiny", device="cpu", batch_size=4, seq_len=64, steps=16, warmup=2, lr=3e-3,
                lr_schedule="constant")  # fmt: skip
    (r,) = run_cases([case], log=None, isolate=False)
    assert r["status"] == "ok", r["reason"]
    assert r["emulated"] is True and name.upper() in r["emulated_reason"]
    assert r["mfu"] is None and "emulated" in r["mfu_reason"]
    assert r["keep_high"] == "last:1,lm_head" and r["fp4_recipe"] == FP4Recipe(True, True, name == "nvfp4").text()
    assert r["converted_layers"] == [f"blocks.0.{x}" for x in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert r["layer_formats"]["blocks.0.mlp.c_fc"] == dict.fromkeys(("forward", "grad_input", "grad_weight"), name)
    assert r["layer_formats"]["blocks.1.mlp.c_fc"]["forward"] == "bf16"
    curve = r["loss_curve"]
    assert all(map(math.isfinite, curve)) and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.2, curve


def test_emulation_reasons_per_device(monkeypatch):
    nv, mx = get_mode("nvfp4"), get_mode("mxfp4")
    assert "no cpu kernels" in nv.emulation_reason(CPU)
    assert "compute capability 10.0" in nv.emulation_reason(H100)
    monkeypatch.setattr(nvfp4_mode, "has_triton", lambda: False)
    assert "Triton is not installed" in nv.emulation_reason(B200)
    monkeypatch.setattr(nvfp4_mode, "has_triton", lambda: True)
    assert nv.emulation_reason(B200) is None
    rtx = DeviceInfo("cuda", "NVIDIA GeForce RTX 5090", (12, 0))  # passes torchao's is_sm_at_least_100, unchecked
    assert "target compute capability 10.x; this GPU is 12.0" in nv.emulation_reason(rtx)
    monkeypatch.setattr(nvfp4_mode, "import_torchao", lambda module: (None, "needs torchao (gone)"))
    assert "needs torchao (gone)" in nv.emulation_reason(B200)
    for device in (CPU, H100, B200):  # MXFP4: no training Linear in torchao 0.18, so never native
        assert "no MXFP4 training Linear" in mx.emulation_reason(device)
    # as for every emulated mode: runs on a CPU, skipped on a GPU unless the case asks for --emulate
    assert decide(mx, CPU, emulate=False)[0] is None and "--emulate" in decide(mx, B200, emulate=False)[0]
    assert decide(mx, B200, emulate=True) == (None, f"{mx.emulation_reason(B200)}: {nvfp4_mode.EMULATED}")


def test_not_in_the_default_cpu_matrix_and_fsdp_refused_up_front():
    for name in FP4:
        cls = get_mode(name)
        assert cls.cpu_default is False and cls.no_data_parallel is None
        assert cls.fsdp_plan().unavailable and name in cls.fsdp_plan().unavailable


@pytest.mark.parametrize("name", FP4)
def test_the_case_policy_and_recipe_reach_fp4linear(name, monkeypatch):
    seen = []
    real = FP4Linear.from_linear.__func__

    def spy(cls, old, fmt, recipe, high_gemms=()):
        seen.append((fmt, recipe, tuple(high_gemms)))
        return real(cls, old, fmt, recipe, high_gemms)

    monkeypatch.setattr(FP4Linear, "from_linear", classmethod(spy))
    mode = build_mode(name, CPU, keep_high="first:1,grad_input", fp4_recipe="sr")
    model = mode.prepare(GPT(TINY, seed=0))
    converted = mode.layer_fields()["converted_layers"]
    assert converted == [f"blocks.1.{x}" for x in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + [
        "lm_head"
    ]
    assert seen == [(name, FP4Recipe(stochastic_rounding=True), ("grad_input",))] * len(converted)
    assert model.lm_head.weight is model.wte.weight  # the converted LM head keeps the tie
    assert isinstance(model.blocks[1].mlp.c_fc, FP4Linear) and type(model.blocks[0].mlp.c_fc) is torch.nn.Linear
    # the role formats follow the kept kind: grad_output enters only grad_input and grad_weight, still 4-bit
    assert mode.tensor_formats() == {"input": name, "weight": name, "grad_output": name, "grad_weight": "bf16"}
    both = build_mode(name, CPU, keep_high="forward,grad_input")  # the weight enters only those two: bf16
    assert both.tensor_formats()["weight"] == "bf16" and both.tensor_formats()["input"] == name


class NativeSpy:
    """Stands in for torchao's `nvfp4_mm_triton` (nvfp4_linear.py), whose Triton kernels cannot run here: checks
    what NVFP4Linear hands it against the kernels' contract, then computes the product in bf16 so that autograd
    carries on. Each broken rule is kept."""

    def __init__(self) -> None:
        self.calls = 0
        self.broken: list[str] = []

    def rule(self, ok: bool, text: str) -> None:
        if not ok:
            self.broken.append(text)

    def apply(self, input_hp, weight_hp, bias, sr_seed, sign_vector):
        # nvfp4_mm_triton.forward: M = input.shape[-2], K, N multiples of 128; triton_rht_quantize_row_col and
        # the 2-D weight cast take bf16 (their ValueError "Expected bfloat16"); the SR seed an int64 (1,)
        # buffer; the RHT sign vector 16 entries of +-1
        m, k, n = input_hp.shape[-2], input_hp.shape[-1], weight_hp.shape[0]
        self.rule(m % 128 == 0 and k % 128 == 0 and n % 128 == 0, f"M, K, N = {m}, {k}, {n}: multiples of 128")
        self.rule(input_hp.dtype is torch.bfloat16, f"input {input_hp.dtype}")
        self.rule(weight_hp.dtype is torch.bfloat16 and weight_hp.dim() == 2, f"weight {weight_hp.dtype}")
        self.rule(sr_seed.dtype is torch.int64 and sr_seed.shape == (1,), f"sr_seed {sr_seed.dtype} {sr_seed.shape}")
        self.rule(len(sign_vector) == 16 and set(sign_vector) <= {-1, 1}, f"sign vector {sign_vector}")
        self.calls += 1
        return _SpyMatmul.apply(input_hp, weight_hp, bias, self)


class _SpyMatmul(torch.autograd.Function):
    """nvfp4_mm_triton's dtype flow with a plain matmul: a bf16 product (its scaled_mm output), the bias added
    inside the Function uncast (nvfp4_linear.py: `output = output + bias`: an fp32 bias makes the output and so
    the output gradient fp32), and a backward that checks the output gradient is bf16 (its triton_rht_amax and
    triton_rht_quantize_row_col raise "Expected bfloat16" otherwise)."""

    @staticmethod
    def forward(ctx, x, w, bias, spy):
        ctx.save_for_backward(x, w)
        ctx.spy, ctx.has_bias = spy, bias is not None
        out = x @ w.t()
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        ctx.spy.rule(dy.dtype is torch.bfloat16, f"grad_output {dy.dtype}")
        dy = dy.to(torch.bfloat16)
        grad_bias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
        return dy @ w, dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]), grad_bias, None


def _native_step(mode, seq_len: int = 128):
    """prepare on a CPU model, one forward and backward under the GPU's bf16 autocast."""
    model = mode.prepare(GPT(TINY, seed=0))
    batch = torch.randint(0, TINY.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    return model


def test_native_path_hands_torchao_what_its_kernels_take(native_b200, monkeypatch):
    linear_module, missing = import_torchao("torchao.prototype.moe_training.nvfp4_training.nvfp4_linear")
    assert missing is None, missing
    spy = NativeSpy()
    monkeypatch.setattr(linear_module, "nvfp4_mm_triton", spy)
    mode = build_mode("nvfp4", native_b200)
    assert mode.emulated is False
    model = _native_step(mode)
    converted = mode.layer_fields()["converted_layers"]
    assert spy.broken == [] and spy.calls == len(converted) == 4
    for fqn in converted:
        layer = model.get_submodule(fqn)
        assert type(layer).__name__.startswith("ParametrizedBiasOutsideNVFP4Linear")
        master = layer.parametrizations.weight.original
        assert master.dtype is torch.float32 and master.grad is not None and master.grad.dtype is torch.float32
        assert layer.bias.dtype is torch.float32 and layer.bias.grad.dtype is torch.float32  # through the cast
    assert "emulated" not in mode.layer_fields()
    with pytest.raises(ValueError, match=r"^seq_len=64: nvfp4's native kernels need a multiple of 128"):
        _native_step(build_mode("nvfp4", native_b200), seq_len=64)


@pytest.mark.parametrize(
    "keep_high, recipe, config, why",
    [
        ("", "sr,rht", TINY, "always runs sr,rht,2d; this case's recipe is sr,rht"),
        ("last:1,lm_head,grad_weight", "", TINY, "this case keeps grad_weight in bf16"),
        ("", "", GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=128), "multiples of 128"),
    ],
)
def test_a_case_outside_torchaos_contract_runs_emulated_and_says_why(native_b200, keep_high, recipe, config, why):
    mode = build_mode("nvfp4", native_b200, keep_high, recipe)
    model = mode.prepare(GPT(config, seed=0))
    fields = mode.layer_fields()
    assert (
        fields["emulated"] is True and why in fields["emulated_reason"] and "runs emulated" in fields["emulated_reason"]
    )
    assert all(isinstance(model.get_submodule(f), FP4Linear) for f in fields["converted_layers"])


def test_every_combination_of_the_fp4_modes_is_refused_or_runs_on_this_cpu():
    """tests/test_combinations.py's matrix for the two new modes alone, single process (eager and compiled): the
    distributed columns run there (DDP trains them, FSDP refuses them up front, checked above)."""
    cases = [Case(mode=m, model="tiny", device="cpu", batch_size=2, seq_len=32, steps=3, warmup=2, compile=c)
             for m in FP4 for c in (False, True)]  # fmt: skip
    for r in run_cases(cases, log=None, isolate=False):
        assert decide(get_mode(r["mode"]), resolve_device("cpu"), emulate=False)[0] is None
        assert r["status"] == "ok", f"{r['mode']} compile={r['compile']}: {r['reason']}"
        assert len(r["loss_curve"]) == 3 and all(map(math.isfinite, r["loss_curve"]))


def test_fidelity_covers_the_fp4_modes():
    """`mpbench fidelity` runs every registered mode (suite/cli/fidelity.py, --modes all): the 4-bit ones give
    finite figures against float64, further from it than bf16 and still pointing the same way."""
    from suite.training import fidelity
    from suite.training.data import make_corpus
    from tests.helpers import small_case

    def grad_cos(mode: str) -> float:
        case = small_case(mode=mode, steps=1, warmup=0, batch_size=2, seq_len=32)
        batches = make_corpus(None, case.model_config.vocab_size).batches(1, 2, 32, case.seed)
        return fidelity.record_fields(fidelity.measure(case, resolve_device("cpu"), batches))["grad_cos_vs_fp64"]

    bf16 = grad_cos("bf16")
    for name in FP4:
        assert 0.9 < grad_cos(name) < bf16, name


def test_roofline_and_peaks_say_why_for_4_bit(native_b200):
    """No bound where nothing models 4-bit GEMMs (a native B200 case) or the kernels are emulated; mfu's peak: the
    B200 datasheet's dense FP4 rate for nvfp4, none confirmed for mxfp4, no FP4 tensor cores on a Hopper."""
    from suite.metrics import peaks, roofline_predict

    native = roofline_predict.predict(TINY, 8, 128, "nvfp4", native_b200)
    assert native.step_ms is None and native.reason == f"nvfp4 GEMMs: {roofline_predict.NO_4BIT_ROOFLINE}"
    emulated = roofline_predict.predict(TINY, 8, 128, "mxfp4", native_b200)
    assert emulated.step_ms is None and "no MXFP4 training Linear" in emulated.reason
    assert peaks.peak_flops(B200.name, "nvfp4") == (9000e12, None)
    assert "no confirmed datasheet mxfp4 peak" in peaks.peak_flops(B200.name, "mxfp4")[1]
    assert "no nvfp4 tensor cores" in peaks.peak_flops(H100.name, "nvfp4")[1]


def test_the_4_bit_tolerances_are_what_their_committed_measurement_gives():
    """convergence.MEASURED_4BIT re-derives from results/tolerances/tiny-cpu-8x{64,128}-fp4.jsonl by the table's
    rule: 10 seeds at each size, the widest bound of the two."""
    from pathlib import Path

    from suite.records import store
    from suite.reporting import tolerances
    from suite.reporting.convergence import MEASURED_4BIT, TOLERANCES, tolerance_of

    folder = Path(__file__).resolve().parents[1] / "results" / "tolerances"
    records = store.read_all([str(folder / f"tiny-cpu-8x{t}-fp4.jsonl") for t in (64, 128)])
    derived = {d.mode: d for d in tolerances.derive(records)}
    ((config, table),) = MEASURED_4BIT.items()
    assert set(derived) == set(table) == set(FP4)
    for mode, tol in table.items():
        d = derived[mode]
        assert d.config == config and d.n == 10 and tol.max_delta == pytest.approx(d.bound)
        assert f"{d.mean:+.4f}" in tol.why and d.ci_high <= tol.max_delta and tol.expected_to_lag
        assert d.mean > 0 and d.ci_high - 2 * (d.ci_high - d.mean) > 0  # lags: the interval excludes 0
        record = next(r for r in records if r["mode"] == mode)
        assert tolerance_of(TOLERANCES, record, mode) is tol


def test_the_record_of_a_case_that_left_the_native_path_says_emulated_and_why(monkeypatch):
    """Where the device has native NVFP4 kernels (faked here: the CPU run as if it had them) the runner records
    `emulated: False` from the mode's class; a case outside torchao's contract overrides that from layer_fields."""
    monkeypatch.setattr(nvfp4_mode.NVFP4, "emulation_reason", classmethod(lambda cls, device: None))
    case = Case(mode="nvfp4", model="tiny", device="cpu", batch_size=2, seq_len=32, steps=3, warmup=2, fp4_recipe="sr")
    (r,) = run_cases([case], log=None, isolate=False)
    assert r["status"] == "ok", r["reason"]
    assert r["emulated"] is True and r["emulated_reason"].startswith("torchao's NVFP4 Linear always runs sr,rht,2d")
    assert r["mfu"] is None and r["mfu_reason"].startswith("emulated kernels (torchao's NVFP4 Linear")  # not a speed


def test_a_native_case_whose_torchao_is_gone_at_prepare_fails_in_one_line(native_b200, monkeypatch):
    """The class found torchao's NVFP4 Linear (native); if its import fails by prepare, the case fails with the
    reason (a failed record), not with an AttributeError deep in a swap."""
    mode = build_mode("nvfp4", native_b200)
    assert mode.emulated is False
    monkeypatch.setattr(nvfp4_mode, "import_torchao", lambda module: (None, "needs torchao (gone)"))
    with pytest.raises(RuntimeError, match=r"^nvfp4 needs torchao \(gone\)$"):
        mode.prepare(GPT(TINY, seed=0))
