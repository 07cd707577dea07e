"""The precision matrix as benchmarks, and the gates that fail a GPU CI run on a regression.

Each case's record comes from the matrix run (`run_cases`, a worker per case: see conftest.py);
pytest-benchmark times rounds of one train step each (warm-up rounds first, the device synced
at the end of each round), so its min, max and spread describe steps. mpbench's own figures
(the CUDA-event median step time, memory, energy, loss) go to `extra_info`, with the speed-up
against fp32's rounds, and the gates below judge them. The id of a mode that runs on emulated
kernels here ends in `-emulated`: its time is not a speed, and its speed-up is null.

Convergence is judged by seeds.judge against the mode's tolerance, the rule of `mpbench check` and
the report: FAIL fails the benchmark, "lags (expected)" is an xfail, and "inconclusive" or a mode
better than fp32 beyond noise is said (a ConvergenceWarning and a printed line, and in extra_info),
never passed in silence. The matrix runs one seed per case, so its verdicts are single-seed.
"""

from __future__ import annotations

import os
import warnings

import pytest

from suite.reporting import baseline, convergence, seeds
from suite.reporting.seed_groups import verdict_text

EXTRA = (
    "status", "step_time_ms", "step_time_p10_ms", "step_time_p90_ms", "step_time_cv", "tokens_per_s", "mfu",
    "mfu_bf16", "mamf", "tensor_core_util", "tensor_core_util_source", "peak_mem_mb", "peak_mem_source",
    "peak_mem_allocated_mb", "energy_j_per_step", "tokens_per_joule", "final_loss", "loss_floor", "device", "gpu_name",
    "emulated", "emulated_reason",
)  # fmt: skip
SIXTEEN_BIT = ("amp-fp16", "bf16", "pure-fp16", "pure-bf16", "pure-bf16-sr")


class ConvergenceWarning(UserWarning):
    """A convergence verdict that is no pass and no failure: inconclusive, or better than fp32 beyond noise."""


def judged(cases, model: str, mode: str) -> seeds.ModeVerdict:
    """The mode against fp32 of the same case, through seeds.judge with the mode's tolerance."""
    reference = _ok(cases.get(model, convergence.REFERENCE))
    record = dict(cases.get(model, mode))
    record |= convergence.delta_fields(record, reference)  # a case run after fp32, in a call of its own
    return next(v for v in seeds.judge([reference, record], convergence.TOLERANCES) if v.mode == mode)


def act_on(v: seeds.ModeVerdict) -> None:
    """FAIL fails, "lags (expected)" xfails; inconclusive and better-than-fp32 warn and print; pass passes."""
    label = f"{v.model}/{v.mode}"
    if v.outcome == "FAIL":
        pytest.fail(f"{label} loss drifted from fp32: {verdict_text(v)}: {v.detail}")
    if v.outcome == "lags (expected)":
        pytest.xfail(f"{label} lags fp32 as expected: {v.detail}")
    said = [f"{label} convergence {verdict_text(v)}: {v.detail}"] if v.outcome == "inconclusive" or v.better else []
    for line in said:
        print(f"mpbench: {line}")
        warnings.warn(ConvergenceWarning(line), stacklevel=2)


def _ok(record: dict) -> dict:
    if record["status"] != "ok":
        pytest.fail(f"{record['model']}/{record['mode']} ended as {record['status']}: {record['reason']}")
    return record


def test_train(benchmark, cases, model, mode, runnable):
    from benchmarks.steps import REFERENCE, emulated_reason, prepared_steps, round_stats, speedup_vs_fp32

    record = _ok(cases.get(model, mode))
    case = cases.case(model, mode)
    benchmark.group = f"{model}: one train step per round"
    with prepared_steps(case) as (step, next_batch):
        benchmark.pedantic(step, setup=next_batch, rounds=case.steps - case.warmup, warmup_rounds=case.warmup)
    emulated = emulated_reason(mode, cases.cfg.device, cases.cfg.emulate)
    stats = round_stats(benchmark, emulated)
    if stats is not None:  # None under --benchmark-disable: the step ran once, untimed
        cases.rounds[model, mode] = stats
    ratio, why = speedup_vs_fp32(stats, cases.rounds.get((model, REFERENCE)))
    benchmark.extra_info |= {k: record[k] for k in EXTRA} | {
        "round": "one train step, device synced",
        "reference": REFERENCE,
        "speedup_vs_fp32": ratio,  # fp32's median round / this one's: above 1 is faster
        "speedup_vs_fp32_reason": why,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # conftest.py: PASSIVE unless the user set one
    }
    if mode != convergence.REFERENCE:
        delta = convergence.delta_fields(record, cases.get(model, convergence.REFERENCE))
        benchmark.extra_info["loss_delta_vs_fp32"] = delta.get("loss_delta_vs_fp32")
        v = judged(cases, model, mode)  # the gate is test_convergence_against_fp32; the verdict travels here too
        benchmark.extra_info |= {"convergence_verdict": v.outcome, "convergence_detail": f"{verdict_text(v)}: "
                                 f"{v.detail}", "convergence_seeds": len(v.seeds)}  # fmt: skip


def test_convergence_against_fp32(cases, model, mode, runnable):
    if mode == convergence.REFERENCE:
        pytest.skip("fp32 is the reference")
    act_on(judged(cases, model, mode))


def test_sixteen_bit_modes_use_less_memory_than_fp32(cases, model, bench_config):
    fp32 = _ok(cases.get(model, "fp32"))
    if fp32["gpu_name"] is None:
        pytest.skip("memory ordering is a GPU property; CPU RSS mostly measures torch itself")
    worse = []
    for mode in (m for m in SIXTEEN_BIT if m in bench_config.modes):
        r = cases.get(model, mode)
        if r["status"] == "ok" and r["peak_mem_allocated_mb"] >= fp32["peak_mem_allocated_mb"]:
            worse.append(f"{mode} {r['peak_mem_allocated_mb']:.0f} MiB >= fp32 {fp32['peak_mem_allocated_mb']:.0f} MiB")
    assert not worse, f"{model}: 16-bit modes should peak below fp32 at the same batch: " + "; ".join(worse)


def test_against_committed_baseline(cases, model, mode, runnable, bench_config):
    from pathlib import Path

    record = _ok(cases.get(model, mode))
    path = baseline.baseline_path(record, Path(bench_config.baselines))
    stored = baseline.load(path)
    if stored is None:
        pytest.skip(f"no baseline for this machine ({path}); create one with `mpbench baseline RECORDS --out {path}`")
    entry = stored["entries"].get(f"{model}/{mode}")
    if entry is None:
        pytest.skip(f"{path} has no {model}/{mode} entry; rerun `mpbench baseline` with records of it")
    findings = baseline.compare(record, entry)
    regressed = [f.message(mode, model) for f in findings if f.regressed]
    assert not regressed, "regression against the committed baseline:\n" + "\n".join(regressed)
