"""The float64 reference step: what each mode's gradients and update are measured against."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from models import GPT, GPTConfig
from suite.cli.main import main
from suite.hardware import resolve_device
from suite.modes import MODES
from suite.modes.bf16 import BF16
from suite.modes.fp32 import FP32
from suite.modes.int8_weight import Int8Weight
from suite.modes.pure_fp16 import DynamicLossScaler, PureFP16
from suite.records import store
from suite.reporting.compare import compare_runs
from suite.reporting.report import build_report
from suite.running.runner import run_cases
from suite.training import fidelity
from suite.training.data import make_corpus
from tests.helpers import numerics_globals, small_case

CPU = resolve_device("cpu")


def measure(mode: str, steps: int = 1, batch: int = 2, seq: int = 32) -> dict:
    """Record fields of `mode`'s first `steps` steps on tiny against float64."""
    case = small_case(mode=mode, steps=steps, warmup=0, batch_size=batch, seq_len=seq)
    batches = make_corpus(None, case.model_config.vocab_size).batches(steps, batch, seq, case.seed)
    return fidelity.record_fields(fidelity.measure(case, CPU, batches))


class BF16GradsRoundedAgain(BF16):
    """bf16 autocast (whose backward already rounds to bf16), then the fp32 gradients rounded to bf16 once more."""

    name = "test-bf16-rounded-twice"

    def backward_and_step(self, loss, optimizer):
        loss.backward()
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad.copy_(p.grad.bfloat16())
        optimizer.step()
        return True


class PureFP16Unscaled(PureFP16):
    """pure-fp16 with loss scaling off: backward straight in fp16."""

    name = "test-pure-fp16-unscaled"

    def backward_and_step(self, loss, optimizer):
        loss.backward()
        optimizer.step()
        return True

    @property
    def loss_scale(self):
        return None


class PureFP16Overflowing(PureFP16):
    """pure-fp16 whose first loss scale (2^40) overflows fp16 (max 65504): step 1 is skipped."""

    name = "test-pure-fp16-overflow"

    def __init__(self, device):
        super().__init__(device)
        self.scaler = DynamicLossScaler(init_scale=2.0**40)


class Int8WeightFP32(Int8Weight):
    """int8-weight without its bf16 compute (autocast off, quantized Linears in fp32): its one rounding is
    the int8 weights' own, which the float64 reference must share."""

    name = "test-int8-weight-fp32"

    def __init__(self, device):
        super().__init__(device)
        self.autocast_dtype, self.compute = None, "fp32"

    def prepare(self, model):
        model = super().prepare(model)
        for fqn in self._quantized:
            model.get_submodule(fqn).float()  # fp32 scales and biases; the input hook then casts to fp32
        return model


@pytest.fixture
def test_modes(monkeypatch):
    for mode in (BF16GradsRoundedAgain, PureFP16Unscaled, PureFP16Overflowing, Int8WeightFP32):
        monkeypatch.setitem(MODES, mode.name, mode)


def test_fp32_agrees_with_float64_and_rows_name_every_tensor():
    before = numerics_globals()
    f = measure("fp32")
    assert f["grad_rel_err_vs_fp64"] < 1e-5
    assert f["grad_cos_vs_fp64"] > 1 - 1e-9
    assert 0 < f["grad_max_abs_err_vs_fp64"] < 1e-6
    assert abs(f["fidelity_loss_diff"]) < 1e-5
    assert f["fidelity_loss_scale"] is None and f["fidelity_reason"] is None
    assert f["grad_overflow_frac"] == 0
    names = [r["tensor"] for r in f["fidelity_layers"]]
    assert names[:2] == ["wte.weight", "wpe.weight"] and "blocks.1.mlp.c_proj.weight" in names
    tensors = [n for n, _ in GPT(small_case().model_config).named_parameters()]  # the tied embedding once
    assert names == tensors and len(set(names)) == len(names)
    assert all(r["grad_rel_err"] < 1e-5 for r in f["fidelity_layers"])
    assert numerics_globals() == before  # TF32 flags, autocast and default dtype restored


def test_bf16_autocast_is_further_from_float64_than_amp_fp16():
    bf16, fp16 = measure("bf16"), measure("amp-fp16")
    assert fp16["grad_rel_err_vs_fp64"] < bf16["grad_rel_err_vs_fp64"] < 1e-2  # 8 vs 11 mantissa bits
    assert 1e-5 < fp16["grad_rel_err_vs_fp64"]
    assert fp16["fidelity_loss_scale"] == 2.0**16  # GradScaler's first scale, unscaled before the step


def test_rounding_the_gradients_to_bf16_again_adds_error(test_modes):
    once, twice = measure("bf16"), measure(BF16GradsRoundedAgain.name)
    assert twice["grad_rel_err_vs_fp64"] > once["grad_rel_err_vs_fp64"]
    assert twice["grad_cos_vs_fp64"] < once["grad_cos_vs_fp64"]


def test_loss_scaling_keeps_fp16_gradients_from_underflowing(test_modes):
    scaled, unscaled = measure("pure-fp16"), measure(PureFP16Unscaled.name)
    # what backward itself lost: the scaled fp16 gradients vs the unscaled ones
    assert unscaled["scaled_grad_underflow_frac"] > 5 * scaled["scaled_grad_underflow_frac"]
    assert unscaled["scaled_grad_underflow_frac"] == unscaled["grad_underflow_frac"]  # nothing to unscale
    assert scaled["fidelity_loss_scale"] == 2.0**16 and unscaled["fidelity_loss_scale"] is None


def test_a_step_skipped_by_loss_scaling_is_recorded_as_such(test_modes):
    f = measure(PureFP16Overflowing.name)
    assert f["fidelity_steps"][0]["stepped"] is False
    assert f["grad_rel_err_vs_fp64"] is None and f["update_rel_err_vs_fp64"] is None
    assert f["grad_overflow_frac"] is None and f["scaled_grad_overflow_frac"] > 0
    assert "skipped by loss scaling" in f["fidelity_reason"] and f["fidelity_loss_scale"] == 2.0**40
    json.dumps(f, allow_nan=False)  # NaN/inf in the per-tensor rows are written as strings


def test_int8_weights_are_dequantized_for_the_reference(test_modes):
    # int8-weight computing in fp32 on its dequantized weights: if the reference saw the fp32
    # weights before quantization instead, the gradient error would be the int8 rounding's.
    f = measure(Int8WeightFP32.name)
    assert f["grad_rel_err_vs_fp64"] < 1e-5
    assert 1e-3 < f["update_rel_err_vs_fp64"] < 0.5  # stochastic rounding of the update to int8


def test_later_steps_start_from_the_modes_weights_and_adam_state():
    f = measure("fp32", steps=2)
    assert [s["step"] for s in f["fidelity_steps"]] == [1, 2]
    assert {r["step"] for r in f["fidelity_layers"]} == {1, 2}
    # step 2's float64 update uses the mode's moments: a fresh AdamW would take a first step instead
    assert f["update_rel_err_vs_fp64"] < 1e-3
    assert f["grad_rel_err_vs_fp64"] == f["fidelity_steps"][1]["grad_rel_err_vs_fp64"]  # flat figures: last step


def test_fidelity_command_rows_per_mode_and_records(tmp_path, capsys, monkeypatch):
    class Broken(BF16):
        name = "test-broken"

        def prepare(self, model):
            raise RuntimeError("deliberately broken")

    monkeypatch.setitem(MODES, Broken.name, Broken)
    out = tmp_path / "f.jsonl"
    code = main(["fidelity", "--device", "cpu", "--modes", "fp32,tf32,test-broken", "--batch-size", "2",
                 "--seq-len", "16", "--out", str(out)])  # fmt: skip
    assert code == 1  # the broken mode failed, the others still ran
    text = capsys.readouterr().out
    assert "fp32" in text and "skipped" in text and "deliberately broken" in text
    records = store.read(out)
    assert [r["status"] for r in records] == ["ok", "skipped", "error"]
    assert all(list(r) == list(store.FIELDS) for r in records)
    assert records[0]["grad_rel_err_vs_fp64"] < 1e-5 and records[0]["steps"] == 1
    assert records[1]["grad_rel_err_vs_fp64"] is None and "CUDA" in records[1]["fidelity_reason"]
    # the report: a per-tensor chart (log scale, a 'nan' as a gap) and a table of the global figures
    layers = records[0]["fidelity_layers"]
    layers[0] = layers[0] | {"grad_rel_err": "nan"}
    store.append(out, store.make_record(**{k: v for k, v in records[0].items() if k != "schema"} | {"mode": "bf16"}))
    written = build_report(store.load(out), tmp_path / "report")
    chart = next(p for name, p in written.items() if name.endswith("fidelity-layers.png"))
    assert chart.stat().st_size > 10_000
    md = written["summary.md"].read_text()
    assert "grad rel. L2 error vs fp64" in md and f"{records[0]['grad_rel_err_vs_fp64']:.2e}" in md


def test_fidelity_refuses_a_model_that_cannot_fit_twice(capsys, monkeypatch):
    monkeypatch.setattr(fidelity, "available_bytes", lambda device: (10 * 2**20, "available RAM"))
    assert main(["fidelity", "--device", "cpu", "--modes", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model='tiny'" in err[0] and "float64 copy" in err[0]


def test_fit_on_a_gpu_uses_its_memory(monkeypatch):
    from types import SimpleNamespace

    from suite.hardware import DeviceInfo

    gpu = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    fidelity.check_fits(small_case(model="gpt2-small"), gpu)  # 124M x 60 B = 7 GiB: fits
    with pytest.raises(ValueError, match=r"model='gpt2-xl'.*85% of the memory of NVIDIA H100 80GB HBM3 is 68.0 GiB"):
        fidelity.check_fits(small_case(model="gpt2-xl"), gpu)  # 1.56B x 60 B = 87 GiB
    assert fidelity.available_bytes(CPU)[0] > 0


def test_the_gpu_default_fidelity_counts_activations_and_runs_the_reference_in_slices(monkeypatch):
    """Defect 12 of issue 20: `run --fidelity` at the GPU default (gpt2-small, 16 x 1024) passed a
    parameters-only check and then needed ~64 GiB for the float64 step's math-SDPA activations."""
    from types import SimpleNamespace

    from suite.hardware import DeviceInfo

    gpu = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 0)
    case = small_case(model="gpt2-small", batch_size=16, seq_len=1024)
    whole = fidelity.reference_bytes(case.model_config, 16, 1024)
    attention = 8 * 16 * 12 * 1024 * 1024 * (12 + 2)  # float64 (B, nh, T, T): one per block, two more in backward
    assert 60 * 2**30 < whole and attention < whole / 2
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    plan = fidelity.check_fits(case, gpu)
    assert (plan.passes, plan.rows) == (2, 8) and plan.need_bytes <= fidelity.FIT_SHARE * 80 * 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=141 * 2**30))
    assert fidelity.check_fits(case, gpu).passes == 1  # an H200 holds the whole batch
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=24 * 2**30))
    with pytest.raises(ValueError, match=r"seq_len=1024.*one row at a time"):
        fidelity.check_fits(small_case(model="gpt2-xl", seq_len=1024), DeviceInfo("cuda", "NVIDIA L4", (8, 9), 0))


# The float64 reference step's peak RSS above the weights and AdamW state, in a fresh process whose
# glibc hands every freed block of 64 KiB or more back to the kernel (so RSS follows live tensors).
PEAK_SCRIPT = """
import sys, torch
from models import GPT, GPTConfig
from suite.modes.base import ADAM_BETAS, decay_groups
from suite.training import fidelity
torch.manual_seed(0)
cfg, rows, seq, passes = GPTConfig.preset("tiny", n_head=int(sys.argv[1])), *map(int, sys.argv[2:5])
ref = GPT(cfg).double()
opt = torch.optim.AdamW(decay_groups(ref, 0.1), lr=1e-4, betas=ADAM_BETAS)
batch = torch.randint(0, cfg.vocab_size, (rows, seq + 1))
fidelity._reference_step(ref, opt, batch)  # AdamW's state exists from here on
opt.zero_grad(set_to_none=True)
status = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
fidelity._reference_step(ref, opt, batch, passes)
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("heads", [4, 16])  # tiny's 4 heads; 16: the attention matrices dominate
def test_the_activation_estimate_covers_the_measured_peak(heads):
    import subprocess
    import sys

    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}

    def peak(passes: int) -> int:
        args = [sys.executable, "-c", PEAK_SCRIPT, str(heads), "8", "128", str(passes)]
        return int(subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])

    cfg = GPTConfig.preset("tiny", n_head=heads)
    whole, estimate = peak(1), fidelity.reference_bytes(cfg, 8, 128)
    grads = 8 * GPT(cfg).num_params()  # rebuilt by the step, in its peak or not
    assert whole <= estimate + grads and estimate < 1.5 * whole, (whole / 2**20, estimate / 2**20)
    assert peak(2) < 0.65 * whole  # two slices of 4 rows: about half the activations live at once


def test_the_reference_in_slices_of_rows_compares_the_same_step(monkeypatch):
    one = measure("bf16", batch=6, seq=32)
    per_row = fidelity.reference_bytes(small_case().model_config, 1, 32)
    state = GPT(small_case().model_config).num_params() * fidelity.BYTES_PER_PARAM
    room = int((state + 2 * per_row) / fidelity.FIT_SHARE) + 1  # two rows per pass: three passes
    monkeypatch.setattr(fidelity, "available_bytes", lambda device: (room, "available RAM"))
    three = measure("bf16", batch=6, seq=32)
    assert (one["fidelity_ref_passes"], three["fidelity_ref_passes"]) == (1, 3)
    for key in ("grad_rel_err_vs_fp64", "update_rel_err_vs_fp64", "fidelity_loss_diff"):
        assert three[key] == pytest.approx(one[key], rel=1e-9, abs=1e-15), key


def test_bad_input_exits_2(capsys):
    assert main(["fidelity", "--device", "cpu", "--modes", "fp33"]) == 2
    assert "fp33" in capsys.readouterr().err
    assert main(["fidelity", "--device", "cpu", "--steps", "0"]) == 2
    assert "steps=0" in capsys.readouterr().err
    # a given 0 is bad input, not "use the default" (it ran the default batch once)
    for flag, field in (("--batch-size", "batch_size=0"), ("--seq-len", "seq_len=0")):
        assert main(["fidelity", "--device", "cpu", flag, "0"]) == 2
        assert field in capsys.readouterr().err


def test_run_with_fidelity_adds_the_fields_to_each_record(tmp_path):
    with_, without = run_cases([small_case(mode="fp32", fidelity=True), small_case(mode="bf16")], log=None,
                               isolate=False)  # fmt: skip
    assert with_["status"] == "ok" and with_["grad_rel_err_vs_fp64"] < 1e-5 and with_["fidelity_layers"]
    assert without["grad_rel_err_vs_fp64"] is None and "not requested" in without["fidelity_reason"]
    # the compared step is the run's own first step: same weights, same batch, same loss
    assert with_["fidelity_steps"][0]["loss"] == with_["loss_curve"][0]
    assert main(["run", "--device", "cpu", "--fidelity", "--nproc", "2", "--out", str(tmp_path / "r.jsonl")]) == 2


def test_compare_bounds_fidelity_like_the_loss():
    base = {"model": "tiny", "mode": "bf16", "batch_size": 2, "seq_len": 32, "steps": 1, "seed": 0, "warmup": 0,
            "compile": False, "status": "ok", "grad_rel_err_vs_fp64": 4e-3, "grad_cos_vs_fp64": 0.99999}  # fmt: skip
    same = compare_runs([base], [base | {"grad_rel_err_vs_fp64": 4.4e-3}])
    worse = compare_runs([base], [base | {"grad_rel_err_vs_fp64": 8e-3, "grad_cos_vs_fp64": 0.9999}])
    verdict = {(r.metric, "same"): r.verdict for r in same} | {(r.metric, "worse"): r.verdict for r in worse}
    assert verdict[("grad_rel_err_vs_fp64", "same")] == "same"
    assert verdict[("grad_rel_err_vs_fp64", "worse")] == "regressed"
    assert verdict[("grad_cos_vs_fp64", "worse")] == "regressed"  # 1 - cos 10x larger
    broken = compare_runs([base], [base | {"grad_rel_err_vs_fp64": math.inf, "grad_cos_vs_fp64": math.nan}])  # as read
    assert {r.metric: r.verdict for r in broken if r.metric.startswith("grad_")} == {
        "grad_rel_err_vs_fp64": "regressed", "grad_cos_vs_fp64": "regressed"}  # fmt: skip


class FP32WithAnInfGradient(FP32):
    """A mode without loss scaling whose backward overflows in one element: the step is applied."""

    name = "test-inf-gradient"

    def backward_and_step(self, loss, optimizer):
        loss.backward()
        optimizer.param_groups[0]["params"][0].grad[0, 0] = float("inf")
        optimizer.step()
        return True


def test_inf_gradients_are_counted_and_recorded(monkeypatch, tmp_path):
    monkeypatch.setitem(MODES, FP32WithAnInfGradient.name, FP32WithAnInfGradient)
    f = measure(FP32WithAnInfGradient.name)
    assert f["grad_overflow_frac"] > 0 and f["grad_rel_err_vs_fp64"] == float("inf")
    out = tmp_path / "r.jsonl"
    case = small_case(mode=FP32WithAnInfGradient.name)
    store.append(out, store.make_record(status="ok", model="tiny", mode=case.mode, **f))
    assert json.loads(out.read_text())["grad_rel_err_vs_fp64"] == "inf"  # JSON has no inf: the store writes a string
    assert store.read(out)[0]["grad_rel_err_vs_fp64"] == math.inf  # and the reader decodes it
    md = build_report(store.load(out), tmp_path / "rep")["summary.md"].read_text()
    assert "| inf |" in md
