"""The error paths and fallbacks of the doctor, the CLI, hardware, metrics and modes: each message or value
they produce, in-process with stand-ins (issue 20 part 2.4: no CPU test ran them)."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from suite import hardware
from suite.cli import doctor
from suite.cli.doctor import CANNOT, FAIL, TorchaoBuild
from suite.cli.main import main
from suite.hardware import DeviceInfo
from suite.metrics import calibration, memory, nvml
from suite.metrics.fidelity import _cos, _rel, plain
from suite.metrics.timing import TimingStats
from suite.modes import base, int8_mixed, mxfp8
from suite.modes.int8_mixed import Int8Mixed
from suite.modes.int8_weight import _torchao_missing
from suite.modes.mxfp8 import MXFP8
from suite.modes.pure_bf16_sr import StochasticRoundingAdamW
from suite.modes.torchao_calls import inductor_patch_restored
from tests.fake_cuda import FakeCuda
from tests.helpers import NoProcPath

CPU = DeviceInfo("cpu", "test cpu")
TORCHAO = TorchaoBuild("0.18.0", None)

# ----------------------------------------------------------------------------- doctor


def test_a_version_that_cannot_be_read_is_unknown_with_the_error_type():
    def refuses():
        raise RuntimeError("driver gone")

    nvml_module = SimpleNamespace(nvmlSystemGetCudaDriverVersion=refuses, nvmlSystemGetDriverVersion=refuses)
    check = doctor._versions(nvml_module)
    assert check.figures["driver"] == "unknown (RuntimeError)" == check.figures["cuda_driver"]


def test_more_torch_threads_than_usable_cores_fails_as_oversubscribed(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores + 1)
    check = doctor._threads()
    assert check.status == FAIL and "oversubscribed" in check.detail and "OMP_NUM_THREADS" in check.detail


def test_a_bf16_autocast_that_leaves_fp32_fails(monkeypatch):
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    check = doctor._cpu_bf16()
    assert check.status == FAIL and "dtype torch.float32" in check.detail


def test_a_torchao_that_does_not_import_is_named_with_its_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import_module raises ModuleNotFoundError
    build = doctor.torchao_build()
    assert build.version is None and build.error.startswith("ModuleNotFoundError: ")


@pytest.mark.parametrize(
    "record, text",
    [
        ({"status": "error", "reason": "boom", "suspect": []}, "tiny fp32 run ended error: boom"),
        ({"status": "ok", "suspect": [{"rule": "r1", "note": "n1"}]}, "tiny fp32 run's record breaks: r1: n1"),
    ],
)
def test_a_self_check_run_that_fails_or_breaks_a_rule_fails(monkeypatch, record, text):
    from suite.running import runner

    monkeypatch.setattr(runner, "run_cases", lambda cases, **kw: [record | {"step_time_ms": None}])
    check = doctor._record_self_check("cpu")
    assert check.status == FAIL and check.detail == text


def test_the_self_check_on_cuda_without_a_gpu_cannot_be_run():
    got = doctor.diagnose("cuda", cuda=FakeCuda(present=False), durations=doctor.Durations(
        event_s=0.01, energy_s=0.01, gpm_s=0.01, share_s=0.01, memory_mib=1), torchao=lambda: TORCHAO)  # fmt: skip
    check = next(c for c in got if c.name == "record_self_check")
    assert check.status == CANNOT and check.detail == "no CUDA GPU to train on"


# ----------------------------------------------------------------------------- the CLI


def test_report_refuses_a_target_loss_that_is_not_positive(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.jsonl"), "--target-loss", "0"]) == 2
    assert "target_loss=0.0: must be a positive loss" in capsys.readouterr().err


def test_calibrate_shows_a_dtype_this_device_cannot_time_with_its_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibration, "unavailable", lambda device, name: "no such kernel here")
    assert main(["calibrate", "--device", "cpu", "--dtypes", "fp32", "--out", str(tmp_path / "c.json")]) == 0
    out, err = capsys.readouterr()
    assert "fp32: not timed: no such kernel here" in out and "calibrate fp32 skipped: no such kernel here" in err
    assert out.splitlines()[2].split() == ["fp32", "-", "-", "-", "-"]  # its table row: no figure


def test_an_integer_option_that_is_not_an_integer_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["fidelity", "--steps", "two"])
    assert exited.value.code == 2 and "'two' is not an integer" in capsys.readouterr().err


def test_a_mode_out_of_memory_in_the_fidelity_comparison_is_recorded_oom(monkeypatch):
    from suite.cli import fidelity as fidelity_cli

    def out_of_memory(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fidelity_cli.fidelity, "measure", out_of_memory)
    got = fidelity_cli._one(SimpleNamespace(mode="fp32"), CPU, torch.zeros(1))
    assert got["status"] == "oom" and got["fidelity_reason"] == "out of memory" and "2.00 GiB" in got["reason"]


def test_fidelity_refuses_an_empty_mode_list(capsys):
    assert main(["fidelity", "--device", "cpu", "--modes", " , "]) == 2
    assert "modes: empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hardware


def test_a_gpu_index_past_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:3': only 1 GPU\(s\) visible"):
        hardware.resolve_device("cuda:3")


def test_without_proc_the_cpu_is_named_by_platform_and_has_no_flags(monkeypatch):
    monkeypatch.setattr(hardware, "Path", NoProcPath)
    hardware.cpu_name.cache_clear(), hardware.cpu_flags.cache_clear()
    try:
        assert hardware.cpu_name() == (hardware.platform.processor() or hardware.platform.machine())
        assert hardware.cpu_flags() == frozenset()
    finally:
        hardware.cpu_name.cache_clear(), hardware.cpu_flags.cache_clear()


@pytest.mark.parametrize("fails", [subprocess.CompletedProcess([], 128, "", "not a git repository"), OSError("no git")])
def test_outside_git_the_commit_is_unknown(monkeypatch, fails):
    def run(*a, **k):
        if isinstance(fails, Exception):
            raise fails
        return fails

    monkeypatch.setattr(hardware.subprocess, "run", run)
    hardware.git_commit.cache_clear()
    try:
        assert hardware.git_commit() == (None, None)
    finally:
        hardware.git_commit.cache_clear()


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "device, dtypes",
    [
        (CPU, ["fp32", "bf16"]),
        (DeviceInfo("cuda", "H100", (9, 0)), ["fp32", "tf32", "fp16", "bf16", "fp8", "int8"]),
        (DeviceInfo("cuda", "A100", (8, 0)), ["fp32", "tf32", "fp16", "bf16", "int8"]),
        (DeviceInfo("cuda", "V100", (7, 0)), ["fp32", "fp16"]),
    ],
)
def test_calibration_times_the_dtypes_the_device_has(device, dtypes):
    assert calibration.default_dtypes(device) == dtypes


@pytest.mark.parametrize(
    "content, text",
    [
        ("not json", "unreadable calibration"),
        ('{"results": {"bf16": {"flops": null, "reason": "no kernel"}}}', "could not time bf16: no kernel"),
    ],
)
def test_a_calibration_that_cannot_give_a_ceiling_says_why(tmp_path, monkeypatch, content, text):
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    calibration.calibration_path(CPU).write_text(content)
    flops, why = calibration.ceiling(CPU, "bf16")
    assert flops is None and text in why


class _Wrapped:
    """A tensor subclass as torchao's: no dequantize(), its values in inner tensors named by __tensor_flatten__."""

    def __init__(self, **inner):
        self.shape = torch.Size([2, 3])
        self.__dict__.update(inner)
        self._names = list(inner)

    def detach(self):
        return self

    def __tensor_flatten__(self):
        return self._names, None


def test_plain_reads_a_wrapper_through_its_single_inner_tensor_else_refuses():
    values = torch.ones(2, 3)
    got = plain(_Wrapped(data=values, scale=torch.ones(1)))
    assert type(got) is torch.Tensor and torch.equal(got, values)
    with pytest.raises(TypeError, match="cannot read the values of a _Wrapped: no dequantize"):
        plain(_Wrapped(a=values, b=values.clone()))


def test_relative_error_and_cosine_against_a_zero_reference():
    assert _rel(0.0, 0.0) == 0.0 and _rel(1.0, 0.0) == math.inf
    assert _cos(1.0, 0.0, 1.0) is None and _cos(0.0, 1.0, 0.0) is None


def test_without_proc_rss_is_the_lifetime_peak(monkeypatch):
    def no_proc(*a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    assert memory._rss_bytes() is None
    with memory.RssSampler() as sampler:
        pass
    peak = sampler.result()
    assert peak.source == "rss-lifetime" and peak.peak_mem_mb > 0


def test_nvml_without_nvidia_ml_py_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    module, why = nvml.load_nvml()
    assert module is None and why.startswith("NVML unavailable: nvidia-ml-py not installed")


def test_timing_refuses_no_measured_steps():
    with pytest.raises(ValueError, match="no measured steps: steps must exceed warmup"):
        TimingStats.from_times([])


# ----------------------------------------------------------------------------- modes


def test_a_flag_torch_refuses_to_read_is_shown_unreadable():
    def refuses():
        raise RuntimeError("mixing the legacy and new precision APIs")

    assert base._readable(refuses) == "unreadable: mixing the legacy and new precision APIs"


def test_tf32_enabled_reads_the_legacy_flag_where_torch_lacks_the_new_api(monkeypatch):
    legacy = SimpleNamespace(backends=SimpleNamespace(cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=1))))
    monkeypatch.setattr(base, "_NEW_PRECISION_API", False)
    monkeypatch.setattr(base, "torch", legacy)  # a torch before 2.9: only the legacy flag
    assert base.tf32_enabled() is True


@pytest.mark.parametrize(
    "mode, modules",
    [(Int8Mixed, [int8_mixed._INT8, int8_mixed._QUANTIZE]), (MXFP8, [mxfp8._MXFP8, mxfp8._KERNELS])],
)
def test_a_torchao_mode_without_torchao_refuses_to_prepare(monkeypatch, mode, modules):
    for name in modules:  # the very modules it imports: an earlier test may have imported them already
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeError, match=f"{mode.name} needs torchao"):
        mode(CPU).prepare(torch.nn.Linear(32, 32))


def test_int8_weight_without_torchao_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.prototype.quantized_training", None)
    assert _torchao_missing().startswith("int8-weight needs torchao (") and "pip install torchao" in _torchao_missing()


def test_int8_mixed_refuses_a_torchao_that_swaps_other_linears(monkeypatch):
    from torchao import quantization

    monkeypatch.setattr(quantization, "quantize_", lambda model, config, filter_fn: None)  # swaps nothing
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(32, 32)])
    with pytest.raises(RuntimeError, match=r"int8-mixed: torchao swapped \[\], expected \['blocks.0'\]"):
        Int8Mixed(CPU).prepare(model)


def test_stochastic_rounding_adamw_steps_past_a_parameter_without_a_gradient():
    used, unused = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(4))
    opt = StochasticRoundingAdamW([used, unused], lr=0.1)
    used.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert torch.all(used < 1) and torch.equal(unused, torch.ones(4)) and unused not in opt.state


def test_without_inductor_triton_the_patch_guard_restores_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch._inductor.codegen.triton", None)
    ran = []
    with inductor_patch_restored():
        ran.append(True)
    assert ran == [True]
