"""Issue 27, items 1-4: measurements whose planted bugs passed the whole suite. Each test goes through the
real boundary (the window's calls into torch.cuda, NVML, /proc) with inputs under which the bug would show:
warm-up steps beside timed ones, current memory below its peak, a sample sequence that rises and falls,
another process on the GPU holding more memory than ours."""

from __future__ import annotations

import os

import pytest

from suite.hardware import DeviceInfo
from suite.metrics import memory as memory_mod
from suite.metrics import window as window_mod
from suite.metrics.nvml_sampler import NvmlSampler
from suite.training import train as train_mod
from suite.training.data import make_corpus
from tests.fake_cuda import FakeAllocator
from tests.fake_nvml import MIB, FakeHandle, make_fake
from tests.helpers import small_case

CPU = DeviceInfo("cpu", "test cpu")
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), index=1)  # not GPU 0: every call must name its GPU


@pytest.fixture
def gpu_window(monkeypatch):
    """`make(**fake device settings)` -> (a real MeasuredWindow for an H100 at cuda:1, its fake allocator): NVML
    is the fake (device 0), torch.cuda's allocator counters are `FakeAllocator`'s, and torch.cuda.synchronize
    (faked too) records the device it was given."""

    def make(use_nvml: bool = True, **device):
        fake, _ = make_fake(1, **device)
        monkeypatch.setattr(window_mod, "nvml_device", lambda index: (fake, FakeHandle(0), None))
        allocator = FakeAllocator().install(monkeypatch)
        return window_mod.MeasuredWindow(H100, use_nvml=use_nvml), allocator

    return make


# -- 1: energy per step over the timed steps, not warm-up -------------------------------------------------


def test_energy_per_step_and_tokens_per_joule_count_the_timed_steps_only(gpu_window, monkeypatch):
    """5 steps, 2 of them warm-up: the 90 J the counter advanced over the window are 3 timed steps' energy
    (30 J each), not 5 steps' (18 J). The window is entered after warm-up, so dividing by all steps is wrong."""
    window, _ = gpu_window(energy_mj=[1_000_000, 1_090_000])  # read at the window's two edges
    monkeypatch.setattr(train_mod, "MeasuredWindow", lambda device: window)
    case = small_case(steps=5, warmup=2)  # 3 timed steps: none kept for the profiler (it needs more than 3)
    corpus = make_corpus(None, case.model_config.vocab_size)
    train = corpus.batches(case.steps, case.batch_size, case.seq_len, case.seed, "train")
    heldout = corpus.batches(1, case.batch_size, case.seq_len, case.seed, "heldout")
    r = train_mod.run_case(case, CPU, corpus, train, heldout)
    m = r.measurements
    assert m["timed_steps"] == 3 == len(r.timing.times_ms)
    assert m["energy_j_per_step"] == pytest.approx(90 / 3)
    assert m["tokens_per_joule"] == pytest.approx(3 * case.batch_size * case.seq_len / 90)


# -- 2: the CUDA allocator's peak, not its current figure, across pause and resume -------------------------


def test_allocator_peaks_are_torchs_max_counters_over_the_active_segments(gpu_window):
    """Each segment frees what it allocated (current < peak at every edge); the held-out evaluation's own
    peak (the highest) is left out; the second segment's peak is the window's."""
    window, cuda = gpu_window(use_nvml=False)
    cuda.alloc(1000)  # the model and optimizer, before the window
    with window:
        cuda.alloc(3000, slack_mib=100)  # activations of a timed step
        cuda.free(3000)
        cuda.empty_cache()
        with window.paused():  # held-out evaluation: not counted
            cuda.alloc(9000)
            cuda.free(9000)
            cuda.empty_cache()
        cuda.alloc(4000, slack_mib=200)
        cuda.free(4000)  # ends at 1000 MiB allocated: the current figure is far below the peak
    f = window.fields(timed_steps=2, tokens_per_step=64)
    assert f["peak_mem_allocated_mb"] == 5000  # 1000 + 4000 in the second segment; never the 9000 evaluation
    assert f["peak_mem_reserved_mb"] == 5200
    assert cuda.devices == {"cuda:1"}  # every counter read names the case's GPU
    assert cuda.syncs == ["cuda:1"] * 4  # the window's edges and the pause's two: on the case's GPU


def test_allocator_peak_of_the_first_segment_survives_the_pause(gpu_window):
    window, cuda = gpu_window(use_nvml=False)
    with window:
        cuda.alloc(6000, slack_mib=50)
        cuda.free(6000)
        cuda.empty_cache()  # current 0 MiB at the pause
        with window.paused():
            pass
        cuda.alloc(10)
    f = window.fields(timed_steps=2, tokens_per_step=64)
    assert (f["peak_mem_allocated_mb"], f["peak_mem_reserved_mb"]) == (6000, 6050)


# -- 3: the CPU's RSS peak is the highest sample, not the last ---------------------------------------------


def test_rss_peak_is_the_highest_sample_of_the_window(monkeypatch):
    """Resident memory rises to 400 MiB, falls to 150 by the window's end; the evaluation's 900 is paused out."""
    rss = {"now": 100 * MIB}
    monkeypatch.setattr(memory_mod, "_rss_bytes", lambda: rss["now"])
    window = window_mod.MeasuredWindow(CPU)
    with window:
        rss["now"] = 400 * MIB
        with window.paused():  # samples 400 on the way in
            rss["now"] = 900 * MIB  # the evaluation's own memory, freed before the window resumes
            rss["now"] = 300 * MIB
        rss["now"] = 150 * MIB
    f = window.fields(timed_steps=2, tokens_per_step=64)
    assert f["peak_mem_mb"] == 400 and f["peak_mem_source"] == "rss"


# -- 4: NVML's process memory is this process's, matched by PID --------------------------------------------


def test_process_memory_is_ours_when_another_process_holds_more(gpu_window):
    """Our PID at 2000 MiB beside the parent (6000) and a stranger (9000): the peak is ours, the others are named."""
    me, parent, stranger = os.getpid(), os.getppid(), 999_999
    window, cuda = gpu_window(processes=[[(parent, 6000 * MIB), (me, 2000 * MIB), (stranger, 9000 * MIB)]])
    with window:
        pass
    f = window.fields(timed_steps=2, tokens_per_step=64)
    assert f["peak_mem_mb"] == 2000 and f["peak_mem_source"] == "nvml-process"
    assert f["gpu_shared_with"] == sorted({parent, stranger})


def test_the_samplers_default_pid_is_this_process():
    fake, _ = make_fake(1, processes=[[(os.getppid(), 6000 * MIB), (os.getpid(), 2000 * MIB)]])
    with NvmlSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), interval_s=0.005) as sampler:
        pass
    assert sampler.result().peak_mem_mb == 2000


def test_inside_a_container_the_lone_process_is_ours_through_the_window(gpu_window):
    """A PID namespace: NVML lists the host's PID; the one compute process on the device is ours. Two that
    are not ours: unknown, with the reason, never the larger one's figure."""
    window, _ = gpu_window(processes=[[(123_456, 1500 * MIB)]])
    with window:
        pass
    f = window.fields(timed_steps=2, tokens_per_step=64)
    assert f["peak_mem_mb"] == 1500 and f["gpu_shared_with"] == []
    window, _ = gpu_window(processes=[[(123_456, 1500 * MIB), (654_321, 7000 * MIB)]])
    with window:
        pass
    f = window.fields(timed_steps=2, tokens_per_step=64)
    assert f["peak_mem_mb"] is None and "is not among the 2 compute process(es)" in f["peak_mem_reason"]
