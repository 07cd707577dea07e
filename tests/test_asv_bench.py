"""The asv benchmark functions, on records (no asv run needed)."""

import math

import pytest

from benchmarks.asv_bench import bench_matrix
from benchmarks.asv_bench.bench_matrix import MODES, PrecisionMatrix, figure, per_token
from suite.modes import MODES as REGISTRY


def test_asv_mode_list_matches_the_registry():
    assert MODES == list(REGISTRY)


def _records():
    return {
        "fp32": {"status": "ok", "step_time_ms": 20.0, "tokens_per_step": 1000, "energy_j_per_step": 2.0,
                 "peak_mem_mb": 900.0, "final_loss": 2.5, "loss_delta_vs_fp32": 0.0, "mfu": 0.41,
                 "tensor_core_util": None, "tokens_per_s": 50_000.0, "peak_mem_allocated_mb": None},
        "tf32": {"status": "skipped", "reason": "tf32 needs a CUDA GPU"},
    }  # fmt: skip


def test_every_track_reads_its_figure_with_units():
    bench, records = PrecisionMatrix(), _records()
    assert bench.track_lower_step_time(records, "fp32") == 20.0
    assert bench.track_lower_time_per_token(records, "fp32") == pytest.approx(20.0)  # 20 ms / 1000 tokens = 20 us
    assert bench.track_lower_energy_per_token(records, "fp32") == pytest.approx(2.0)  # 2 J / 1000 = 2 mJ
    assert bench.track_lower_peak_mem(records, "fp32") == 900.0
    assert bench.track_lower_final_loss(records, "fp32") == 2.5
    assert bench.track_graph_mfu(records, "fp32") == pytest.approx(41.0)
    assert math.isnan(bench.track_graph_tensor_core_util(records, "fp32"))  # not measured: n/a, not 0
    assert math.isnan(bench.track_lower_peak_mem_allocated(records, "fp32"))
    tracks = [name for name in dir(bench) if name.startswith("track_")]
    assert all(getattr(bench, name).unit for name in tracks)
    assert all(name.startswith(("track_lower_", "track_graph_")) for name in tracks)


def test_skipped_mode_is_skipped_by_setup():
    with pytest.raises(NotImplementedError, match="needs a CUDA GPU"):
        PrecisionMatrix().setup(_records(), "tf32")
    PrecisionMatrix().setup(_records(), "fp32")  # a run mode sets up fine


def test_helpers_never_invent_a_value():
    assert math.isnan(figure({}, "bf16", "step_time_ms"))
    assert math.isnan(per_token({"fp32": {"step_time_ms": 1.0}}, "fp32", "step_time_ms", 1.0))  # no token count


def test_importing_the_asv_file_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; import benchmarks.asv_bench.bench_matrix; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=bench_matrix.__file__.rsplit("/benchmarks/", 1)[0],
    )
    assert out.stdout.strip() == "False", out.stderr


def test_cases_follow_the_environment(monkeypatch):
    monkeypatch.setenv("MPBENCH_ASV_DEVICE", "cpu")
    monkeypatch.setenv("MPBENCH_ASV_STEPS", "5")
    cases = bench_matrix.matrix_cases()
    assert [c.mode for c in cases] == MODES and {c.steps for c in cases} == {5} and cases[0].model == "tiny"


def test_emulated_timings_are_not_tracked_but_their_loss_is():
    records = {"fp8-tensorwise": {"emulated": True, "step_time_ms": 50.0, "energy_j_per_step": 1.0,
                                  "tokens_per_step": 256, "final_loss": 3.5, "peak_mem_mb": 900.0}}  # fmt: skip
    assert math.isnan(figure(records, "fp8-tensorwise", "step_time_ms"))
    assert math.isnan(per_token(records, "fp8-tensorwise", "step_time_ms", 1e3))
    assert math.isnan(per_token(records, "fp8-tensorwise", "energy_j_per_step", 1e3))
    assert figure(records, "fp8-tensorwise", "final_loss") == 3.5
    assert figure(records, "fp8-tensorwise", "peak_mem_mb") == 900.0
    native = {"int8-mixed": records["fp8-tensorwise"] | {"emulated": False}}
    assert figure(native, "int8-mixed", "step_time_ms") == 50.0
