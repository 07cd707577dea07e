"""`mpbench doctor`: honest "cannot check" on this CPU, and each GPU check failed through the
fake NVML and the fake CUDA timing layer, passing with a healthy fake."""

import itertools
import json
import time

import pytest
import torch

from suite.cli import doctor, quiet_checks
from suite.cli.doctor import CANNOT, FAIL, PASS, WARN, Durations, Host, TorchaoBuild, diagnose, torchao_build
from suite.cli.main import main
from suite.metrics.tensor_cores import ProfilerTensorCoreResult
from tests.fake_cuda import H100_UUID, FakeCuda
from tests.fake_nvml import MIB, FakeDevice, FakeNvml

FAST = Durations(event_s=0.01, energy_s=1.0, gpm_s=0.12, share_s=0.01, memory_mib=1024)
GPU_CHECKS = ["gpu_visible", "nvml_same_gpu", *(name for name, _, _ in doctor.GPU_CHECKS)]
TORCHAO_FILES = ("_C_cutlass_90a.abi3.so", "_C_mxfp8.cpython-310-x86_64-linux-gnu.so")  # torchao 0.18.0's wheel
TORCHAO_OK = TorchaoBuild("0.18.0+cu130", "13.0", TORCHAO_FILES)


def clock(*durations_s):
    """A fake perf_counter: every second call (the end of a timed span) advances by the next of `durations_s`,
    cycled; the quiet checks time each span between two calls."""
    spans, now, calls = itertools.cycle(durations_s), [0.0], itertools.count(1)

    def timer():
        if next(calls) % 2 == 0:
            now[0] += next(spans)
        return now[0]

    return timer


def host(load=0.2, cpus=16, *durations_s):
    """A machine with this 1-minute load average, CPU count and CPU-matmul timings (a steady 10 ms if none)."""
    return Host(loadavg=lambda: (load, load, load), cpus=lambda: cpus, usable=lambda: cpus,
                timer=clock(*(durations_s or (0.01,))))  # fmt: skip


QUIET = host()


def machine(cuda=None, nvml=None, **device):
    """A healthy H100 unless told otherwise: (fake CUDA, fake NVML)."""
    dev = FakeDevice(uuid=H100_UUID, **({"gpm_supported": True} | device))
    nvml = nvml or FakeNvml([dev])
    return FakeCuda(device=dev, **(cuda or {})), nvml


def checks_of(fake_cuda, fake_nvml, device="cuda", torchao=TORCHAO_OK):
    """The doctor's checks by name on fake hardware (no training run: there is no real GPU)."""
    got = diagnose(device, fake_cuda, fake_nvml, durations=FAST, run_record=False, torchao=lambda: torchao, host=QUIET)
    return {c.name: c for c in got}


def run(cuda=None, device="cuda", **nvml_device):
    return checks_of(*machine(cuda, **nvml_device), device=device)


def test_a_healthy_gpu_passes_every_check():
    got = run()
    assert {name: c.status for name, c in got.items() if c.status != PASS} == {}
    assert set(GPU_CHECKS) <= set(got)
    assert got["tensor_core_util"].figures == {"source": "GPM", "bf16": 0.85, "fp32": 0.0}
    assert got["energy_power"].figures["avg_power_w"] == pytest.approx(550, rel=1e-3)
    assert got["nvml_process_memory"].figures["after_mb"] - got["nvml_process_memory"].figures["before_mb"] == 1024
    assert "driver 570.86.15" in got["versions"].detail and "cuda_driver 12.8" in got["versions"].detail


def test_on_this_cpu_every_gpu_check_cannot_be_checked_and_nothing_fails():
    got = {c.name: c for c in diagnose("auto", cuda=FakeCuda(present=False), durations=FAST)}
    assert {got[n].status for n in GPU_CHECKS} == {CANNOT}
    assert got["record_self_check"].status == PASS and got["record_self_check"].figures["suspect"] == []
    assert "no CUDA GPU" in got["energy_power"].detail
    assert got["cpu_threads"].status == PASS and got["cpu_bf16"].status == PASS
    assert all(c.status != FAIL for c in got.values())
    # the real torchao here: a CPU build of torch, on which its CUDA extensions cannot load and are not used
    assert got["torchao_c_extension"].status == CANNOT and "CPU build" in got["torchao_c_extension"].detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA GPU")
def test_the_command_on_this_cpu_exits_0_with_cannot_check_lines(capsys):
    assert main(["doctor", "--no-run"]) == 0
    text = capsys.readouterr().out
    assert "cannot check  gpu_visible" in text and "no CUDA GPU" in text and "0 failed" in text
    assert "record_self_check" not in text  # --no-run
    assert main(["doctor", "--json", "--no-run"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["failed"] is False
    assert {c["name"]: c["status"] for c in data["checks"]}["event_vs_wall"] == CANNOT
    assert main(["doctor", "--device", "cuda", "--no-run"]) == 1  # asked for a GPU that is not there: a failure
    assert "FAIL          gpu_visible" in capsys.readouterr().out
    assert main(["doctor", "--device", "gpu"]) == 2
    assert "device='gpu'" in capsys.readouterr().err


# (check, how to break it: fake CUDA settings, fake NVML device settings, text the detail must hold)
BROKEN = [
    ("gpu_visible", dict(present=False), {}, "no CUDA GPU"),
    ("nvml_same_gpu", dict(gpu_uuid="GPU-ffffffff-0000-0000-0000-000000000000"), {}, "no NVML device has UUID"),
    ("nvml_same_gpu", dict(gpu_uuid=None), {}, "no UUID"),
    ("event_vs_wall", dict(event_scale=0.5), {}, "events miss the GPU's work"),
    ("event_vs_wall", dict(event_scale=1.2), {}, "longer than the wall clock"),
    ("energy_power", dict(watts=2000.0), {}, "above the enforced limit 700 W"),
    ("energy_power", dict(watts=0.0), {}, "did not advance"),
    ("energy_power", dict(watts=1.0), {}, "below any working GPU"),
    ("clocks_not_throttled", {}, dict(event_reasons=[0x8 | 0x4]), "hw_slowdown"),
    ("clocks_not_throttled", {}, dict(event_reasons=[0x40 | 0x1]), "hw_thermal_slowdown"),
    ("tensor_core_util", dict(tensor_util_pct={"bf16": 3.0, "fp32": 0.0}), {}, "should use tensor cores"),
    ("tensor_core_util", {}, dict(gpm_returns={5: 3}), "Not Supported"),  # GPM supported, fails at run time
    ("nvml_process_memory", dict(nvml_growth=0.0), {}, "grew 0 MiB for 1,024 MiB"),
    ("peak_table_row", dict(gpu_name="NVIDIA Mystery 9000"), {}, "no row for 'NVIDIA Mystery 9000'"),
    ("matmul_share_of_peak", dict(tflops={"bf16": 100.0, "fp32": 50.0}), {}, "outside 25%-105%"),
    ("matmul_share_of_peak", dict(tflops={"bf16": 1500.0, "fp32": 50.0}), {}, "the row or the timing is wrong"),
    ("no_other_process", dict(others=[(4242, 2048 * MIB)]), {}, "pid 4242 (2,048 MiB)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "cuda", "nvml_device", "text"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_gpu_check_fails_through_the_fakes(name, cuda, nvml_device, text):
    got = run(cuda, **nvml_device)
    assert got[name].status == FAIL and text in got[name].detail, got[name]


def test_every_gpu_check_has_a_failing_case():
    assert {b[0] for b in BROKEN} == set(GPU_CHECKS)


def test_a_power_cap_under_max_power_matmuls_is_not_a_failure():
    got = run(event_reasons=[0x4])
    assert got["clocks_not_throttled"].status == PASS
    assert "at the power cap of 700 W" in got["clocks_not_throttled"].detail


def test_failing_checks_make_the_command_exit_1(monkeypatch, capsys):
    fake_cuda, fake_nvml = machine(dict(event_scale=0.5))
    real = doctor.diagnose
    monkeypatch.setattr(
        doctor,
        "diagnose",
        lambda d, run_record: real(d, cuda=fake_cuda, nvml_module=fake_nvml, durations=FAST, run_record=run_record),
    )
    assert main(["doctor", "--device", "cuda:0", "--no-run"]) == 1
    assert "FAIL          event_vs_wall" in capsys.readouterr().out


def test_without_nvml_the_nvml_checks_cannot_be_checked_and_the_match_fails():
    fake_cuda, _ = machine()
    got = checks_of(fake_cuda, FakeNvml([], library_missing=True))
    assert got["nvml_same_gpu"].status == FAIL and "NVML Shared Library Not Found" in got["nvml_same_gpu"].detail
    for name in ("energy_power", "tensor_core_util", "nvml_process_memory", "no_other_process"):
        assert got[name].status == CANNOT and "NVML not matched" in got[name].detail
    assert got["event_vs_wall"].status == PASS and got["matmul_share_of_peak"].status == PASS


def test_an_energy_counter_the_gpu_lacks_cannot_be_checked():
    fake_cuda, fake_nvml = machine(unsupported={"nvmlDeviceGetTotalEnergyConsumption"})
    got = checks_of(fake_cuda, fake_nvml)
    assert got["energy_power"].status == CANNOT and "NotSupported" in got["energy_power"].detail


def test_an_unreadable_power_limit_cannot_be_checked():
    got = run(unsupported={"nvmlDeviceGetEnforcedPowerLimit"})
    assert got["energy_power"].status == CANNOT and "limit unreadable" in got["energy_power"].detail


def test_without_gpm_the_profiler_share_judges_tensor_cores():
    shares = {"bf16": ProfilerTensorCoreResult(0.9, [("nvjet_tst", 1.0)]), "fp32": ProfilerTensorCoreResult(0.0)}
    got = run(dict(profiler=shares), gpm_supported=False)
    assert got["tensor_core_util"].status == PASS and "profiler" in got["tensor_core_util"].detail
    same = {"bf16": ProfilerTensorCoreResult(0.1), "fp32": ProfilerTensorCoreResult(0.1)}
    assert run(dict(profiler=same), gpm_supported=False)["tensor_core_util"].status == FAIL
    assert run(gpm_supported=False)["tensor_core_util"].status == CANNOT  # neither GPM nor the profiler


def test_a_gpm_window_under_100_ms_fails_rather_than_guesses():
    fake_cuda, fake_nvml = machine(dict(max_sleep_s=0.0))
    got = checks_of(fake_cuda, fake_nvml)
    assert got["tensor_core_util"].status == FAIL and "needs more than 100 ms" in got["tensor_core_util"].detail


def test_in_a_container_the_only_listed_process_is_ours():
    fake_cuda, fake_nvml = machine(dict(pid=1))  # NVML lists pid 1; this process is os.getpid()
    got = checks_of(fake_cuda, fake_nvml)
    assert got["no_other_process"].status == PASS and "only process listed" in got["no_other_process"].detail
    assert got["nvml_process_memory"].status == PASS
    fake_cuda, fake_nvml = machine(dict(pid=1, others=[(2, MIB)]))
    got = checks_of(fake_cuda, fake_nvml)
    assert got["no_other_process"].status == FAIL and "at least 1 other" in got["no_other_process"].detail
    assert got["nvml_process_memory"].status == CANNOT


def test_the_fake_allocator_keeps_freed_blocks_cached_until_empty_cache():
    fake_cuda, _ = machine()
    listed = lambda: fake_cuda.device.scripts["processes"].values[0][0][1] / MIB  # noqa: E731 - NVML's MiB for us
    assert listed() == 600  # the CUDA context
    fake_cuda.matmul_loop("bf16", 8192, 3)
    assert listed() == 600 + 640  # a, b, c in bf16 and an fp32 randn: freed, still reserved
    fake_cuda.matmul_loop("bf16", 256, 1)
    assert listed() == 600 + 640  # a smaller loop reuses the cached blocks
    fake_cuda.empty_cache()
    assert listed() == 600


def test_nvml_process_memory_is_read_before_and_after_with_no_cached_block():
    """Defect 5 of issue 20: earlier probes leave hundreds of MiB cached; `allocate` empties the cache,
    so a "before" read with the cache still counted made NVML's growth look short by that much."""
    fake_cuda, fake_nvml = machine()
    fake_cuda.matmul_loop("fp32", 8192, 3)  # as the tensor-core probe leaves it: 768 MiB cached
    got = checks_of(fake_cuda, fake_nvml)["nvml_process_memory"]
    assert got.status == PASS, got
    assert got.figures["before_mb"] == 600 and got.figures["after_mb"] == 600 + 1024


def _fake_torchao(tmp_path, files=("_C_cutlass_90a.abi3.so", "_C_mxfp8.so"), skip=None):
    """A torchao package as its __init__ leaves it: the module's globals and its _C*.so files on disk."""
    from types import SimpleNamespace

    root = tmp_path / "torchao"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    for name in (*files, "libother.so"):  # libother.so: not one torchao's glob takes
        (root / name).write_bytes(b"")
    return SimpleNamespace(__file__=str(root / "__init__.py"), __version__="0.18.0", skip_loading_so_files=bool(skip),
                           _skip_reason=skip)  # fmt: skip


def test_torchao_build_tells_which_c_extensions_torch_loaded(tmp_path):
    import os

    module = _fake_torchao(tmp_path)
    tried = []

    def load(path):  # torch.ops.load_library failing as dlopen does for a build against another CUDA
        tried.append(os.path.basename(path))
        raise OSError(f"{path}: libcudart.so.12: cannot open shared object file")

    ok = {os.path.realpath(tmp_path / "torchao" / "_C_cutlass_90a.abi3.so")}
    b = torchao_build(module, loaded=ok, load=load)
    assert b.version == "0.18.0" and b.files == ("_C_cutlass_90a.abi3.so", "_C_mxfp8.so")
    assert tried == ["_C_mxfp8.so"] and list(b.failed) == ["_C_mxfp8.so"]
    assert "libcudart.so.12" in b.failed["_C_mxfp8.so"]
    skipped = torchao_build(_fake_torchao(tmp_path / "s", skip="incompatible torch version"), set(), load)
    assert skipped.skipped == "incompatible torch version" and skipped.failed == {} and tried == ["_C_mxfp8.so"]


def test_the_fake_torchao_has_the_real_ones_names():
    import torchao

    assert isinstance(torchao.skip_loading_so_files, bool) and hasattr(torchao, "_skip_reason")
    real = torchao_build()  # this CPU build of torch cannot load torchao's CUDA extensions: each is named, with why
    assert real.version == torchao.__version__ and real.files and set(real.failed) <= set(real.files)


# (build, a GPU is usable, status, text the detail must hold)
TORCHAO_CASES = [
    (TORCHAO_OK, True, PASS, "2 of 2 C extension(s) loaded"),
    (TorchaoBuild("0.18.0", "13.0", ("_C_a.so", "_C_b.so"), {"_C_b.so": "OSError: undefined symbol: _ZN3c10"}), True,
     FAIL, "1 of 2 C extension(s) loaded; _C_b.so: OSError: undefined symbol"),
    (TorchaoBuild("0.18.0", "12.8", ("_C_a.so",), skipped="incompatible torch version"), True, FAIL,
     "loaded no C extension: incompatible torch version"),
    (TorchaoBuild("0.18.0+cpu", "13.0"), True, FAIL, "ships no C extension"),
    (TorchaoBuild(None, "13.0", error="ModuleNotFoundError: No module named 'torchao'"), True, CANNOT, "not import"),
    (TorchaoBuild("0.18.0", None, ("_C_a.so",), {"_C_a.so": "OSError"}), True, CANNOT, "CPU build"),
    (TORCHAO_OK, False, CANNOT, "no CUDA GPU"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "gpu", "status", "text"), TORCHAO_CASES)
def test_torchao_c_extension_check(build, gpu, status, text):
    fake_cuda, fake_nvml = machine(dict(present=gpu))
    got = checks_of(fake_cuda, fake_nvml, torchao=build)["torchao_c_extension"]
    assert got.status == status and text in got.detail, got
    if status == FAIL:  # the fix: torchao's wheel for torch's own CUDA, from the PyTorch index
        cu = build.cuda.replace(".", "")
        assert (f"pip install --force-reinstall --no-deps torchao=={build.version.split('+')[0]} --index-url "
                f"https://download.pytorch.org/whl/cu{cu}") in got.detail  # fmt: skip


def test_an_allocation_served_from_the_cache_cannot_be_checked():
    got = run(dict(reserved_growth=0.0, nvml_growth=0.0))
    assert got["nvml_process_memory"].status == CANNOT and "reserved only 0 MiB" in got["nvml_process_memory"].detail


def test_a_probe_that_raises_is_a_named_failure():
    fake_cuda, fake_nvml = machine()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    fake_cuda.allocate = broken
    got = checks_of(fake_cuda, fake_nvml)
    assert got["nvml_process_memory"].status == FAIL and "illegal memory access" in got["nvml_process_memory"].detail


def test_the_clocks_are_read_while_the_gpu_works_through_either_pynvml_name():
    fake_cuda, fake_nvml = machine()
    reads = []
    real = fake_nvml.nvmlDeviceGetCurrentClocksEventReasons
    fake_nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: reads.append(len(fake_cuda.loops)) or real(h)
    checks_of(fake_cuda, fake_nvml)
    assert len(reads) == 1  # once, from inside a loop (before it was appended to `loops`)
    assert fake_cuda.loops[reads[0]].iters > 3  # the energy loop, not its 3-matmul trial
    # a driver before R535: FunctionNotFound for the new name, the old name gives the same bits
    fake_cuda, fake_nvml = machine(old_driver=True, event_reasons=[0x40])
    got = checks_of(fake_cuda, fake_nvml)
    assert got["clocks_not_throttled"].status == FAIL and "hw_thermal_slowdown" in got["clocks_not_throttled"].detail
    assert fake_nvml.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here")
def test_on_a_real_gpu_the_probes_agree_with_themselves():
    got = {c.name: c for c in diagnose("cuda")}
    for name in ("gpu_visible", "event_vs_wall"):
        assert got[name].status == PASS, got[name]
    assert all(c.status in (PASS, FAIL, CANNOT) and c.detail for c in got.values())


def test_the_real_cuda_boundary_times_and_syncs_the_chosen_device(monkeypatch):
    """TorchCuda against a recording stand-in for torch: events on cuda:1's stream, sync of cuda:1 only."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from suite.metrics import probes

    calls = []

    class Tensor:
        def to(self, dtype):
            return self

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            calls.append(("record", stream))

        def elapsed_time(self, end):
            return 12.5

    cuda = SimpleNamespace(
        device=lambda d: calls.append(("device", d)) or nullcontext(), current_stream=lambda d: ("stream", d),
        Event=Event, synchronize=lambda d=None: calls.append(("sync", d)),
    )  # fmt: skip
    fake = SimpleNamespace(cuda=cuda, device=torch.device, randn=lambda *shape, device: Tensor(),
                           empty_like=lambda t: Tensor(), matmul=lambda a, b, out: calls.append("matmul"))  # fmt: skip
    monkeypatch.setattr(probes, "torch", fake)
    t = probes.TorchCuda(1).matmul_loop("bf16", 64, 3, during=lambda: calls.append("during"))
    dev = torch.device("cuda", 1)
    assert t.event_ms == 12.5 and t.iters == 3 and t.wall_ms >= 0
    assert [c for c in calls if c[0] == "record"] == [("record", ("stream", dev))] * 2
    assert [c for c in calls if c[0] == "sync"] == [("sync", dev)] * 2 and ("device", dev) in calls
    # the loop's 3 matmuls sit between the events; `during` runs after the last launch, before the final sync
    order = [c if isinstance(c, str) else c[0] for c in calls]
    assert order[-7:] == ["record", "matmul", "matmul", "matmul", "record", "during", "sync"]


# ---- is the machine quiet enough to time? (issue 22) ----


@pytest.mark.parametrize(
    "load, cpus, status, text",
    [(6.0, 4, WARN, "1-minute load average 6.00 on 4 CPU(s): 1.50 per CPU (4 usable here), past 0.5: other work"),
     (2.0, 4, PASS, "0.50 per CPU (4 usable here), under 0.5: quiet"),
     (0.3, 16, PASS, "1-minute load average 0.30 on 16 CPU(s): 0.02 per CPU")],
)  # fmt: skip
def test_the_load_average_per_cpu_warns_on_a_busy_machine(load, cpus, status, text):
    got = quiet_checks.cpu_load(host(load, cpus))
    assert got.status == status and text in got.detail, got
    assert got.figures["load_1min"] == load and got.figures["cpus"] == cpus
    assert ("run mpbench doctor again" in got.detail) == (status == WARN)  # a warning says what to do


def test_a_missing_or_unreadable_load_average_cannot_be_checked():
    assert quiet_checks.cpu_load(Host(loadavg=None)).status == CANNOT

    def unreadable():
        raise OSError("Load averages are unobtainable")

    got = quiet_checks.cpu_load(Host(loadavg=unreadable))
    assert got.status == CANNOT and "unobtainable" in got.detail


def test_a_cpu_matmul_whose_time_varies_warns_and_a_steady_one_passes():
    busy = {c.name: c for c in diagnose("cpu", durations=FAST, run_record=False, host=host(3.0, 2, 0.010, 0.030))}
    got = busy["repeatability"]
    assert got.status == WARN and got.figures["spread"] == pytest.approx(1.0)  # 10 and 30 ms: p10-p90 20 of 20 ms
    assert "timed 20x: median 20 ms, p10-p90 10-30 ms, spread 100% of the median, past 20%" in got.detail
    assert busy["cpu_load"].status == WARN and all(c.status != FAIL for c in busy.values())
    summary = doctor.format_checks(list(busy.values())).splitlines()[-1]
    assert summary.startswith("0 failed, 3 passed, 11 cannot be checked here; 2 warned")
    steady = quiet_checks.repeatability(quiet_checks.cpu_sampler(clock(0.0100, 0.0105, 0.0098, 0.0102)), "steady")
    assert steady.status == PASS and "spread 7% of the median, under 20%: repeatable" in steady.detail


def test_the_real_cpu_probe_is_short_and_reports_its_spread():
    t0 = time.perf_counter()
    got = quiet_checks.repeatability(quiet_checks.cpu_sampler(time.perf_counter), "real")
    # ~0.4 s quiet; 4.9 s once with 4 test workers on 2 cores: the bound only catches a probe whose work
    # grows without limit (its samples are sized to ~10 ms each), not a busy machine
    assert time.perf_counter() - t0 < 30.0
    assert got.status in (PASS, WARN) and got.figures["samples"] == 20 and got.figures["median_ms"] > 0


def test_a_gpu_whose_matmul_times_vary_warns_and_a_steady_one_passes():
    fake_cuda, fake_nvml = machine()
    assert checks_of(fake_cuda, fake_nvml)["repeatability"].status == PASS  # the fake GPU's loops take equal time
    fake_cuda, fake_nvml = machine()
    real, slow = fake_cuda.matmul_loop, itertools.cycle([1.0, 1.5])

    def shared(*args, **kwargs):  # another process's kernels take turns with ours: every other loop 1.5x
        t = real(*args, **kwargs)
        return type(t)(t.dtype, t.n, t.iters, t.event_ms * next(slow), t.wall_ms)

    fake_cuda.matmul_loop = shared
    got = checks_of(fake_cuda, fake_nvml)["repeatability"]
    assert got.status == WARN and got.figures["spread"] == pytest.approx(0.4)  # (1.5 - 1) / 1.25
    assert "a bf16 4096^3 matmul loop on NVIDIA H100 80GB HBM3 (CUDA events)" in got.detail
    gone = checks_of(FakeCuda(present=False), FakeNvml([]))  # asked for a GPU that is not there: nothing to time
    assert gone["repeatability"].status == CANNOT


def test_other_processes_on_the_gpu_say_what_to_do():
    got = run(dict(others=[(4242, 2048 * MIB)]))["no_other_process"]
    assert got.status == FAIL and "wait for them to end (nvidia-smi) or pick a free GPU" in got.detail


def test_warnings_are_counted_but_do_not_fail_the_command(monkeypatch, capsys):
    real = doctor.diagnose
    monkeypatch.setattr(doctor, "diagnose", lambda d, run_record: real(d, run_record=run_record, host=host(9.0, 2)))
    assert main(["doctor", "--device", "cpu", "--no-run"]) == 0
    out = capsys.readouterr().out
    assert "WARN          cpu_load" in out and "cannot be checked here; 1 warned (busy" in out
    assert main(["doctor", "--device", "cpu", "--no-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["warned"] is True and data["failed"] is False


def test_the_load_average_of_a_slice_of_the_host_says_it_is_host_wide():
    sliced = Host(loadavg=lambda: (1.0, 1.0, 1.0), cpus=lambda: 64, usable=lambda: 4, timer=QUIET.timer)
    got = quiet_checks.cpu_load(sliced)
    assert got.status == PASS and "host-wide" in got.detail and got.figures["usable_cores"] == 4
    assert "host-wide" not in quiet_checks.cpu_load(QUIET).detail  # every CPU usable: the figure is ours


def test_a_clock_that_does_not_advance_cannot_check_repeatability():
    got = quiet_checks.repeatability(lambda: 0.0, "a stopped clock")
    assert got.status == CANNOT and "did not advance" in got.detail
