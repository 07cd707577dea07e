"""The measured window, MFU and calibration, wired together; a fake NVML and a fake GPU."""

from __future__ import annotations

import time

import pytest

from suite.hardware import DeviceInfo
from suite.metrics import calibration
from suite.metrics import nvml as nvml_mod
from suite.metrics import window as window_mod
from suite.metrics.flops import utilization_fields
from suite.metrics.memory import AllocatorPeak
from suite.metrics.tensor_cores import ProfilerTensorCoreResult
from suite.records.store import REASON_FIELDS
from suite.running.runner import run_cases
from tests.fake_nvml import MIB, FakeHandle, make_fake
from tests.helpers import small_case

CPU = DeviceInfo("cpu", "test cpu")
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
A100 = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))


class _FakeAllocator:
    def __init__(self, device) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def result(self) -> AllocatorPeak:
        return AllocatorPeak(allocated_mb=1000.0, reserved_mb=1200.0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A 'cuda' device whose NVML is the fake (device 0) and whose allocator is scripted."""

    def install(**device_overrides):
        fake, devices = make_fake(1, **device_overrides)
        monkeypatch.setattr(window_mod, "nvml_device", lambda index: (fake, FakeHandle(0), None))
        monkeypatch.setattr(window_mod, "synchronize", lambda dev: None)
        monkeypatch.setattr(window_mod, "AllocatorPeakTracker", _FakeAllocator)
        return fake, devices[0]

    return install


def _run_window(device: DeviceInfo, seconds: float = 0.15) -> window_mod.MeasuredWindow:
    w = window_mod.MeasuredWindow(device)
    with w:
        time.sleep(seconds)  # GPM needs two samples > 100 ms apart
    return w


def test_gpu_window_with_gpm_energy_and_process_memory(fake_gpu, monkeypatch):
    import os

    pid = os.getpid()
    fake, dev = fake_gpu(
        processes=[[(pid, 2000 * MIB)], [(pid, 3000 * MIB)], [(pid, 2500 * MIB)]],
        mem_used=[4000 * MIB],
        energy_mj=[1_000_000, 1_045_000],  # 45 J over the window
        gpm_supported=True,
        gpm_metrics={5: 62.0, 7: 60.0, 9: 0.0},
    )
    w = _run_window(H100)
    assert w.profiler_steps(50) == window_mod.PROFILED_STEPS  # kept in case GPM fails at run time
    f = w.fields(timed_steps=9, tokens_per_step=1000)
    assert f["peak_mem_mb"] == 3000 and f["peak_mem_source"] == "nvml-process"
    assert f["peak_mem_device_mb"] == 4000
    assert (f["peak_mem_allocated_mb"], f["peak_mem_reserved_mb"]) == (1000.0, 1200.0)
    assert f["energy_j_per_step"] == pytest.approx(5.0)
    assert f["tokens_per_joule"] == pytest.approx(9 * 1000 / 45)
    assert f["avg_power_w"] == pytest.approx(45 / w._sampler.result().duration_s)  # over the energy readings
    assert f["window_s"] == pytest.approx(w._sampler.result().duration_s, abs=0.05)
    assert f["tensor_core_util"] == pytest.approx(0.62) and f["tensor_core_util_source"] == "nvml-gpm"
    assert f["tensor_core_util_hmma"] == pytest.approx(0.60) and f["tensor_core_util_imma"] == 0.0
    assert f["sm_clock_mhz"] == 1980 and f["throttled"] is False


def test_gpu_without_gpm_plans_the_profiler_and_says_why(fake_gpu):
    fake_gpu(gpm_supported=False, energy_mj=[0, 10_000])
    w = _run_window(A100)
    assert w.profiler_steps(50) == window_mod.PROFILED_STEPS
    assert w.profiler_steps(window_mod.PROFILED_STEPS) == 0  # too few steps to carve out a window
    f = w.fields(timed_steps=5, tokens_per_step=100)
    assert f.get("tensor_core_util") is None
    assert "GPM not supported" in f["tensor_core_util_reason"]


def test_energy_counter_that_did_not_tick_is_null_with_reason(fake_gpu):
    fake_gpu(energy_mj=[5_000])
    f = _run_window(H100, seconds=0.01).fields(timed_steps=3, tokens_per_step=100)
    assert "energy_j_per_step" not in f and f["avg_power_w"] is None  # not 0.0 W (issue 20, defect 7)
    assert f["energy_reason"].startswith("energy_j, avg_power_w: energy counter did not advance over")


def test_no_nvml_keeps_allocator_figures_and_explains_the_rest(monkeypatch):
    monkeypatch.setattr(window_mod, "nvml_device", lambda i: (None, None, "NVML Shared Library Not Found"))
    monkeypatch.setattr(window_mod, "synchronize", lambda dev: None)
    monkeypatch.setattr(window_mod, "AllocatorPeakTracker", _FakeAllocator)
    f = _run_window(H100, seconds=0.0).fields(timed_steps=3, tokens_per_step=100)
    assert f["peak_mem_allocated_mb"] == 1000.0
    for key in ("peak_mem_reason", "energy_reason", "nvml_reason", "tensor_core_util_reason"):
        assert "NVML unavailable: NVML Shared Library Not Found" in f[key]


def test_profiler_fields():
    ok = window_mod.profiler_fields(ProfilerTensorCoreResult(0.8, [("nvjet_tst_x", 120.0)], None))
    assert ok["tensor_core_util"] == 0.8 and ok["tensor_core_util_source"] == "profiler"
    none = window_mod.profiler_fields(ProfilerTensorCoreResult(None, [], "profiler saw no kernels"))
    assert none["tensor_core_util_source"] is None and none["tensor_core_util_reason"] == "profiler saw no kernels"


def test_mfu_uses_the_peak_of_the_modes_compute_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    # 494.75e12 FLOP per step in 1 s: half the bf16 peak of an H100 SXM (989.5), about all
    # of its TF32 peak (494.5)
    bf16 = utilization_fields(494_750_000_000_000, 1000.0, "bf16", H100)
    tf32 = utilization_fields(494_750_000_000_000, 1000.0, "tf32", H100)
    assert bf16["mfu"] == pytest.approx(0.5) and bf16["mfu_bf16"] == pytest.approx(0.5)
    assert tf32["mfu"] == pytest.approx(494.75 / 494.5) and tf32["mfu_bf16"] == pytest.approx(0.5)
    assert bf16["peak_flops"] == 989.5e12 and bf16["mfu_reason"] is None
    assert bf16["mamf"] is None and "mpbench calibrate" in bf16["mamf_reason"]


def test_unknown_gpu_gives_null_mfu_naming_it():
    f = utilization_fields(10**12, 100.0, "bf16", DeviceInfo("cuda", "NVIDIA GeForce RTX 3060", (8, 6)))
    assert f["mfu"] is None and f["mfu_bf16"] is None
    assert "NVIDIA GeForce RTX 3060" in f["mfu_reason"]


def test_calibration_feeds_mamf(tmp_path, monkeypatch):
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    result = calibration.measure(CPU, ["fp32"], sizes=(64, 128), repeats=2)
    path = calibration.save(result, calibration.calibration_path(CPU))
    assert path.parent == tmp_path and result["results"]["fp32"]["flops"] > 0
    best = result["results"]["fp32"]["flops"]
    assert calibration.ceiling(CPU, "fp32") == (best, None)
    assert calibration.ceiling(CPU, "bf16")[0] is None  # not calibrated for bf16
    f = utilization_fields(int(best), 2000.0, "fp32", CPU)  # best FLOP per step, 2 s a step
    assert f["mamf"] == pytest.approx(0.5) and f.get("mfu") is None and "CPUs" in f["mfu_reason"]


def test_cpu_record_has_every_metric_or_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    r = run_cases([small_case(mode="fp32", steps=5, warmup=1)], log=None, isolate=False)[0]
    assert r["status"] == "ok"
    for metric, why in REASON_FIELDS.items():
        assert r[metric] is not None or r[why], f"{metric} is null and {why} does not say why"
    assert r["timed_steps"] == 4 and len(r["step_times_ms"]) == 4
    assert r["peak_mem_source"] == "rss" and r["peak_mem_mb"] > 50  # torch alone needs more
    assert r["achieved_flops"] == pytest.approx(r["flops_per_step"] / (r["step_time_ms"] / 1e3))


def test_pause_leaves_evaluation_out_of_time_energy_and_gpm(fake_gpu, monkeypatch):
    monkeypatch.setattr(nvml_mod, "GPM_MIN_WINDOW_S", 0.02)
    # energy: 1000 J at enter, 1010 at the pause, 1500 at the resume (the evaluation), 1520 at exit
    fake, _ = fake_gpu(energy_mj=[1_000_000, 1_010_000, 1_500_000, 1_520_000], gpm_supported=True,
                       gpm_metrics={5: 50.0, 7: 50.0, 9: 0.0})  # fmt: skip
    w = window_mod.MeasuredWindow(H100)
    with w:
        time.sleep(0.05)
        with w.paused():
            time.sleep(0.2)  # held-out evaluation
        time.sleep(0.05)
    f = w.fields(timed_steps=10, tokens_per_step=100)
    assert 0.09 < f["window_s"] < 0.2  # the two timed segments, not the 0.2 s evaluation
    assert f["energy_j_per_step"] == pytest.approx(3.0)  # (10 + 20) J over 10 steps
    assert f["tensor_core_util"] == pytest.approx(0.5) and fake.calls["nvmlGpmMetricsGet"] == 2  # one per segment


def test_a_failing_device_sync_still_closes_every_tracker(fake_gpu, monkeypatch):
    fake, _ = fake_gpu(gpm_supported=True)
    w = window_mod.MeasuredWindow(H100)
    with pytest.raises(RuntimeError, match="illegal memory access"), w:
        monkeypatch.setattr(window_mod, "synchronize", _raise_device_error)
    assert not w._sampler._thread.is_alive()
    assert not fake.gpm_allocated  # GPM samples freed


def _raise_device_error(dev) -> None:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")
