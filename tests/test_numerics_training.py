"""`mpbench run --numerics`: tensor statistics on sampled steps, which train exactly as unsampled ones, are not
timed, and land in the record as equal-length columns in each mode's own formats."""

from __future__ import annotations

import contextlib
import json

import pandas as pd
import pytest
import torch
import torch.nn as nn

from models import GPT
from suite.cli.main import main
from suite.hardware import resolve_device
from suite.metrics.timing import StepTimer
from suite.modes import MODES, get_mode
from suite.modes.formats import format_unavailable
from suite.records import store
from suite.records.cases import CASE_KEY, case_key
from suite.running.execute import train_in_process
from suite.training import numerics as numerics_mod
from suite.training import train as train_mod
from suite.training.data import make_corpus
from suite.training.numerics import (
    COLUMNS,
    NOT_REQUESTED,
    ROLES,
    Sampler,
    default_every,
    linear_layers,
    sampled_steps,
    stepped_weight,
)
from tests.fake_gpu import FakeGpuWindow
from tests.helpers import error_line, small_case

CPU = resolve_device("cpu")
LAYERS = linear_layers(GPT(small_case().model_config, seed=0))  # 9 in tiny: 4 per block and the LM head
# sampled steps of these cases: 1, 3, 6 (first, every third, last); window 2..6, so 2, 4, 5 are timed
STEPS, WARMUP, EVERY = 6, 1, 3


def _case(mode: str = "fp32", every: int = EVERY, **kw):
    return small_case(mode=mode, steps=STEPS, warmup=WARMUP, numerics_every=every, **kw)


def _train(case):
    corpus = make_corpus(None, case.model_config.vocab_size)
    batches = corpus.batches(case.steps, case.batch_size, case.seq_len, case.seed, "train")
    heldout = corpus.batches(case.eval_batches, case.batch_size, case.seq_len, case.seed, "heldout")
    return train_mod.run_case(case, CPU, corpus, batches, heldout)


def drop(key: tuple, i: int) -> tuple:
    return key[:i] + key[i + 1 :]


def test_the_schedule_is_the_first_step_every_nth_and_the_last():
    assert sampled_steps(10, 40) == [1, 10, 20, 30, 40]
    assert sampled_steps(3, 7) == [1, 3, 6, 7] and sampled_steps(0, 7) == []
    assert default_every(40) == 10 and default_every(4) == 2 and default_every(1) == 2  # never every step


def _hook_counts(model: nn.Module) -> tuple[int, int]:
    """(forward hooks, post-accumulate-grad hooks) on the watched Linears and their weight parameters."""
    forward = grad = 0
    for fqn in LAYERS:
        layer = model.get_submodule(fqn)
        forward += len(layer._forward_hooks)
        grad += len(stepped_weight(layer)._post_accumulate_grad_hooks or {})
    return forward, grad


@pytest.mark.parametrize("mode", ["fp32", "amp-fp16", "int8-weight", "mxfp8"])
def test_hooks_exist_only_on_sampled_steps(monkeypatch, mode):
    # int8-weight: torchao's int8 weight subclass; mxfp8: a dtype parametrization over the fp32 master
    seen: list[tuple[int, int]] = []
    real = train_mod.train_step

    def counting(model, *args):
        seen.append(_hook_counts(model))
        return real(model, *args)

    monkeypatch.setattr(train_mod, "train_step", counting)
    _train(_case(mode, every=0))
    base = seen[0]
    assert seen == [base] * STEPS  # without --numerics: the mode's own hooks (none forward) on every step
    seen.clear()
    _train(_case(mode))
    watched = (base[0] + len(LAYERS), base[1] + len(LAYERS))  # one forward and one grad hook per Linear
    assert seen == [watched if step in (1, 3, 6) else base for step in range(1, STEPS + 1)]


def _rng_drawing_stats(real):
    """tensor_stats that draws from the global generators first: the statistics must not move the stream that
    a mode's stochastic rounding draws from (int8-weight's, through torchao)."""

    def stats(x, fmt):
        torch.rand(3)
        return real(x, fmt)

    return stats


@pytest.mark.parametrize("mode", ["fp32", "amp-fp16", "int8-weight", "pure-bf16-sr", "fp8-tensorwise"])
def test_the_loss_curve_is_bit_identical_with_and_without_numerics(monkeypatch, mode):
    # amp-fp16: the hooks see the loss-scaled gradients (GradScaler); int8-weight and pure-bf16-sr: stochastic
    # rounding; fp8-tensorwise: torchao's emulated float8 Linear
    monkeypatch.setattr(numerics_mod, "tensor_stats", _rng_drawing_stats(numerics_mod.tensor_stats))
    plain, sampled = _train(_case(mode, every=0)), _train(_case(mode, every=2))
    assert sampled.numerics["numerics_steps"] == [1, 2, 4, 6]
    assert sampled.loss_curve == plain.loss_curve  # exact equality of every step's loss
    assert sampled.final_loss == plain.final_loss  # the last step's update too (held-out loss after it)
    assert sampled.loss_scale_curve == plain.loss_scale_curve


def test_the_timer_measures_only_unsampled_steps_and_the_window_pauses_for_sampled_ones():
    case = _case()
    mode = get_mode("fp32")(CPU)
    model = GPT(case.model_config, seed=0)
    sampler = Sampler(model, LAYERS, {fqn: mode.tensor_formats(fqn) for fqn in LAYERS}, [1, 3, 6],
                      mode.tensor_formats())  # fmt: skip
    loop = train_mod.TrainLoop(model, mode, mode.make_optimizer(model, 1e-3, 0.1), CPU.torch_device, STEPS, None,
                           sampler=sampler)  # fmt: skip
    batches = make_corpus(None, case.model_config.vocab_size).batches(STEPS, 2, 32, 0, "train")
    paused_at: list[int] = []

    @contextlib.contextmanager
    def pause():
        paused_at.append(loop.done + 1)
        yield

    timer = StepTimer(CPU.torch_device)
    loop.run(batches[:WARMUP])  # warm-up: step 1, sampled, no window
    loop.run(batches[WARMUP:], timer, pause)
    assert paused_at == [3, 6] and len(timer.stats().times_ms) == 3  # steps 2, 4 and 5
    assert sampler.sampled == [1, 3, 6]


def test_a_case_times_the_window_less_its_sampled_steps():
    r = _train(_case())
    assert r.measurements["timed_steps"] == (STEPS - WARMUP) - 2  # window 2..6 less the sampled 3 and 6
    assert len(r.timing.times_ms) == 3


def test_the_record_has_equal_columns_of_layers_x_roles_x_steps(tmp_path):
    out = tmp_path / "r.jsonl"
    args = ["run", "--device", "cpu", "--modes", "fp32,bf16", "--steps", str(STEPS), "--warmup", str(WARMUP),
            "--batch-size", "2", "--seq-len", "32", "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*args, "--numerics-every", str(EVERY)]) == 0
    records = store.read(out)
    for r in records:
        n = r["numerics"]
        assert list(n) == list(COLUMNS) and {len(v) for v in n.values()} == {len(LAYERS) * len(ROLES) * 3}
        df = pd.DataFrame(n)
        assert sorted(set(df.step)) == r["numerics_steps"] == [1, 3, 6] and set(df.role) == set(ROLES)
        assert set(df.layer) == set(LAYERS) and df.amax.notna().all() and (df.amax > 0).all()
        measured = df[df.sqnr_db.notna()]  # the rest arrived in the format (bf16's gradients): amax only
        assert measured[["underflow", "saturation"]].notna().all().all()
        assert measured.underflow.between(0, 1).all() and measured.saturation.between(0, 1).all()
    assert records[0]["numerics_reason"] is None  # fp32: every tensor measured (lossless: inf)
    assert records[1]["numerics_reason"].startswith(numerics_mod.ARRIVED + " (grad_output, grad_weight, input)")
    bf16 = pd.DataFrame(records[1]["numerics"])
    assert set(bf16[bf16.role == "input"].format) == {"bf16"} and records[1]["numerics_formats"]["weight"] == "bf16"
    # the weights in bf16 lose something (finite SQNR); fp32's round trip of fp32 tensors is exact (inf)
    assert (bf16[bf16.role == "weight"].sqnr_db < 100).all()
    assert (pd.DataFrame(records[0]["numerics"]).sqnr_db == float("inf")).all()
    # pandas reads the file directly too; the case differs from the one without --numerics in numerics_every
    # alone (its timed window lost the sampled steps, and a --resume with --numerics must run it)
    assert len(pd.read_json(out, lines=True)) == 2
    again = tmp_path / "plain.jsonl"
    assert main([*args[:-3], "--out", str(again), "--quiet"]) == 0
    plain = store.read(again)
    every = CASE_KEY.index("numerics_every")
    assert [case_key(r)[every] for r in plain] == [0, 0] and [case_key(r)[every] for r in records] == [3, 3]
    assert [drop(case_key(r), every) for r in plain] == [drop(case_key(r), every) for r in records]
    assert plain[0]["numerics"] is None and plain[0]["numerics_reason"] == NOT_REQUESTED


# every mode that runs on a CPU, trained once with --numerics on the tiny model; its formats as its docstring says
EXPECTED = {
    "fp32": ("fp32", "fp32", "fp32", "fp32"),
    "amp-fp16": ("fp16", "fp16", "fp16", "fp16"),
    "bf16": ("bf16", "bf16", "bf16", "bf16"),
    "pure-fp16": ("fp16", "fp16", "fp16", "fp16"),
    "pure-bf16": ("bf16", "bf16", "bf16", "bf16"),
    "pure-bf16-sr": ("bf16", "bf16", "bf16", "bf16"),
    "int8-weight": ("bf16", "bf16", "bf16", "bf16"),  # the weight's GEMM operand: int8 x scale in bf16
    "int8-mixed": ("int8-rowwise", "int8-rowwise", "int8-rowwise", "fp32"),
    "fp8-tensorwise": ("e4m3-tensorwise", "e4m3-tensorwise", "e5m2-tensorwise", "bf16"),
    "fp8-rowwise": ("e4m3-rowwise-pow2", "e4m3-rowwise-pow2", "e4m3-rowwise-pow2", "bf16"),
    "mxfp8": ("mxfp8-rceil", "mxfp8-rceil", "mxfp8-rceil", "bf16"),
    "nvfp4": ("nvfp4", "nvfp4", "nvfp4", "bf16"),  # the 1-D format: 2-D weight scales and RHT are not named
    "mxfp4": ("mxfp4", "mxfp4", "mxfp4", "bf16"),
}


# The roles of the blocks' Linears that reach their hooks already in the mode's format (so only their amax is
# recorded, ARRIVED): what each mode's own statistics cannot see, and `mpbench numerics` measures from fp32.
# Autocast: the outputs of bf16/fp16 ops (attention's and GELU's, the inputs of c_proj) and every gradient; the
# pure modes: everything; the 8-bit modes: the weight-gradient GEMM's high-precision result only.
AUTOCAST = {"input", "grad_output", "grad_weight"}
ARRIVES = {"fp32": set(), "amp-fp16": AUTOCAST, "bf16": AUTOCAST, "pure-fp16": set(ROLES), "pure-bf16": set(ROLES),
           "pure-bf16-sr": set(ROLES), "int8-weight": set(ROLES), "int8-mixed": set(),
           "fp8-tensorwise": {"grad_weight"}, "fp8-rowwise": {"grad_weight"}, "mxfp8": {"grad_weight"},
           "nvfp4": {"grad_weight"}, "mxfp4": {"grad_weight"}}  # fmt: skip


def test_every_mode_is_covered():
    runnable = {name for name, mode in MODES.items() if not mode.unavailable_reason(CPU)}
    assert runnable == set(EXPECTED)  # tf32 needs CUDA


@pytest.fixture(scope="module")
def every_mode():
    return {mode: train_in_process(_case(mode), 1, mode, lambda event: None) for mode in EXPECTED}


def _kept(mode: str, layer: str) -> bool:
    """Whether the mode's default layer policy runs `layer` as a plain Linear in bf16 autocast: the LM head for
    int8-weight and the 8-bit modes, the LM head and tiny's last block (last:15% of 2) for the 4-bit ones."""
    if mode in ("nvfp4", "mxfp4"):
        return layer == "lm_head" or layer.startswith("blocks.1.")
    return layer == "lm_head" and mode in ("int8-weight", "int8-mixed", "fp8-tensorwise", "fp8-rowwise", "mxfp8")


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_every_mode_records_its_statistics_in_its_own_formats(every_mode, mode):
    values = every_mode[mode]
    assert values["status"] == "ok", values.get("reason")
    assert values["numerics_formats"] == dict(zip(ROLES, EXPECTED[mode], strict=True))
    df = pd.DataFrame(values["numerics"])
    assert len(df) == len(LAYERS) * len(ROLES) * 3
    for layer, rows in df.groupby("layer"):
        formats = dict(zip(rows.role, rows.format, strict=False))
        assert formats == dict(zip(ROLES, ("bf16",) * 4 if _kept(mode, layer) else EXPECTED[mode], strict=True)), layer
    # every role was seen and every format computed: amax everywhere; null statistics only where the tensor
    # arrived in its format, and the reason says so (a format unavailable here would give null rows naming it,
    # never a crash)
    unavailable = {fmt: format_unavailable(fmt) for fmt in set(df.format)}
    arrived = df[df.sqnr_db.isna()]
    converted = arrived.layer.map(lambda layer: not _kept(mode, layer) and layer != "lm_head").astype(bool)
    assert set(arrived[converted].role) == ARRIVES[mode]
    assert df.amax.notna().all() and arrived[list(COLUMNS[5:8])].isna().all().all()
    if not any(unavailable.values()):
        assert (values["numerics_reason"] is None) == arrived.empty
        assert arrived.empty or values["numerics_reason"].startswith(numerics_mod.ARRIVED)
        assert df[~df.sqnr_db.isna()][list(COLUMNS[4:8])].notna().all().all()
    for fmt in {fmt for fmt, why in unavailable.items() if why}:
        assert f"format {fmt!r} cannot be computed here" in values["numerics_reason"]
    measured = df[df.sqnr_db.notna()]
    assert (df.amax > 0).all() and measured.underflow.between(0, 1).all() and measured.saturation.between(0, 1).all()


def test_the_fp8_formats_are_torchaos_recipes():
    """If a torchao upgrade changes a recipe's dtypes, granularity or scale rounding, this fails."""
    float8 = pytest.importorskip("torchao.float8")
    from torchao.float8.config import ScalingGranularity

    def named(cast, pow2: bool) -> str:
        dtype = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}[cast.target_dtype]
        rows = cast.scaling_granularity is ScalingGranularity.AXISWISE
        return f"{dtype}-{'rowwise' if rows else 'tensorwise'}{'-pow2' if pow2 else ''}"

    for mode in ("fp8-tensorwise", "fp8-rowwise"):
        config = get_mode(mode)(CPU).config()
        assert isinstance(config, float8.Float8LinearConfig)
        pow2 = config.round_scales_to_power_of_2
        casts = (config.cast_config_input, config.cast_config_weight, config.cast_config_grad_output)
        assert tuple(named(c, pow2) for c in casts) == EXPECTED[mode][:3], mode


def test_a_failing_tensor_stats_gives_a_reason_and_an_ok_case(monkeypatch):
    def broken(x, fmt):
        raise RuntimeError("planted")

    monkeypatch.setattr(numerics_mod, "tensor_stats", broken)
    values = train_in_process(_case(), 1, "fp32", lambda event: None)
    assert values["status"] == "ok" and values["final_loss"] is not None
    assert "tensor_stats in format 'fp32' failed: RuntimeError: planted" in values["numerics_reason"]
    df = pd.DataFrame(values["numerics"])
    assert len(df) == len(LAYERS) * len(ROLES) * 3 and df.amax.isna().all() and df.sqnr_db.isna().all()


def test_a_role_the_hooks_cannot_see_is_missing_with_a_reason():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # no grad_weight to see for layer "0"
    formats = dict.fromkeys(["0", "1"], dict.fromkeys(ROLES, "fp32"))
    sampler = Sampler(model, ["0", "1"], formats, [1], formats["0"])
    with sampler.sampling(1):
        model(torch.randn(3, 4)).sum().backward()
    fields = sampler.fields()
    df = pd.DataFrame(fields["numerics"])
    missing = df[df.amax.isna()]
    assert list(zip(missing.layer, missing.role, strict=True)) == [("0", "grad_weight")]
    assert fields["numerics_reason"] == "the hooks never saw this role (its hook did not fire) (grad_weight)"


def test_an_unknown_format_gives_null_rows_not_a_crash():
    model = nn.Sequential(nn.Linear(4, 4))
    formats = {"0": {"input": "no-such", "weight": "bf16", "grad_output": "fp16", "grad_weight": "fp32"}}
    sampler = Sampler(model, ["0"], formats, [1], formats["0"])
    with sampler.sampling(1):
        model(torch.randn(3, 4)).sum().backward()
    fields = sampler.fields()
    df = pd.DataFrame(fields["numerics"]).set_index("role")
    assert df.amax.isna().to_dict() == {"input": True, "weight": False, "grad_output": False, "grad_weight": False}
    assert fields["numerics_reason"].startswith("format 'no-such' cannot be computed here: ValueError: format=")


def _exit_code(argv: list[str]) -> int:
    """main's return code, or argparse's exit code for a flag it refuses itself."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize(
    "args, match",
    [
        (["--numerics-every", "-1"], "numerics_every=-1: must be 0 (off) or a positive step count"),
        (["--numerics-every", "x"], "argument --numerics-every: 'x' is not an integer"),
        (["--numerics-every", "1"], "numerics_every=1 with steps=6, warmup=1: samples every timed step (2..6)"),
        (["--numerics", "--compile", "--warmup", "2"], "numerics_every=2 with compile=True: the statistics hooks"),
        (["--numerics", "--nproc", "2"], "numerics_every=2 with nproc=2, parallel='ddp': statistics of per-rank"),
        (["--numerics", "--nproc", "1", "--parallel", "fsdp"], "parallel='fsdp': statistics of per-rank shards"),
    ],
)
def test_bad_numerics_flags_exit_2_with_one_line(tmp_path, capsys, args, match):
    base = ["run", "--device", "cpu", "--modes", "fp32", "--steps", "6", "--warmup", "1", "--out",
            str(tmp_path / "r.jsonl")]  # fmt: skip
    assert _exit_code([*base, *args]) == 2
    assert match in error_line(capsys)
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("line, match", [("numerics_every = true", "numerics_every=True must be int"),
                                         ("numerics = 1", "numerics=1 must be bool")])  # fmt: skip
def test_bad_numerics_config_keys_exit_2(tmp_path, capsys, line, match):
    config = tmp_path / "c.toml"
    config.write_text(line + "\n")
    assert _exit_code(["run", "--device", "cpu", "--config", str(config)]) == 2
    assert match in error_line(capsys)


def test_numerics_in_a_config_file_and_its_default(tmp_path):
    from suite.cli.config import load_config
    from suite.cli.run import cases_from_options

    config = tmp_path / "c.toml"
    config.write_text('numerics = true\nsteps = 40\ndevice = "cpu"\nmodes = ["fp32"]\n')
    assert [c.numerics_every for c in cases_from_options(load_config(config))] == [10]
    config.write_text('numerics_every = 7\nsteps = 40\ndevice = "cpu"\nmodes = ["fp32"]\n')
    assert [c.numerics_every for c in cases_from_options(load_config(config))] == [7]
    assert json.loads(json.dumps(NOT_REQUESTED)) == "not requested (mpbench run --numerics)"


class _Profiler:
    active = False

    def __enter__(self):
        _Profiler.active = True
        return self

    def __exit__(self, *exc) -> None:
        _Profiler.active = False

    def result(self):
        from suite.metrics.tensor_cores import ProfilerTensorCoreResult

        return ProfilerTensorCoreResult(0.5, [], None)


@pytest.mark.parametrize("every, profiled", [(0, [8, 9, 10]), (3, [8]), (4, [9]), (2, [9])])
def test_the_profiler_never_sees_a_sampled_step(monkeypatch, every, profiled):
    # steps 10, warm-up 2: window 3..7, steps 8, 9, 10 kept for the profiler; the profiler gets the first unbroken
    # run of unsampled ones among them (every 3: 9 and 10 are sampled; every 4 and 2: 8 and 10; without
    # --numerics: all three)
    monkeypatch.setattr(train_mod, "MeasuredWindow", FakeGpuWindow)
    monkeypatch.setattr(train_mod, "ProfilerTensorCores", _Profiler)
    real = train_mod.train_step

    def noting(model, *args):
        calls.append(_Profiler.active)
        return real(model, *args)

    calls: list[bool] = []
    monkeypatch.setattr(train_mod, "train_step", noting)
    r = _train(small_case(steps=10, warmup=2, numerics_every=every))
    under = [step for step, active in enumerate(calls, 1) if active]
    assert under == profiled and len(calls) == 10
    assert r.measurements["tensor_core_util"] == 0.5


def test_a_max_batch_trial_samples_nothing(monkeypatch):
    from suite.running import max_batch

    trials = []
    monkeypatch.setattr(max_batch, "train_isolated", lambda trial, *args: trials.append(trial) or {"status": "ok"})
    max_batch._try(small_case(steps=8, warmup=1, numerics_every=2), 4, None)
    assert trials[0].numerics_every == 0 and trials[0].batch_size == 4  # every 2nd of 3 steps: refused before
