"""NVML against a fake pynvml: loading, UUID matching, constants and names, GPM and its failure paths."""

from __future__ import annotations

import inspect
import time

import pynvml
import pytest

from suite.metrics import nvml as nv
from suite.metrics import nvml_readings as nr
from suite.metrics import nvml_sampler as ns
from suite.metrics.nvml import GpmTensorUtil, find_handle, load_nvml, uuid_of_torch_device
from tests.fake_nvml import FakeDevice, FakeNvml, make_fake


def test_fake_constants_match_real_pynvml():
    names = [n for n in vars(FakeNvml) if n.startswith(("NVML_", "nvmlClocksEventReason"))]
    assert len(names) > 15
    for name in names:
        assert getattr(FakeNvml, name) == getattr(pynvml, name), name
    for name in [n for n in vars(FakeNvml) if n.startswith("NVMLError_")]:
        assert getattr(FakeNvml, name)().value == getattr(pynvml, name)().value, name
    for name, suffix, bit in nr.EVENT_BITS:
        assert getattr(pynvml, f"nvmlClocksEventReason{suffix}") == bit, name


def test_code_uses_names_that_real_pynvml_has():
    used = [fn for fn, *_ in nr.POLLED.values()] + [c for _, c, *_ in nr.POLLED.values() if c]
    used += ["nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetTotalEnergyConsumption", "c_nvmlGpmMetricsGet_t"]
    used += ["nvmlDeviceGetCurrentClocksEventReasons", "nvmlGpmQueryDeviceSupport", "NVML_GPM_METRICS_GET_VERSION"]
    used += [*ns._EVENT_FUNCTIONS, "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetMemoryInfo", "nvmlMemory_v2"]
    assert "version" in inspect.signature(pynvml.nvmlDeviceGetMemoryInfo).parameters  # the v2 call's keyword
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


def gpm_fake(**overrides):
    """A fake whose last device supports GPM with fixed percentages."""
    metrics = {
        FakeNvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 42.0,
        FakeNvml.NVML_GPM_METRIC_HMMA_TENSOR_UTIL: 40.0,
        FakeNvml.NVML_GPM_METRIC_IMMA_TENSOR_UTIL: 0.0,
    }
    return make_fake(**({"gpm_supported": True, "gpm_metrics": metrics} | overrides))[0]


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


def test_gpm_segments_are_weighted_by_their_length_and_short_ones_left_out(monkeypatch):
    monkeypatch.setattr(nv, "GPM_MIN_WINDOW_S", 0.03)
    fake = gpm_fake()
    values = iter([80.0, 20.0])  # ANY metric of the first, then the second long segment
    real = fake.nvmlGpmMetricsGet

    def scripted(request):
        out = real(request)
        out.metrics[0].value = next(values)
        return out

    fake.nvmlGpmMetricsGet = scripted
    with GpmTensorUtil(fake, fake.nvmlDeviceGetHandleByIndex(2)) as gpm:
        time.sleep(0.09)  # long segment, weight ~3
        gpm.pause()
        gpm.resume()
        gpm.pause()  # a segment under the minimum: left out, said so
        gpm.resume()
        time.sleep(0.03 * 1.2)  # long segment, weight ~1.2
    r = gpm.result()
    assert 0.55 < r.tensor_core_util < 0.70  # ~ (3*0.8 + 1.2*0.2) / 4.2 = 0.63; an unweighted mean is 0.5
    assert "1 segment(s) of 100 ms or less left out" in r.reason
    assert not fake.gpm_allocated


def test_gpm_figure_outside_0_1_is_kept_for_the_self_check(monkeypatch):
    monkeypatch.setattr(nv, "GPM_MIN_WINDOW_S", 0.0)
    fake = gpm_fake(gpm_metrics={FakeNvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 130.0})
    with GpmTensorUtil(fake, fake.nvmlDeviceGetHandleByIndex(2)) as gpm:
        pass
    assert gpm.result().tensor_core_util == pytest.approx(1.3)  # measured, not clamped
