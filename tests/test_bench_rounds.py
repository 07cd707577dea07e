"""`pytest benchmarks/`: rounds of train steps, the comparison with fp32, emulated ids, the CPU skip."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.steps import RoundStats, case_id, prepared_steps, round_stats, speedup_vs_fp32, summary_lines
from suite.running.execute import Batches
from suite.training.case import Case

REPO = Path(__file__).parent.parent


def _stats(median: float, emulated: str | None = None) -> RoundStats:
    return RoundStats(median=median, min=median * 0.9, max=median * 1.2, stddev=median * 0.05, rounds=6,
                      emulated=emulated)  # fmt: skip


def test_case_ids_mark_the_modes_that_run_emulated_here():
    assert case_id("fp8-tensorwise", "cpu", False) == "fp8-tensorwise-emulated"  # no float8 kernel on a CPU
    assert case_id("mxfp8", "cpu", False) == "mxfp8-emulated"
    assert case_id("fp32", "cpu", False) == "fp32"
    assert case_id("bf16", "cpu", False) == "bf16"
    assert case_id("no-such-mode", "cpu", False) == "no-such-mode"  # its test reports the error


def test_speed_up_is_against_fp32_and_null_with_a_reason_otherwise():
    fp32 = _stats(40.0)
    assert speedup_vs_fp32(fp32, fp32) == (1.0, None)
    assert speedup_vs_fp32(_stats(20.0), fp32) == (2.0, None)  # twice as fast as fp32
    ratio, why = speedup_vs_fp32(_stats(400.0, "fp8 needs CUDA 8.9+: runs emulated"), fp32)
    assert ratio is None and why.startswith("emulated kernels (fp8 needs CUDA 8.9+)")
    no_fp32 = "fp32 was not timed in this session; add it to --mpbench-modes"
    assert speedup_vs_fp32(_stats(20.0), None) == (None, no_fp32)
    assert speedup_vs_fp32(None, fp32)[0] is None


def test_the_summary_puts_fp32_first_as_each_models_reference():
    rounds = {("tiny", "bf16"): _stats(20.0), ("tiny", "fp32"): _stats(40.0),
              ("tiny", "fp8-tensorwise"): _stats(400.0, "no float8 kernel")}  # fmt: skip
    header, *rows = summary_lines(rounds)
    assert "vs fp32" in header
    assert rows[0].startswith("tiny/fp32 (reference)") and rows[0].endswith("1.00x")  # not the fastest row
    assert rows[1].startswith("tiny/bf16") and rows[1].endswith("2.00x")
    assert rows[2].startswith("tiny/fp8-tensorwise [emulated]") and rows[2].endswith("n/a (emulated)")
    assert summary_lines({("tiny", "bf16"): _stats(20.0)})[1].endswith("n/a (no fp32 rounds)")


def test_round_stats_are_the_rounds_pytest_benchmark_timed():
    timed = SimpleNamespace(stats=SimpleNamespace(stats=SimpleNamespace(data=[0.010, 0.030, 0.020])))
    r = round_stats(timed, None)
    assert (r.median, r.min, r.max, r.rounds) == (pytest.approx(20.0), pytest.approx(10.0), pytest.approx(30.0), 3)
    assert r.stddev == pytest.approx(10.0)
    assert round_stats(SimpleNamespace(stats=None), None) is None  # --benchmark-disable: nothing timed


def test_prepared_steps_train_on_the_cases_batches_in_order():
    case = Case(model="tiny", mode="fp32", device="cpu", batch_size=2, seq_len=16, steps=3, warmup=1)
    train = Batches().get(case)[1]
    with prepared_steps(case) as (step, next_batch):
        for i in range(4):  # one more round than batches: they wrap around
            (batch,), kwargs = next_batch()
            assert kwargs == {} and torch.equal(batch, train[i % 3])
            assert step(batch) is None


@pytest.mark.slow
def test_benchmark_table_has_rounds_of_steps_and_speed_up_vs_fp32(tmp_path):
    """The whole `pytest benchmarks/` on a CPU, small: every row has rounds with a spread, fp32 is
    the reference of the speed-up (timed first even when named last), and the tracker overhead is
    skipped with its reason."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-rs", "-p", "no:cacheprovider",
           "--mpbench-device", "cpu", "--mpbench-modes", "bf16,fp32", "--mpbench-steps", "4", "--mpbench-warmup", "1",
           f"--benchmark-json={out}"]  # fmt: skip
    # not PYTEST_XDIST_WORKER & co. of the xdist worker running this test: pytest-benchmark reads them
    # as "under xdist" and disables every benchmark (no --benchmark-json written)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY" and not k.startswith("PYTEST_")}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = {b["param"]: b for b in json.loads(out.read_text())["benchmarks"]}
    assert set(rows) == {"tiny-fp32", "tiny-bf16"}
    for row in rows.values():
        assert row["stats"]["rounds"] == 3 and row["stats"]["iterations"] == 1  # steps - warmup rounds of one step
        assert row["stats"]["max"] > row["stats"]["min"]  # a real spread, not one call
        assert row["group"] == "tiny: one train step per round"
    assert rows["tiny-fp32"]["extra_info"]["speedup_vs_fp32"] == 1.0
    bf16 = rows["tiny-bf16"]["extra_info"]
    assert bf16["speedup_vs_fp32"] > 0 and bf16["speedup_vs_fp32_reason"] is None and bf16["reference"] == "fp32"
    assert bf16["omp_wait_policy"] == "PASSIVE"  # idle OpenMP threads sleep instead of spinning
    assert bf16["convergence_verdict"] == "pass" and bf16["convergence_seeds"] == 1  # seeds.judge's, one seed
    assert "tiny/fp32 (reference)" in done.stdout
    assert "tracker overhead is gated on a GPU only" in done.stdout
