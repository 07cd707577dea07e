"""The NVML sampler against a fake pynvml: peaks, energy, throttling, stalls, containers, old drivers."""

from __future__ import annotations

import time

import pytest

from suite.metrics import nvml_readings as nr
from suite.metrics.nvml_sampler import NvmlSampler
from tests.fake_nvml import MIB, FakeNvml, NVMLError_GpuIsLost, make_fake

PID = 4242
FAST = 0.005  # poll interval for tests


def wait_for_calls(fake: FakeNvml, name: str, n: int, timeout_s: float = 2.0) -> None:
    """Block until the fake has served `n` calls of `name` (the sampler thread is running)."""
    deadline = time.monotonic() + timeout_s
    while fake.calls[name] < n:
        assert time.monotonic() < deadline, f"sampler made only {fake.calls[name]} {name} calls"
        time.sleep(0.001)


def run_window(fake: FakeNvml, pid: int = PID, sleep_s: float = 0.0, device: int = -1) -> nr.NvmlWindow:
    """Sample the fake's device for one short window."""
    handle = fake.nvmlDeviceGetHandleByIndex(len(fake.devices) + device if device < 0 else device)
    with NvmlSampler(fake, handle, pid=pid, interval_s=FAST) as sampler:
        time.sleep(sleep_s)
    return sampler.result()


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


def test_a_counter_that_did_not_advance_gives_no_energy_and_no_power_never_0_w():
    """Defect 7 of issue 20: a window shorter than one counter update read 0 J and so 0.0 W."""
    fake, _ = make_fake(energy_mj=[5_000_000])  # the same reading at both edges
    w = run_window(fake, sleep_s=0.01)
    assert w.energy_j is None and w.avg_power_w is None
    assert "did not advance over" in w.reasons["avg_power_w"] and "20-100 ms" in w.reasons["energy_j"]
    fake, _ = make_fake(energy_mj=[5_000_000, 4_000_000])  # a driver reload resets the counter
    w = run_window(fake)
    assert w.avg_power_w is None and "went backwards" in w.reasons["avg_power_w"]


def test_a_lone_process_with_another_pid_is_ours_inside_a_container():
    # a PID namespace: NVML lists the host's PID, never os.getpid(); one compute process is ours
    fake, _ = make_fake(processes=[[(1, 500 * MIB)]], mem_used=[3000 * MIB, 4000 * MIB])
    w = run_window(fake)
    assert w.peak_mem_mb == 500 and w.peak_mem_source == "nvml-process"
    assert w.peak_mem_device_mb == 4000 and w.gpu_shared_with == []


def test_unmatched_pid_among_several_processes_is_null_never_device_wide():
    fake, _ = make_fake(processes=[[(1, 500 * MIB), (2, 700 * MIB)]], mem_used=[3000 * MIB])
    w = run_window(fake)
    assert w.peak_mem_mb is None and w.peak_mem_source is None
    assert f"pid {PID} is not among the 2" in w.reasons["peak_mem_mb"]
    assert w.peak_mem_device_mb == 3000  # the device-wide figure stays, in its own field
    assert w.gpu_shared_with == [1, 2]


def test_other_processes_on_the_gpu_are_named():
    fake, _ = make_fake(processes=[[(PID, 500 * MIB)], [(PID, 600 * MIB), (77, 9000 * MIB)]])
    w = run_window(fake)
    assert w.peak_mem_mb == 600 and w.gpu_shared_with == [77]


def test_device_memory_uses_v2_which_leaves_driver_reserved_memory_out():
    fake, _ = make_fake(mem_used=[3000 * MIB], mem_reserved=500 * MIB)
    w = run_window(fake)
    assert w.peak_mem_device_mb == 2500 and "peak_mem_device_mb" not in w.reasons


def test_old_driver_falls_back_to_throttle_reasons_and_v1_memory():
    cap = FakeNvml.nvmlClocksEventReasonSwPowerCap
    fake, _ = make_fake(old_driver=True, event_reasons=[cap], mem_used=[3000 * MIB], mem_reserved=500 * MIB)
    w = run_window(fake)
    assert w.throttled is True and w.throttle_reasons == ["sw_power_cap"]
    assert fake.calls["nvmlDeviceGetCurrentClocksEventReasons"] == 1  # tried once, then the old name
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] >= 2
    assert w.peak_mem_device_mb == 3000 and "v1 memory info" in w.reasons["peak_mem_device_mb"]


def test_power_limit_is_read_in_watts():
    w = run_window(make_fake(power_limit_mw=350_000)[0])
    assert w.power_limit_w == 350.0


@pytest.mark.parametrize("stalls", [{"nvmlDeviceGetPowerUsage": 3}, {"nvmlDeviceGetTotalEnergyConsumption": 1}])
def test_a_stalled_nvml_call_never_stalls_training(stalls):
    fake, _ = make_fake(stalls=stalls, stall_s=30.0)
    handle = fake.nvmlDeviceGetHandleByIndex(2)
    t0 = time.monotonic()
    with NvmlSampler(fake, handle, pid=PID, interval_s=FAST, stall_timeout_s=0.5) as sampler:
        time.sleep(0.05)
    w = sampler.result()
    assert time.monotonic() - t0 < 2.5  # enter + exit + result each wait at most the stall timeout
    assert w.stalled is True and "stalled" in w.reasons["sampler"]
    assert w.energy_j is None and "stalled" in w.reasons["energy_j"]


def test_pause_leaves_the_paused_time_out_of_energy_and_samples():
    # energy counter: 1000 mJ at enter, 1100 at pause, 5000 at resume (paused work), 5200 at exit
    fake, _ = make_fake(energy_mj=[1000, 1100, 5000, 5200], processes=[[(PID, 100 * MIB)]])
    handle = fake.nvmlDeviceGetHandleByIndex(2)
    with NvmlSampler(fake, handle, pid=PID, interval_s=FAST) as sampler:
        time.sleep(0.02)
        sampler.pause()
        paused_calls = fake.calls["nvmlDeviceGetComputeRunningProcesses"]
        time.sleep(0.05)
        assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == paused_calls  # nothing sampled while paused
        sampler.resume()
        time.sleep(0.02)
    w = sampler.result()
    assert w.energy_j == pytest.approx(0.3)  # (1100 - 1000) + (5200 - 5000) mJ
    assert 0.04 <= w.duration_s < 0.09  # the two active segments, not the 50 ms pause
    assert w.avg_power_w == pytest.approx(0.3 / w.duration_s)


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


@pytest.mark.parametrize("name", sorted(nr.THROTTLE_BITS))
def test_every_counted_bit_means_throttled(name):
    bit = {n: b for n, _, b in nr.EVENT_BITS}[name]
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
    assert w.peak_mem_mb is None and w.peak_mem_device_mb == 1234
    assert "driver went odd" in w.reasons["peak_mem_mb"] and w.gpu_shared_with is None


def test_malformed_process_entries_only_lose_process_memory():
    fake, _ = make_fake(mem_used=[900 * MIB], power_mw=[100_000])
    fake.nvmlDeviceGetComputeRunningProcesses = lambda handle: [object()]  # no .pid
    w = run_window(fake)
    assert w.peak_mem_mb is None and w.peak_mem_device_mb == 900 and w.power_w_samples_mean == 100
    assert "AttributeError" in w.reasons["peak_mem_mb"] and "sampler" not in w.reasons


def test_unreported_process_memory_falls_back_with_reason():
    fake, _ = make_fake(processes=[[(PID, None)]], mem_used=[900 * MIB])
    w = run_window(fake)
    assert w.peak_mem_mb is None and "usedGpuMemory not reported" in w.reasons["peak_mem_mb"]


def test_sampler_lets_training_errors_through_and_stops():
    fake, _ = make_fake()
    sampler = NvmlSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), pid=PID, interval_s=FAST)
    with pytest.raises(ValueError, match="boom"), sampler:
        raise ValueError("boom")
    assert not sampler._thread.is_alive() and sampler.result().samples >= 2
