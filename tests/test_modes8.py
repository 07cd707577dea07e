"""Issue 14's modes: fp8 (tensorwise, rowwise), MXFP8, int8 matmuls, pure bf16 with and without
stochastic rounding; emulation decisions on fake 8.0 / 8.9 / 9.0 / 10.0 GPUs and the peak dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import GPT, GPTConfig
from suite.hardware import DeviceInfo
from suite.metrics.flops import utilization_fields
from suite.modes import MODES, get_mode
from suite.modes.base import decide
from suite.modes.pure_bf16_sr import StochasticRoundingAdamW, stochastic_round_bf16
from suite.modes.torchao_calls import check_tokens, master_weight, select_linears
from suite.policy import LayerPolicy

HEAD = LayerPolicy(lm_head=True)  # the 8-bit modes' default policy
CPU = DeviceInfo("cpu", "test cpu")
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))
L40S = DeviceInfo("cuda", "NVIDIA L40S", (8, 9))
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0))
NEW = ["pure-bf16", "pure-bf16-sr", "int8-mixed", "fp8-tensorwise", "fp8-rowwise", "mxfp8"]
EMULABLE = ["fp8-tensorwise", "fp8-rowwise", "mxfp8"]

# (mode, device) -> "native" | "emulated" (CPU, or a GPU below the mode's capability with --emulate) | "skip"
DECISIONS = {
    ("fp8-tensorwise", CPU): "emulated", ("fp8-tensorwise", A100): "skip", ("fp8-tensorwise", L40S): "native",
    ("fp8-tensorwise", H100): "native", ("fp8-tensorwise", B200): "native",
    ("fp8-rowwise", A100): "skip", ("fp8-rowwise", H100): "native",
    ("mxfp8", CPU): "emulated", ("mxfp8", H100): "skip", ("mxfp8", B200): "native",
    ("int8-mixed", CPU): "native", ("int8-mixed", H100): "native", ("int8-mixed", A100): "native",
    ("pure-bf16", H100): "native", ("pure-bf16-sr", CPU): "native",
}  # fmt: skip


@pytest.mark.parametrize(("mode", "device"), DECISIONS)
def test_skip_or_emulate_decisions(mode, device, monkeypatch):
    monkeypatch.setattr("suite.modes.mxfp8.has_cuda_kernel", lambda op: True)  # torchao's CUDA extension loaded
    cls = get_mode(mode)
    skip, emulated = decide(cls, device, emulate=False)
    expected = DECISIONS[(mode, device)]
    assert (skip is not None, emulated is not None) == (expected == "skip", expected == "emulated")
    if expected == "skip":  # names the capability needed and the one found, and the way out
        need = "10.0" if mode == "mxfp8" else "8.9"
        assert need in skip and ".".join(map(str, device.capability)) in skip and "--emulate" in skip
        skip, emulated = decide(cls, device, emulate=True)
        assert skip is None and "emulated" in emulated and device.name in emulated
    if expected == "native":
        assert decide(cls, device, emulate=True) == (None, None)  # --emulate never slows a capable GPU


def test_mxfp8_on_blackwell_without_torchaos_cuda_cast_is_skipped_or_emulated_not_crashed(monkeypatch):
    """torchao 0.18's MXFP8 backward calls torch.ops.torchao.mxfp8_quantize on 10.0+ GPUs, implemented only in
    its _C_mxfp8 extension: without it the op exists and the first backward fails on the CUDA backend."""
    from suite.modes import mxfp8

    asked = []
    monkeypatch.setattr(mxfp8, "has_cuda_kernel", lambda op: asked.append(op) or False, raising=False)
    skip, emulated = decide(get_mode("mxfp8"), B200, emulate=False)
    assert asked == ["torchao::mxfp8_quantize"] and emulated is None
    assert "_C_mxfp8" in skip and "mpbench doctor" in skip and "--emulate" in skip
    skip, emulated = decide(get_mode("mxfp8"), B200, emulate=True)
    assert skip is None and "_C_mxfp8" in emulated and get_mode("mxfp8")(B200).emulated


def test_has_cuda_kernel_reads_the_dispatcher():
    """The boundary on this CPU build: an op defined with no CUDA kernel (torchao's, when its extension did
    not load), one that has a CUDA kernel, and one not defined at all."""
    from suite.modes.torchao_calls import has_cuda_kernel

    lib = torch.library.Library("mpbench_test_cast", "DEF")
    try:
        lib.define("cast(Tensor x) -> Tensor")
        assert not has_cuda_kernel("mpbench_test_cast::cast")
        lib.impl("cast", lambda x: x, "CUDA")
        assert has_cuda_kernel("mpbench_test_cast::cast")
    finally:
        lib._destroy()
    assert not has_cuda_kernel("mpbench_test_cast::never_defined")
    assert not has_cuda_kernel("aten::mm")  # a CPU build of torch: no CUDA kernels at all


def test_older_gpus_skip_int8_and_pure_bf16_with_the_capability():
    t4 = DeviceInfo("cuda", "Tesla T4", (7, 5))
    for mode in ("int8-mixed", "pure-bf16", "pure-bf16-sr"):
        skip, _ = decide(get_mode(mode), t4, emulate=True)  # not emulable: --emulate does not help
        assert "8.0" in skip and "7.5" in skip


# (mode, GPU) -> the peak the MFU is measured against (dense TFLOP/s)
PEAK = {
    ("fp8-tensorwise", H100): ("fp8", 1979.0), ("fp8-rowwise", B200): ("fp8", 4500.0),
    ("mxfp8", B200): ("mxfp8", 4500.0), ("int8-mixed", H100): ("int8", 1979.0),
    ("pure-bf16", H100): ("bf16", 989.5), ("pure-bf16-sr", B200): ("bf16", 2250.0),
}  # fmt: skip


@pytest.mark.parametrize(("mode", "device"), PEAK)
def test_peak_dtype_each_mode_is_measured_against(mode, device):
    dtype, tflops = PEAK[(mode, device)]
    compute = get_mode(mode)(device).compute
    assert compute == dtype
    fields = utilization_fields(10**15, 1000.0, compute, device)  # 1 PFLOP in 1 s
    assert fields["peak_flops"] == tflops * 1e12 and fields["mfu"] == pytest.approx(1e15 / (tflops * 1e12))


def test_blended_mfu_counts_the_bf16_part_of_an_8_bit_step():
    """Issue 20, defect 15: gpt2-small's LM head and attention (~40% of its counted FLOPs at 1024 tokens) run
    in bf16 in the 8-bit modes; the blended peak weighs each part's FLOPs by its own dtype's peak."""
    from suite.metrics.flops import mode_dtype_share

    cfg = GPTConfig.preset("gpt2-small")
    with torch.device("meta"):
        converted, _ = select_linears(GPT(cfg), 16, "float8", HEAD)  # the 48 block Linears
    share = mode_dtype_share(cfg, 1024, converted)
    c, n = cfg.n_embd, cfg.n_layer  # per token: 6 x 12 C^2 per layer converted; + 6 C V head, 12 L C T attention
    assert share == pytest.approx(6 * 12 * c * c * n / (6 * (12 * c * c * n + c * cfg.vocab_size) + 12 * n * c * 1024))
    assert 0.55 < share < 0.65 and mode_dtype_share(cfg, 1024, None) == 1.0 and mode_dtype_share(cfg, 1024, []) == 0
    # a GEMM kind kept high (--keep-high grad_weight) runs in bf16: a third of the converted Linears' FLOPs leave
    assert mode_dtype_share(cfg, 1024, converted, kept_gemms=1) == pytest.approx(share * 2 / 3)
    f = utilization_fields(10**15, 1000.0, "fp8", H100, share)  # 1 PFLOP/s achieved
    blended = 1 / (share / 1979e12 + (1 - share) / 989.5e12)
    assert f["mode_dtype_flops_share"] == share and f["peak_flops_blended"] == pytest.approx(blended)
    assert f["mfu_blended"] == pytest.approx(1e15 / blended)
    assert f["mfu_blended"] > f["mfu"] == pytest.approx(1e15 / 1979e12)
    plain = utilization_fields(10**15, 1000.0, "bf16", H100)  # no converted layers: blended is the plain MFU
    assert plain["mfu_blended"] == plain["mfu"] and plain["peak_flops_blended"] == plain["peak_flops"]
    no_peak = utilization_fields(10**15, 1000.0, "mxfp8", H100, share)  # Hopper has no MX tensor cores
    assert no_peak["mfu_blended"] is None and "mxfp8" in no_peak["mfu_reason"]
    cpu = utilization_fields(10**15, 1000.0, "fp8", CPU, share)
    assert cpu["mode_dtype_flops_share"] == share and cpu.get("mfu_blended") is None and "CPUs" in cpu["mfu_reason"]


def test_mxfp8_on_hopper_has_no_peak_but_says_why():
    fields = utilization_fields(10**15, 1000.0, get_mode("mxfp8")(H100).compute, H100)
    assert fields["mfu"] is None and "mxfp8" in fields["mfu_reason"] and "H100" in fields["mfu_reason"]


def test_cpu_default_leaves_the_slow_modes_out_and_all_runs_them():
    from suite.cli.run import _parse_modes, default_modes

    assert _parse_modes("all") == list(MODES)
    assert set(default_modes("cuda")) == set(MODES)
    assert not set(NEW) & set(default_modes("cpu"))
    assert "fp32" in default_modes("cpu")


def test_layers_that_break_the_multiple_of_16_rule_stay_high_precision():
    cfg = GPTConfig.preset("tiny", n_embd=48, n_head=4)  # 48 x 144, 48 x 48, 48 x 192, 192 x 48: all fine
    converted, kept = select_linears(GPT(cfg), 16, "float8", HEAD)
    assert len(converted) == 8 and [k.split(" ")[0] for k in kept] == ["lm_head"]
    odd = GPT(GPTConfig.preset("tiny", n_embd=40, n_head=4))  # 40 x 120, 40 x 40, 40 x 160: not multiples of 16
    converted, kept = select_linears(odd, 16, "float8", HEAD)
    assert converted == [] and len(kept) == 9
    assert all("multiples of 16" in k for k in kept if not k.startswith("lm_head"))
    assert len(select_linears(odd, 8, "int8", HEAD)[0]) == 8  # int8 needs multiples of 8 only


def test_gpt2_lm_head_stays_high_by_the_default_policy_and_by_its_shape():
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2-small"))
    converted, kept = select_linears(model, 16, "float8", HEAD)
    assert len(converted) == 48 and kept == [
        "lm_head (768 x 50257): kept in bf16 by the layer policy lm_head (LM head)"
    ]
    converted, kept = select_linears(model, 16, "float8", LayerPolicy())  # policy none: 50257 is not a multiple of 16
    assert len(converted) == 48 and kept == [
        "lm_head (768 x 50257): float8 needs both dimensions to be multiples of 16 (--vocab-multiple 64 rounds the "
        "vocabulary up)"
    ]


class _FakeCudaTokens:
    """Stands in for a (B, T) CUDA batch: only what the token check reads."""

    is_cuda = True
    shape = (3, 7)

    def numel(self) -> int:
        return 21


def test_token_count_rule_on_cuda_fails_with_the_fix():
    model = nn.Identity()
    check_tokens(model, 16, "fp8-tensorwise")
    with pytest.raises(ValueError, match=r"3 x 7 = 21 tokens: fp8-tensorwise on CUDA needs a multiple of 16"):
        model(_FakeCudaTokens())
    model(torch.zeros(3, 7))  # a CPU tensor: the CPU kernels have no such rule


class _Block(nn.Module):
    """One block Linear, named as the GPT names them, so the modes convert it."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(n_in, n_out, bias=bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def test_mxfp8_keeps_and_trains_the_bias():
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear

    torch.manual_seed(0)
    model = _Block(64, 32)
    old_bias = model.blocks[0].bias.detach().clone()
    old_weight = model.blocks[0].weight.detach().clone()
    model = get_mode("mxfp8")(CPU).prepare(model)
    layer = model.blocks[0]
    assert isinstance(layer, MXFP8Linear)
    assert torch.equal(layer.bias, old_bias) and torch.equal(master_weight(layer), old_weight)
    assert layer.weight.dtype == torch.bfloat16  # what the MX kernels are handed; the master stays fp32
    out = model(torch.zeros(32, 64))  # zero input: the output is the bias alone (in bf16, as on a GPU)
    assert out.dtype == torch.bfloat16 and torch.equal(out, old_bias.to(torch.bfloat16).expand(32, -1))
    out.sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((32,), 32.0))
    assert master_weight(layer).grad.dtype == torch.float32  # the cast is differentiable: the master learns


def test_mxfp8_scales_each_32_block_where_rowwise_fp8_cannot():
    """A row with one block of 1e6 and the rest 0.1: one scale per row flushes the 0.1s to zero
    (they fall below e4m3's range under the row's scale); MXFP8's per-block scale keeps them."""
    x = torch.full((32, 128), 0.1)
    x[:, :32] = 1e6
    out = {}
    for mode in ("fp8-rowwise", "mxfp8"):
        model = _Block(128, 128, bias=False)
        with torch.no_grad():
            model.blocks[0].weight.copy_(torch.eye(128))
        prepared = get_mode(mode)(CPU)
        with prepared.numerics():  # as the train loop does: globals restored after
            out[mode] = prepared.prepare(model)(x)[:, 64]
    assert torch.all(out["fp8-rowwise"] == 0)
    assert torch.allclose(out["mxfp8"].float(), torch.full((32,), 0.1), rtol=0.07)  # e4m3: 3 mantissa bits


class _CountIntMM(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten._int_mm.default
        return func(*args, **(kwargs or {}))


def test_int8_mixed_really_runs_int8_matmuls():
    """torchao's default int8 config silently does nothing; the swap must: count aten._int_mm."""
    cfg = GPTConfig.preset("tiny")
    mode = get_mode("int8-mixed")(CPU)
    model = mode.prepare(GPT(cfg, seed=0))
    x = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with _CountIntMM() as counter:
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
    # 8 block Linears x (forward, grad input, grad weight)
    assert counter.calls == 3 * len(mode.layer_fields()["converted_layers"]) == 24
    with torch.no_grad():
        reference = F.cross_entropy(GPT(cfg, seed=0)(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert loss.item() != reference.item()  # int8 rounding shows in the loss
    assert abs(loss.item() - reference.item()) < 0.05


def test_stochastic_rounding_is_unbiased():
    # values a third and two thirds of the way between bf16 neighbours, both signs
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    x = torch.tensor([1 + ulp / 3, 1 + 2 * ulp / 3, -(1 + ulp / 3), 1.5 + ulp / 10]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    rounded = stochastic_round_bf16(x, gen).float()
    lo = x.abs().div(ulp).floor().mul(ulp) * x.sign()  # the neighbour toward zero
    hi = lo + ulp * x.sign()
    assert torch.all((rounded == lo) | (rounded == hi))  # only the two neighbours
    sigma = ulp / 2 / 20000**0.5  # std of a mean of 20000 draws, at most
    assert torch.all((rounded.mean(0) - x[0]).abs() < 5 * sigma)
    nearest = x.to(torch.bfloat16).float().mean(0)
    assert (nearest - x[0]).abs().max() > 0.1 * ulp  # round to nearest is biased here
    exact = torch.tensor([2.0, float("inf")])  # representable values never move
    assert torch.equal(stochastic_round_bf16(exact).float(), exact)


def _run_adamw(opt_cls, lr: float, steps: int) -> torch.Tensor:
    p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = opt_cls([p], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        p.grad = torch.ones_like(p)  # a constant gradient: AdamW moves every weight by lr per step
        opt.step()
    return p.detach().float()


def test_stochastic_rounding_keeps_updates_that_round_to_nearest_loses():
    """lr 1e-4 is 1/40 of bf16's spacing below 1.0 (2^-8): torch's AdamW on bf16 never moves."""
    plain = _run_adamw(torch.optim.AdamW, 1e-4, 50)
    sr = _run_adamw(StochasticRoundingAdamW, 1e-4, 50)
    assert torch.all(plain == 1.0)
    assert sr.mean().item() == pytest.approx(1 - 50 * 1e-4, abs=5e-4)  # fp32 AdamW: 0.995


def test_sr_adamw_step_is_adamw_then_a_neighbour():
    torch.manual_seed(0)
    w = torch.randn(1000)
    grads = [torch.randn(1000) for _ in range(3)]
    ref = nn.Parameter(w.to(torch.bfloat16).float())
    mine = nn.Parameter(w.to(torch.bfloat16))
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    my_opt = StochasticRoundingAdamW([mine], lr=1e-2, weight_decay=0.1)
    for g in grads[:1]:  # one step from equal weights: fp32 AdamW's result, then rounded
        ref.grad, mine.grad = g.clone(), g.to(torch.bfloat16)
        ref_opt.step()
        my_opt.step()
    down = ref.detach().to(torch.bfloat16).float()
    spacing = (down.abs() * 2.0**-7).clamp_min(1e-30)
    assert torch.all((mine.float() - ref.detach()).abs() <= spacing * 1.01)
    assert mine.dtype == torch.bfloat16 and my_opt.state[mine]["exp_avg"].dtype == torch.bfloat16


def test_sr_adamw_keeps_ddp_replicas_identical_and_gives_each_fsdp_shard_its_own_noise(monkeypatch):
    """Under DDP every rank steps a whole replica with the same averaged gradient: the ranks must round
    alike, or the replicas drift apart (seeding every stream with seed + rank did that). An FSDP2 shard is
    this rank's part alone and draws from seed + rank, so that shards don't repeat one noise pattern."""
    import torch.distributed as dist

    torch.manual_seed(0)
    w, g = torch.randn(4096), torch.randn(4096)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    replicas = []
    for rank in (0, 1):  # each rank of a DDP job, with the same weights and the same averaged gradient
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        p = nn.Parameter(w.to(torch.bfloat16))
        opt = StochasticRoundingAdamW([p], lr=1e-3, seed=7)
        for _ in range(3):
            p.grad = g.to(torch.bfloat16)
            opt.step()
        replicas.append(p.detach().clone())
    assert torch.equal(replicas[0], replicas[1])
    cpu = torch.device("cpu")  # (rank 1 now) a shard's stream: seed + rank; a whole tensor's: the seed
    assert [opt._generator(cpu, sharded=s).initial_seed() for s in (True, False)] == [8, 7]


@pytest.fixture(scope="module")
def trained():
    """fp32 and every new mode on tiny, 6 steps on the CPU, in this process (emulated where needed)."""
    from suite.running.runner import run_cases
    from tests.helpers import small_case

    cases = [small_case(mode=m, steps=6, warmup=1) for m in ["fp32", *NEW]]
    return {r["mode"]: r for r in run_cases(cases, log=None, isolate=False)}


# what each mode really stores on a CPU: (weights, grads, optimizer state); float8/MX/int8 casts
# happen inside the matmuls, so their master weights, grads and AdamW state stay fp32
STORED = {
    "pure-bf16": ["bfloat16"], "pure-bf16-sr": ["bfloat16"], "int8-mixed": ["float32"],
    "fp8-tensorwise": ["float32"], "fp8-rowwise": ["float32"], "mxfp8": ["float32"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", NEW)
def test_each_mode_trains_tiny_and_its_loss_falls(trained, mode):
    r = trained[mode]
    assert r["status"] == "ok", r["reason"]
    assert r["loss_curve"][-1] < r["loss_curve"][0] and r["final_loss"] < r["initial_loss"]
    assert r["weight_dtypes"] == r["grad_dtypes"] == r["optimizer_state_dtypes"] == STORED[mode]
    assert r["loss_delta_vs_fp32"] is not None and abs(r["loss_delta_vs_fp32"]) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("mode", NEW)
def test_emulated_records_say_so_and_carry_no_speed(trained, mode):
    r = trained[mode]
    assert r["emulated"] is (mode in EMULABLE)
    if mode in EMULABLE:
        assert "emulated" in r["emulated_reason"] and "cpu" in r["emulated_reason"]
        assert r["mfu"] is None and r["mamf"] is None and "emulated" in r["mfu_reason"]
        assert r["step_time_ms"] > 0  # still measured, and marked
    else:
        assert r["emulated_reason"] is None
    if mode in ("int8-mixed", *EMULABLE):
        assert len(r["converted_layers"]) == 8 and r["unconverted_layers"][0].startswith("lm_head (128 x 512)")
        # tiny at 32 tokens, per token: 8 Linears 6 x 2 x 12 x 128^2 = 2.36M of 6 x (2.36M/6 + 128 x 512) + 0.1M
        assert r["mode_dtype_flops_share"] == pytest.approx(2359296 / r["flops_per_token"])
    else:
        assert r["converted_layers"] is None and r["mode_dtype_flops_share"] == 1.0


@pytest.mark.slow
def test_summary_and_report_mark_emulated_and_give_no_speed_up(trained):
    from suite.cli.run import summary_table
    from suite.reporting import table
    from suite.text import render

    text = render(summary_table(list(trained.values())))
    row = next(line for line in text.splitlines() if line.startswith("fp8-tensorwise (emulated)"))
    assert "no cpu kernels" in row
    fp8, fp32 = trained["fp8-tensorwise"], trained["fp32"]
    cells = dict(zip(table.HEADERS, table.cells(fp8, fp32), strict=True))
    assert cells["mode"].text == "fp8-tensorwise (emulated)"
    assert cells["speed-up over fp32 (x)"].value is None and "emulated" in cells["speed-up over fp32 (x)"].reason
    assert table.cells(trained["int8-mixed"], fp32)[4].value is not None  # a native mode keeps its speed-up


@pytest.mark.slow
def test_compare_and_baseline_never_gate_emulated_timings(trained):
    from suite.reporting import baseline
    from suite.reporting.compare import compare_runs

    a = trained["fp8-tensorwise"]
    b = a | {"step_time_ms": a["step_time_ms"] * 10, "tokens_per_s": a["tokens_per_s"] / 10}
    metrics = {row.metric: row.verdict for row in compare_runs([a], [b])}
    assert "step_time_ms" not in metrics and "tokens_per_s" not in metrics
    assert metrics["final_loss"] == "same"  # loss and memory are still compared
    entry = baseline.make_baseline([a])["entries"]["tiny/fp8-tensorwise"]
    assert not any(f.metric == "step_time_ms" for f in baseline.compare(b, entry))
    native = trained["int8-mixed"]
    slow = native | {"step_time_ms": native["step_time_ms"] * 10}
    entry = baseline.make_baseline([native])["entries"]["tiny/int8-mixed"]
    assert any(f.metric == "step_time_ms" and f.regressed for f in baseline.compare(slow, entry))


def test_emulate_flag_and_config_key_reach_the_case(tmp_path):
    from suite.cli.main import build_parser
    from suite.cli.run import cases_from_options, options

    args = build_parser().parse_args(["run", "--device", "cpu", "--modes", "fp8-tensorwise", "--emulate"])
    assert [c.emulate for c in cases_from_options(options(args))] == [True]
    config = tmp_path / "m.toml"
    config.write_text('modes = "all"\nemulate = true\ndevice = "cpu"\n')
    args = build_parser().parse_args(["run", "--config", str(config)])
    cases = cases_from_options(options(args))
    assert [c.mode for c in cases] == list(MODES) and all(c.emulate for c in cases)


def test_modes_command_says_which_run_emulated_and_their_peak_dtype(capsys):
    from suite.cli.main import main

    assert main(["modes", "--device", "cpu"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    # mode | runs here | default run | peak dtype (the narrow layout: suite/cli/main.py cmd_modes)
    assert lines["fp8-tensorwise"].split()[1] == "emulated" and lines["fp8-tensorwise"].split()[-1] == "fp8"
    assert lines["mxfp8"].split()[-1] == "mxfp8" and lines["int8-mixed"].split()[-1] == "int8"
    assert lines["int8-mixed"].split()[1] == "yes" and lines["pure-bf16-sr"].split()[1] == "yes"


def test_fp8_modes_put_back_the_inductor_patch_torchao_makes():
    from torch._inductor.codegen.triton import TritonOverrides

    before = TritonOverrides.__dict__["minimum"], TritonOverrides.__dict__["maximum"]
    mode = get_mode("fp8-tensorwise")(CPU)
    with mode.numerics():
        mode.prepare(_Block(32, 32))
        patched = TritonOverrides.__dict__["minimum"]
    assert patched is not before[0]  # torchao 0.18 did patch it (the test would be void otherwise)
    assert (TritonOverrides.__dict__["minimum"], TritonOverrides.__dict__["maximum"]) == before


def test_missing_torchao_skips_each_torchao_mode_with_the_reason(monkeypatch):
    import importlib

    from suite.modes import torchao_calls

    real = importlib.import_module

    def no_torchao(name: str, *args):
        if name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(torchao_calls.importlib, "import_module", no_torchao)
    for mode in ("int8-mixed", "fp8-tensorwise", "fp8-rowwise", "mxfp8"):
        skip, emulated = decide(get_mode(mode), H100, emulate=True)
        assert skip.startswith(f"{mode} needs torchao") and "pip install torchao" in skip and emulated is None
    with pytest.raises(RuntimeError, match="fp8-tensorwise needs torchao"):
        get_mode("fp8-tensorwise")(CPU).prepare(_Block(16, 16))
    assert decide(get_mode("pure-bf16-sr"), H100, emulate=False) == (None, None)  # torch only


def test_mamf_hint_of_every_mode_names_a_command_that_runs(tmp_path, monkeypatch, capsys):
    """Issue 20, defect 11: the fp8/int8 modes' mamf reason said `mpbench calibrate --dtypes fp8`, which
    calibrate refused. Each mode's hint now either names a dtype calibrate times, or says no ceiling exists."""
    import json

    from suite.cli.main import main
    from suite.hardware import resolve_device
    from suite.metrics import calibration

    here = resolve_device("cpu")  # the device `mpbench calibrate --device cpu` names its file after
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "CPU_SIZES", (64, 128))  # seconds, not minutes
    assert main(["calibrate", "--device", "cpu", "--dtypes", "fp32"]) == 0
    for name, cls in MODES.items():
        compute = cls(here).compute
        ceiling, reason = calibration.ceiling(here, compute)
        if compute == "fp32":
            assert ceiling > 0
        elif "--dtypes" in reason:
            assert f"`mpbench calibrate --dtypes {compute}`" in reason, reason
            out = tmp_path / f"{compute}.json"
            assert main(["calibrate", "--device", "cpu", "--dtypes", compute, "--out", str(out)]) == 0, name
            entry = json.loads(out.read_text())["results"][compute]
            assert entry["flops"] > 0 or entry["reason"]  # timed, or the device lacks the kernel and says so
        else:
            assert reason == calibration.NO_CEILING[compute] and name in ("mxfp8", "nvfp4", "mxfp4"), (name, reason)
            assert main(["calibrate", "--device", "cpu", "--dtypes", compute]) == 2
            assert f"no {compute} ceiling" in capsys.readouterr().err


def test_calibrate_times_the_8_bit_kernels_the_modes_use(monkeypatch):
    """fp8 through torch._scaled_mm and int8 through torch._int_mm, the kernels their modes reach."""
    from suite.metrics import calibration

    seen, layouts = [], set()

    def spy(real, name):
        def call(a, b, *args, **kwargs):
            seen.append(name)
            layouts.add((name, a.stride(1) == 1, b.stride(0) == 1))  # (row-major mat1, column-major mat2)
            return real(a, b, *args, **kwargs)

        return call

    for name in ("_scaled_mm", "_int_mm"):
        monkeypatch.setattr(torch, name, spy(getattr(torch, name), name))
    result = calibration.measure(CPU, ["fp8", "int8"], sizes=(64,), repeats=1)
    assert {"_scaled_mm", "_int_mm"} <= set(seen)
    # the layout the CUDA kernels take: _scaled_mm demands it; _int_mm on CUDA 13 has no kernel for a
    # row-major mat2 (torch's test__int_mm skips that case there), and the CPU accepts anything
    assert layouts == {("_scaled_mm", True, True), ("_int_mm", True, True)}
    assert all(result["results"][d]["flops"] > 0 for d in ("fp8", "int8"))  # torch 2.13's CPU runs both
    broken = DeviceInfo("cpu", "a CPU whose _scaled_mm refuses")
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not supported")))
    skipped = calibration.measure(broken, ["fp8"], sizes=(64,), repeats=1)["results"]["fp8"]
    assert skipped["flops"] is None and "RuntimeError: not supported" in skipped["reason"]


def test_mxfp8_casts_each_weight_once_per_forward(monkeypatch):
    """The weight is presented as bf16 by a parametrization; the input pre-hook casts to bf16 without reading
    the weight (reading it ran the parametrization: a second fp32 -> bf16 cast of every weight per forward)."""
    from suite.modes.mxfp8 import AsDtype

    calls = []
    real = AsDtype.forward
    monkeypatch.setattr(AsDtype, "forward", lambda self, w: calls.append(w.shape) or real(self, w))
    mode = get_mode("mxfp8")(CPU)
    with mode.numerics():
        model = mode.prepare(GPT(GPTConfig.preset("tiny"), seed=0))
        converted = mode.layer_fields()["converted_layers"]
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.zeros(1, 32, dtype=torch.long))
    assert len(calls) == len(converted)
