"""What the trackers cost: the same case timed with and without them; and what `--numerics` costs the steps
it does not sample (nothing, by construction: no hook exists on them; this measures it).

Runs A/B alternately so that drift (clocks, thermals, other tenants) hits both sides
alike. The goal on a GPU is under 1% of the step time, and there it is a gate. On a CPU the
test is skipped unless `--mpbench-overhead` asks for it, and then only reported: a shared
2-core VM's step times vary by 20-350% between runs, far more than the effect, and the six
30-step cases took ~3 minutes (176 s, load average 7-9) of `pytest benchmarks/` for a figure that
means nothing. A skip (not a marker deselected by default) keeps the GPU gate on wherever
`pytest benchmarks/` runs on a GPU, and says why it did not run elsewhere.
"""

from __future__ import annotations

import dataclasses
import statistics

import pytest

from suite.hardware import empty_cache, resolve_device
from suite.running.runner import Batches
from suite.training.case import Case
from suite.training.numerics import sampled_steps
from suite.training.train import run_case

ROUNDS = 4  # even: each order (without, with) and (with, without) runs as often
CPU_SKIP = (
    "tracker overhead is gated on a GPU only: on a CPU the noise of a shared machine exceeds the effect; "
    "--mpbench-overhead measures it here anyway (reported, not gated)"
)


def _order(medians: dict[bool, list[float]]) -> tuple[bool, bool]:
    """Which side runs first this round, alternated: a steady drift (a GPU warming against its power cap) would
    otherwise always land on the second, the measured side, and read as overhead."""
    return (False, True) if sum(map(len, medians.values())) % 4 == 0 else (True, False)


def _measure_ab(benchmark, device, measure_both, medians: dict[bool, list[float]], extra: dict) -> tuple[float, float]:
    """Run `measure_both` ROUNDS times; (the True side's median step ms, the False side's), saved with `extra`
    and the overhead of the one over the other in the benchmark's extra_info."""
    try:
        benchmark.pedantic(measure_both, rounds=ROUNDS, iterations=1)
    finally:
        empty_cache(device.torch_device)  # nothing cached of this test's sits beside later cases
    on, off = statistics.median(medians[True]), statistics.median(medians[False])
    benchmark.extra_info |= {"device": device.describe(), **extra, "step_ms_on": on, "step_ms_off": off,
                             "overhead_fraction": on / off - 1, "rounds": ROUNDS}  # fmt: skip
    return on, off


def _case(device: str) -> Case:
    """The device is the one the run resolved once (--mpbench-device), not whatever torch sees."""
    if resolve_device(device).type == "cuda":
        return Case(model="gpt2-small", mode="bf16", device=device, batch_size=8, seq_len=1024, steps=30, warmup=10)
    return Case(model="tiny", mode="fp32", device=device, batch_size=8, seq_len=128, steps=30, warmup=5)


def test_tracker_overhead(benchmark, bench_config, pytestconfig):
    case = _case(bench_config.device)
    device = resolve_device(case.device)
    if device.type != "cuda" and not pytestconfig.getoption("--mpbench-overhead"):
        pytest.skip(CPU_SKIP)
    corpus, train, heldout, _ = Batches().get(case)
    medians: dict[bool, list[float]] = {True: [], False: []}

    def measure_both() -> None:
        for trackers in _order(medians):
            result = run_case(case, device, corpus, train, heldout, trackers=trackers)
            medians[trackers].append(result.timing.median_ms)

    what = {"case": f"{case.model} {case.mode} b{case.batch_size}x{case.seq_len}", "on": "with trackers"}
    on, off = _measure_ab(benchmark, device, measure_both, medians, what)
    overhead = on / off - 1
    print(f"\ntracker overhead on {device.describe()}: {on:.3f} ms vs {off:.3f} ms = {overhead:+.2%}")
    if device.type == "cuda":  # on a CPU the figure is only reported (see the module docstring)
        assert overhead < 0.01, f"trackers cost {overhead:.2%} of a step (goal < 1%)"


NUMERICS_EVERY = 8  # 30 steps: samples 1, 8, 16, 24, 30; the timed window keeps its other steps


def _unsampled(times_ms: list[float], case: Case, every: int) -> dict[int, float]:
    """{step: ms} of the timed window's steps that --numerics-every `every` leaves unsampled (0: all of them).
    Timed steps are in step order, from the first after warm-up, the sampled ones left out."""
    sampled = set(sampled_steps(every, case.steps))
    window = [s for s in range(case.warmup + 1, case.steps + 1) if s not in sampled]
    return dict(zip(window, times_ms, strict=False))  # a GPU's window stops before its profiled steps


def test_numerics_costs_unsampled_steps_nothing(benchmark, bench_config, pytestconfig):
    """The same case with --numerics-every 8 and without, alternated as above; compared on the same steps: the
    unsampled steps of the timed window (the sampled ones are paused out of the window and untimed)."""
    plain = _case(bench_config.device)
    device = resolve_device(plain.device)
    if device.type != "cuda" and not pytestconfig.getoption("--mpbench-overhead"):
        pytest.skip(CPU_SKIP.replace("tracker overhead", "numerics overhead on unsampled steps"))
    sampled = dataclasses.replace(plain, numerics_every=NUMERICS_EVERY)
    corpus, train, heldout, _ = Batches().get(plain)
    medians: dict[bool, list[float]] = {True: [], False: []}

    def measure_both() -> None:
        times = {}
        for on in _order(medians):
            result = run_case(sampled if on else plain, device, corpus, train, heldout)
            assert not on or result.numerics["numerics_steps"] == sampled_steps(NUMERICS_EVERY, plain.steps)
            times[on] = _unsampled(result.timing.times_ms, plain, NUMERICS_EVERY if on else 0)
        steps = sorted(times[True].keys() & times[False].keys())  # the same steps on both sides
        for on in (True, False):
            medians[on].append(statistics.median(times[on][s] for s in steps))

    what = {"case": f"{plain.model} {plain.mode} b{plain.batch_size}x{plain.seq_len}",
            "on": f"--numerics-every {NUMERICS_EVERY}, its unsampled steps"}  # fmt: skip
    on, off = _measure_ab(benchmark, device, measure_both, medians, what)
    overhead = on / off - 1
    print(f"\nnumerics on unsampled steps, {device.describe()}: {on:.3f} ms vs {off:.3f} ms = {overhead:+.2%}")
    if device.type == "cuda":  # on a CPU the figure is only reported (see the module docstring)
        assert abs(overhead) < 0.01, f"unsampled steps differ by {overhead:.2%} with --numerics (goal: within 1%)"
