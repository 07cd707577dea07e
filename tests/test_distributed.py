"""Data parallelism through torchrun on CPU (gloo): equivalence, scaling, a rank that dies."""

from __future__ import annotations

import time

import pytest

from suite import run_cases
from suite.cli.main import main
from suite.records import store
from tests.helpers import small_case

# DDP averages the two ranks' gradients of their halves of the global batch; a 1-process run
# of the doubled batch takes the gradient of the mean over all of it: the same number up to
# float summation order (about 1e-7 relative in fp32), which Adam carries through 4 steps to
# well under 1e-4 nats. In bf16 the matmuls of a 2-row and a 4-row batch round differently
# (8-bit mantissa, ~4e-3 relative), which moves losses by up to ~1e-3 nats: bound 3e-3. A
# different batch order or a missing average moves them by more than 1e-2.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-3}


@pytest.fixture(scope="module")
def two_rank_records(tmp_path_factory) -> tuple[int, list[dict]]:
    """The foundation command with two processes, run once for the tests that read its records."""
    out = tmp_path_factory.mktemp("ddp") / "r.jsonl"
    code = main(["run", "--device", "cpu", "--nproc", "2", "--model", "tiny", "--modes", "fp32,bf16", "--steps", "4",
                 "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--out", str(out)])  # fmt: skip
    return code, store.read(out)


@pytest.mark.parametrize("mode", TOLERANCE)
def test_two_ranks_match_one_process_with_the_doubled_batch(two_rank_records, mode):
    two = {r["mode"]: r for r in two_rank_records[1]}[mode]
    one = run_cases([small_case(mode=mode, batch_size=4, steps=4, warmup=1, eval_batches=4)], log=None, isolate=False)[
        0
    ]
    assert two["status"] == "ok", two["reason"]
    assert two["world_size"] == 2 and two["tokens_per_step"] == one["tokens_per_step"] == 4 * 32
    assert two["data_digest"] == one["data_digest"] and two["init_digest"] == one["init_digest"]
    assert max(abs(a - b) for a, b in zip(two["loss_curve"], one["loss_curve"], strict=True)) < TOLERANCE[mode]
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=TOLERANCE[mode])
    assert len(two["rank_step_time_ms"]) == 2 and two["step_time_ms"] == max(two["rank_step_time_ms"])
    assert two["hosts"] and two["grad_comm"] == "fp32"


def test_scaling_ladder_and_grad_comm(tmp_path):
    out = tmp_path / "r.jsonl"
    code = main(["run", "--device", "cpu", "--model", "tiny", "--modes", "fp32,int8-weight", "--batch-size", "2",
                 "--seq-len", "32", "--steps", "4", "--scaling", "1,2", "--grad-comm", "fp16",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    records = {(r["mode"], r["world_size"]): r for r in store.read(out)}
    one, two = records["fp32", 1], records["fp32", 2]
    assert one["scaling_efficiency"] == 1.0 and one["grad_comm"] is None
    assert two["grad_comm"] == "fp16" and two["status"] == "ok"
    assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]))
    assert records["int8-weight", 2]["status"] == "skipped" and "DistributedDataParallel" in records[
        "int8-weight", 2]["reason"]  # fmt: skip
    assert records["int8-weight", 1]["status"] == "ok"


def test_a_rank_that_dies_becomes_an_error_record_naming_it(monkeypatch):
    monkeypatch.setenv("MPBENCH_FAULT", "crash:fp32@1")
    started = time.monotonic()
    r = run_cases([small_case(mode="fp32", nproc=2, steps=4, warmup=1)], log=None, case_timeout=120)[0]
    assert r["status"] == "error" and "rank 1 failed first (exit code 86)" in r["reason"], r["reason"]
    assert time.monotonic() - started < 90  # torchrun tears the other rank down: no hang


def test_the_foundation_command_with_two_processes(two_rank_records):
    code, records = two_rank_records
    assert code == 0 and [(r["mode"], r["world_size"], r["status"]) for r in records] == [
        ("fp32", 2, "ok"), ("bf16", 2, "ok")]  # fmt: skip
    assert "use --scaling 1,N" in records[0]["scaling_reason"]


def test_bf16_grad_comm_on_cpu_is_refused(capsys, tmp_path):
    args = ["run", "--device", "cpu", "--nproc", "2", "--grad-comm", "bf16", "--out", str(tmp_path / "r.jsonl")]
    assert main(args) == 2
    assert "needs CUDA and NCCL" in capsys.readouterr().err


def test_mpbench_run_launched_by_the_users_torchrun(tmp_path):
    """How multi-node runs start: the user's torchrun (or Slurm) runs `mpbench run` on every rank."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "suite.cli",
           "run", "--device", "cpu", "--model", "tiny", "--modes", "fp32,bf16", "--steps", "4", "--batch-size", "2",
           "--seq-len", "32", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = store.read(out)  # rank 0 alone wrote them
    assert [(r["mode"], r["world_size"], r["status"]) for r in records] == [("fp32", 2, "ok"), ("bf16", 2, "ok")]
    assert records[1]["loss_delta_vs_fp32"] is not None and records[0]["hosts"]


def _rank(rank: int, step_ms: float, **measurements):
    from suite.metrics.timing import TimingStats

    return {"rank": rank, "timing": TimingStats.from_times([step_ms]), "measurements": measurements}


def test_a_rank_without_energy_nulls_the_jobs_energy_instead_of_passing_one_rank_off():
    from suite.running.distributed import _combined_measurements, _slowest

    everyone = [
        _rank(0, 10.0, energy_j_per_step=5.0, avg_power_w=300.0, peak_mem_mb=900.0, peak_mem_source="nvml-process"),
        _rank(1, 12.0, energy_j_per_step=None, energy_reason="nvmlDeviceGetTotalEnergyConsumption: Not Supported",
              peak_mem_mb=None, peak_mem_source=None, peak_mem_reason="pid 7 is not among the 2"),
    ]  # fmt: skip
    m = _combined_measurements(everyone, _slowest(everyone), small_case(nproc=2))
    assert m["energy_j_per_step"] is None and m["tokens_per_joule"] is None and m["avg_power_w"] is None
    assert "rank(s) [1] measured no energy (nvmlDeviceGetTotalEnergyConsumption: Not Supported)" in m["energy_reason"]
    assert m["peak_mem_mb"] is None and "rank(s) [1]" in m["peak_mem_reason"]  # not rank 0's 900 MiB
    both = [_rank(r, 10.0, energy_j_per_step=5.0, avg_power_w=300.0, peak_mem_mb=900.0 + r) for r in (0, 1)]
    m = _combined_measurements(both, _slowest(both), small_case(nproc=2))
    assert m["energy_j_per_step"] == 10.0 and m["peak_mem_mb"] == 901.0 and m["avg_power_w"] == 600.0
    both[1]["measurements"]["avg_power_w"] = None  # energy but no power figure: the job's power is unknown, not 300 W
    assert _combined_measurements(both, _slowest(both), small_case(nproc=2))["avg_power_w"] is None


def test_a_rank_that_diverges_alone_stops_every_rank_at_the_same_step(monkeypatch):
    """Only rank 1 sees NaN losses (from its third step): the ranks agree at the check point and the
    case ends `diverged`, instead of rank 0 training on into a collective rank 1 never joins."""
    monkeypatch.setenv("MPBENCH_FAULT", "nan:fp32@1")
    started = time.monotonic()
    r = run_cases([small_case(mode="fp32", nproc=2, steps=8, warmup=1)], log=None, case_timeout=100)[0]
    assert r["status"] == "diverged", r["reason"]
    assert r["diverged_at_step"] == 3 and len(r["loss_curve"]) == 4  # stopped at the check point after step 4
    assert time.monotonic() - started < 60  # no wait for a collective timeout
