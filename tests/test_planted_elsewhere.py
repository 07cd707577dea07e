"""Issue 27's search for the same weakness elsewhere: figures whose tests had inputs under which a bug could
not show (one process in NVML's list, one entry per PID, ranks whose mean and median order agree, a job's
tokens per joule never asserted)."""

from __future__ import annotations

import os

import pytest

from suite.metrics.nvml_sampler import NvmlSampler
from suite.metrics.timing import TimingStats
from suite.running.distributed import _combined_measurements, _slowest
from tests.fake_nvml import MIB, make_fake
from tests.helpers import small_case
from tests.test_doctor import PASS, run

# -- mpbench doctor: our process's memory among others -----------------------------------------------------


def test_doctor_reads_this_processs_memory_when_another_process_holds_more():
    """The fake GPU listed only our PID, so the "one process, so it is ours" fallback hid a probe matched to
    the wrong PID. Here the parent holds 5 GiB beside us: the memory check still follows our PID."""
    got = run(dict(others=[(os.getppid(), 5120 * MIB)]))
    memory = got["nvml_process_memory"]
    assert memory.status == PASS and f"NVML (pid {os.getpid()}) grew 1,024 MiB" in memory.detail, memory
    assert got["no_other_process"].figures["others"] == [[os.getppid(), 5120.0]]
    assert (memory.figures["before_mb"], memory.figures["after_mb"]) == (600, 1624)  # our context, then + 1 GiB
    assert got["no_other_process"].figures["ours_mb"] < 5120  # ours (context and cached blocks), not the parent's


# -- NVML: one process listed several times (MPS) ----------------------------------------------------------


def test_several_entries_of_our_pid_in_one_sample_are_summed_and_the_peak_is_over_samples():
    me = os.getpid()
    fake, _ = make_fake(1, processes=[[(me, 1000 * MIB), (me, 500 * MIB), (7, 9000 * MIB)], [(me, 1200 * MIB)]])
    with NvmlSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), interval_s=0.005) as sampler:
        pass
    w = sampler.result()
    assert w.peak_mem_mb == 1500 and w.gpu_shared_with == [7]  # 1000 + 500 in one sample; never 9000, nor 1200


# -- data parallel: the slowest rank by its median, the job's tokens per joule -------------------------------


def _rank(rank: int, step_ms: list[float], **measurements) -> dict:
    return {"rank": rank, "timing": TimingStats.from_times(step_ms), "measurements": measurements}


def test_the_slowest_rank_is_the_one_with_the_larger_median_step():
    """Rank 0 had one 90 ms hiccup (mean 36.7, median 10); rank 1 is steadily 20 ms: rank 1 sets the job's speed."""
    everyone = [
        _rank(0, [10.0, 90.0, 10.0], energy_j_per_step=4.0),
        _rank(1, [20.0, 20.0, 20.0], energy_j_per_step=6.0),
    ]
    assert _slowest(everyone)["rank"] == 1


def test_the_jobs_tokens_per_joule_is_the_global_batch_over_every_ranks_energy():
    case = small_case(nproc=2)  # 2 x 32 tokens per rank: 128 per optimizer step
    everyone = [_rank(r, [10.0], energy_j_per_step=e, avg_power_w=300.0) for r, e in ((0, 4.0), (1, 6.0))]
    m = _combined_measurements(everyone, _slowest(everyone), case)
    assert m["energy_j_per_step"] == 10.0
    assert m["tokens_per_joule"] == pytest.approx(case.tokens_per_step / 10.0) == pytest.approx(12.8)


# -- CPU: the sampled figure is resident memory, not the address space ---------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc only")
def test_rss_reading_is_the_resident_set_the_kernel_reports():
    """Every RSS test fakes `_rss_bytes`; the real reading must be VmRSS (resident), not VmSize (torch maps
    GiBs of address space it never touches), so reading the wrong statm field shows. How far apart the two are
    depends on what the worker ran before (a heap that kept freed pages resident): the check needs them only
    to be told apart, by more than the reading's window."""
    from suite.metrics.memory import _rss_bytes

    def status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    before, got, after = status_kib("VmRSS"), _rss_bytes(), status_kib("VmRSS")
    assert min(before, after) * 1024 - 8 * MIB <= got <= max(before, after) * 1024 + 8 * MIB
    assert status_kib("VmSize") * 1024 - got > 64 * MIB  # VmSize is not what was read
