"""NVML metrics against a fake pynvml: peaks, energy, UUID matching, throttling, GPM and failure paths."""

from __future__ import annotations

import time

import pynvml
import pytest

from suite.metrics import nvml as nv
from suite.metrics.nvml import GpmTensorUtil, NvmlSampler, find_handle, load_nvml, uuid_of_torch_device
from tests.fake_nvml import MIB, FakeDevice, FakeNvml, NVMLError_GpuIsLost, make_fake

PID = 4242
FAST = 0.005  # poll interval for tests


def wait_for_calls(fake: FakeNvml, name: str, n: int, timeout_s: float = 2.0) -> None:
    """Block until the fake has served `n` calls of `name` (the sampler thread is running)."""
    deadline = time.monotonic() + timeout_s
    while fake.calls[name] < n:
        assert time.monotonic() < deadline, f"sampler made only {fake.calls[name]} {name} calls"
        time.sleep(0.001)


def run_window(fake: FakeNvml, pid: int = PID, sleep_s: float = 0.0, device: int = -1) -> nv.NvmlWindow:
    """Sample the fake's device for one short window."""
    handle = fake.nvmlDeviceGetHandleByIndex(len(fake.devices) + device if device < 0 else device)
    with NvmlSampler(fake, handle, pid=pid, interval_s=FAST) as sampler:
        time.sleep(sleep_s)
    return sampler.result()


def test_fake_constants_match_real_pynvml():
    names = [n for n in vars(FakeNvml) if n.startswith(("NVML_", "nvmlClocksEventReason"))]
    assert len(names) > 15
    for name in names:
        assert getattr(FakeNvml, name) == getattr(pynvml, name), name
    for name in [n for n in vars(FakeNvml) if n.startswith("NVMLError_")]:
        assert getattr(FakeNvml, name)().value == getattr(pynvml, name)().value, name
    for name, suffix, bit in nv._EVENT_BITS:
        assert getattr(pynvml, f"nvmlClocksEventReason{suffix}") == bit, name


def test_code_uses_names_that_real_pynvml_has():
    used = [fn for fn, *_ in nv._POLLED.values()] + [c for _, c, *_ in nv._POLLED.values() if c]
    used += ["nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetTotalEnergyConsumption", "c_nvmlGpmMetricsGet_t"]
    used += ["nvmlDeviceGetCurrentClocksEventReasons", "nvmlGpmQueryDeviceSupport", "NVML_GPM_METRICS_GET_VERSION"]
    used += [f"NVML_GPM_METRIC_{kind}_TENSOR_UTIL" for kind in ("ANY", "HMMA", "IMMA")]
    assert [name for name in used if not hasattr(pynvml, name)] == []
    assert {"isSupportedDevice"} <= {f for f, _ in pynvml.c_nvmlGpmSupport_t._fields_}
    assert {"metricId", "nvmlReturn", "value"} <= {f for f, _ in pynvml.c_nvmlGpmMetric_t._fields_}


def test_load_nvml_missing_library_gives_one_line_reason():
    nvml, reason = load_nvml(FakeNvml([], library_missing=True))
    assert nvml is None
    assert reason == "NVML unavailable: NVML Shared Library Not Found (no NVIDIA driver)"


def test_load_nvml_initializes_the_module():
    fake = FakeNvml([FakeDevice(uuid="GPU-0")])
    nvml, reason = load_nvml(fake)
    assert nvml is fake and reason is None and fake.initialized


def test_load_nvml_real_pynvml_either_works_or_says_why():
    nvml, reason = load_nvml()
    assert (nvml is None) != (reason is None)
    if nvml is None:
        assert reason.startswith("NVML unavailable: ") and "\n" not in reason


@pytest.mark.parametrize("spelling", ["nvml", "torch", "upper"])
def test_find_handle_matches_by_uuid_not_index(spelling):
    fake, devices = make_fake(4)
    nvml_uuid = devices[2].uuid
    query = {"nvml": nvml_uuid, "torch": nvml_uuid.removeprefix("GPU-"), "upper": nvml_uuid.upper()}[spelling]
    handle = find_handle(fake, query)
    assert handle.index == 2


def test_find_handle_decodes_bytes_and_skips_broken_devices():
    fake, devices = make_fake(3)
    fake.uuid_as_bytes = True
    devices[0].unsupported.add("nvmlDeviceGetUUID")
    assert find_handle(fake, devices[1].uuid.removeprefix("GPU-")).index == 1


def test_find_handle_unknown_uuid_names_it():
    fake, _ = make_fake(2)
    with pytest.raises(LookupError, match="deadbeef-0000"):
        find_handle(fake, "deadbeef-0000-0000-0000-000000000000")


def test_peaks_include_a_spike_seen_in_one_sample():
    # calls 0 (enter) and 1 (thread or exit) always happen, so the spike at call 1 is always sampled
    fake, _ = make_fake(
        processes=[[(PID, 1024 * MIB)], [(PID, 3072 * MIB), (99, 5000 * MIB)], [(PID, 1024 * MIB)]],
        mem_used=[2048 * MIB, 8192 * MIB, 2048 * MIB],
    )
    w = run_window(fake)
    assert w.peak_mem_mb == 3072 and w.peak_mem_source == "nvml-process"
    assert w.peak_mem_device_mb == 8192
    assert w.samples >= 2 and "peak_mem_mb" not in w.reasons


def test_background_thread_samples_between_enter_and_exit():
    fake, _ = make_fake(processes=[[(PID, 100 * MIB)]] * 4 + [[(PID, 900 * MIB)], [(PID, 100 * MIB)]])
    handle = fake.nvmlDeviceGetHandleByIndex(2)
    with NvmlSampler(fake, handle, pid=PID, interval_s=FAST) as sampler:
        wait_for_calls(fake, "nvmlDeviceGetComputeRunningProcesses", 6)
    w = sampler.result()
    assert w.peak_mem_mb == 900 and w.samples >= 7
    assert not sampler._thread.is_alive()


def test_energy_is_end_minus_start_and_power_is_energy_over_time():
    fake, _ = make_fake(energy_mj=[5_000_000, 5_250_000, 9_999_999], power_mw=[250_000])
    w = run_window(fake, sleep_s=0.02)
    assert w.energy_j == pytest.approx(250.0)
    assert w.duration_s >= 0.02
    assert w.avg_power_w == pytest.approx(250.0 / w.duration_s)
    assert w.power_w_samples_mean == pytest.approx(250.0)
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 2  # read at enter and exit, never per sample


def test_process_not_listed_falls_back_to_device_memory():
    fake, _ = make_fake(processes=[[(1, 500 * MIB)]], mem_used=[3000 * MIB, 4000 * MIB])
    w = run_window(fake)
    assert w.peak_mem_source == "nvml-device"
    assert w.peak_mem_mb == w.peak_mem_device_mb == 4000
    assert str(PID) in w.reasons["peak_mem_source"]


def test_clock_median_and_temperature_max():
    fake, _ = make_fake(sm_clock_mhz=[1980, 1000, 1980], temperature_c=[60, 85, 70])
    handle = fake.nvmlDeviceGetHandleByIndex(2)
    with NvmlSampler(fake, handle, pid=PID, interval_s=FAST) as sampler:
        wait_for_calls(fake, "nvmlDeviceGetClockInfo", 5)
    w = sampler.result()
    assert w.sm_clock_mhz == 1980 and w.temperature_c_max == 85


def test_power_cap_bit_means_throttled():
    idle, cap = FakeNvml.nvmlClocksEventReasonGpuIdle, FakeNvml.nvmlClocksEventReasonSwPowerCap
    fake, _ = make_fake(event_reasons=[idle, cap | idle, 0])
    w = run_window(fake)
    assert w.throttled is True
    assert w.throttle_reasons == ["gpu_idle", "sw_power_cap"]


@pytest.mark.parametrize("name", sorted(nv.THROTTLE_BITS))
def test_every_counted_bit_means_throttled(name):
    bit = {n: b for n, _, b in nv._EVENT_BITS}[name]
    w = run_window(make_fake(event_reasons=[bit])[0])
    assert w.throttled is True and w.throttle_reasons == [name]


def test_idle_and_application_clock_bits_are_not_throttling():
    bits = FakeNvml.nvmlClocksEventReasonGpuIdle | FakeNvml.nvmlClocksEventReasonApplicationsClocksSetting
    w = run_window(make_fake(event_reasons=[bits])[0])
    assert w.throttled is False
    assert w.throttle_reasons == ["gpu_idle", "applications_clocks_setting"]


def test_unsupported_metrics_are_none_with_reason_and_others_still_work():
    unsupported = {"nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature"}
    fake, _ = make_fake(unsupported=unsupported, processes=[[(PID, 700 * MIB)]], temperature_c=[50])
    w = run_window(fake, sleep_s=0.01)
    assert w.energy_j is None and w.avg_power_w is None and w.power_w_samples_mean is None
    assert w.temperature_c_max is None
    assert "Not Supported" in w.reasons["energy_j"] and "Not Supported" in w.reasons["power_w_samples_mean"]
    assert "nvmlDeviceGetTemperature" in w.reasons["temperature_c_max"]
    assert w.peak_mem_mb == 700 and w.sm_clock_mhz == 1980 and w.throttled is False
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 1  # not supported: asked once, then skipped


def test_transient_error_is_retried_and_leaves_no_reason():
    fake, _ = make_fake(mem_used=[NVMLError_GpuIsLost(), 5000 * MIB])
    w = run_window(fake)
    assert w.peak_mem_device_mb == 5000 and "peak_mem_device_mb" not in w.reasons


def test_a_non_nvml_error_never_reaches_the_caller():
    fake, _ = make_fake(processes=[RuntimeError("driver went odd")], mem_used=[1234 * MIB])
    w = run_window(fake, sleep_s=0.02)
    assert w.peak_mem_source == "nvml-device" and w.peak_mem_mb == 1234
    assert "driver went odd" in w.reasons["peak_mem_source"]


def test_malformed_process_entries_only_lose_process_memory():
    fake, _ = make_fake(mem_used=[900 * MIB], power_mw=[100_000])
    fake.nvmlDeviceGetComputeRunningProcesses = lambda handle: [object()]  # no .pid
    w = run_window(fake)
    assert w.peak_mem_source == "nvml-device" and w.peak_mem_mb == 900 and w.power_w_samples_mean == 100
    assert "AttributeError" in w.reasons["peak_mem_source"] and "sampler" not in w.reasons


def test_unreported_process_memory_falls_back_with_reason():
    fake, _ = make_fake(processes=[[(PID, None)]], mem_used=[900 * MIB])
    w = run_window(fake)
    assert w.peak_mem_source == "nvml-device" and "usedGpuMemory not reported" in w.reasons["peak_mem_source"]


def test_sampler_lets_training_errors_through_and_stops():
    fake, _ = make_fake()
    sampler = NvmlSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), pid=PID, interval_s=FAST)
    with pytest.raises(ValueError, match="boom"), sampler:
        raise ValueError("boom")
    assert not sampler._thread.is_alive() and sampler.result().samples >= 2


def gpm_fake(**overrides):
    """A fake whose last device supports GPM with fixed percentages."""
    metrics = {
        FakeNvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 42.0,
        FakeNvml.NVML_GPM_METRIC_HMMA_TENSOR_UTIL: 40.0,
        FakeNvml.NVML_GPM_METRIC_IMMA_TENSOR_UTIL: 0.0,
    }
    return make_fake(gpm_supported=True, gpm_metrics=metrics, **overrides)[0]


def test_gpm_percentages_become_fractions(monkeypatch):
    monkeypatch.setattr(nv, "GPM_MIN_WINDOW_S", 0.0)  # the real 100 ms rule is tested below
    fake = gpm_fake()
    with GpmTensorUtil(fake, fake.nvmlDeviceGetHandleByIndex(2)) as gpm:
        pass
    r = gpm.result()
    assert r.tensor_core_util == pytest.approx(0.42) and r.hmma_util == pytest.approx(0.40)
    assert r.imma_util == 0.0 and r.reason is None
    assert fake.calls["nvmlGpmSampleAlloc"] == 2 and not fake.gpm_allocated  # both samples freed


def test_gpm_unsupported_gpu_gives_none_with_reason():
    fake, _ = make_fake(gpm_supported=False)
    with GpmTensorUtil(fake, fake.nvmlDeviceGetHandleByIndex(2)) as gpm:
        pass
    r = gpm.result()
    assert r.tensor_core_util is None and r.hmma_util is None and r.imma_util is None
    assert r.reason == "GPM not supported on this GPU (needs Hopper or later)"
    assert fake.calls["nvmlGpmSampleAlloc"] == 0


def test_gpm_query_error_gives_none_with_reason():
    fake, _ = make_fake(unsupported={"nvmlGpmQueryDeviceSupport"})
    with GpmTensorUtil(fake, fake.nvmlDeviceGetHandleByIndex(2)) as gpm:
        pass
    assert gpm.result().tensor_core_util is None and "GPM unavailable" in gpm.result().reason


def test_gpm_window_of_100ms_or_less_gives_none_and_frees_samples():
    fake = gpm_fake()
    with GpmTensorUtil(fake, fake.nvmlDeviceGetHandleByIndex(2)) as gpm:
        pass
    r = gpm.result()
    assert r.tensor_core_util is None and "100 ms" in r.reason
    assert fake.calls["nvmlGpmMetricsGet"] == 0 and not fake.gpm_allocated


def test_gpm_failed_metric_is_none_and_the_rest_are_kept(monkeypatch):
    monkeypatch.setattr(nv, "GPM_MIN_WINDOW_S", 0.0)
    fake = gpm_fake(gpm_returns={FakeNvml.NVML_GPM_METRIC_IMMA_TENSOR_UTIL: 3})
    with GpmTensorUtil(fake, fake.nvmlDeviceGetHandleByIndex(2)) as gpm:
        pass
    r = gpm.result()
    assert r.tensor_core_util == pytest.approx(0.42) and r.imma_util is None
    assert r.reason.startswith("imma_util: Not Supported")


def test_uuid_of_torch_device_is_none_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert uuid_of_torch_device(0) is None
