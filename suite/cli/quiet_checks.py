"""The quiet-machine checks of `mpbench doctor`: is this machine idle enough for its timings to mean anything?

- `cpu_load`: the 1-minute load average per CPU. Past `LOAD_PER_CPU` other work competes for the
  cores: for torch's threads on a CPU run, for the launching thread on a GPU run.
- `repeatability`: the same small matmul timed `REPEATS` times with the clock the step timer uses on
  that device (perf_counter on a CPU, CUDA events on a GPU); its p10-p90 spread as a fraction of the
  median, against `NOISY_SPREAD` (suite/records/noise.py), past which `mpbench compare` calls a step-time "same"
  inconclusive. About 0.4 s in all on the 2-core CPU VM (20 samples of ~10 ms, plus sizing).
- Other processes on the GPU are `no_other_process` in suite/cli/gpu_checks.py (NVML).

Each is pass or warn, with its figure, the reason and what to do. A warn does not fail the doctor:
the machine works, it is busy now, and the runs' own spreads will show it (compare says inconclusive).
`Host` is where they read the machine, so tests can make a busy one and a quiet one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from suite.cli.gpu_checks import CANNOT, PASS, WARN, Check
from suite.metrics import probes
from suite.metrics.timing import TimingStats
from suite.records.noise import NOISY_SPREAD

# Runnable work per CPU (1-minute average) past which a benchmark shares its cores. An idle machine reads
# near 0; half the CPUs busy already takes cores from a CPU run, which starts one torch thread per core.
LOAD_PER_CPU = 0.5
REPEATS = 20  # the p10 and p90 of 20 samples are the 2nd and 18th: one outlier does not move them
SAMPLE_S = 0.01  # one sample takes about 10 ms: far above the clock's resolution, 20 of them ~0.2 s
CPU_N, GPU_N = 256, 4096  # matmul sizes: ~0.1-1 ms on a CPU core, ~0.2 ms in bf16 on an H100


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else the CPU count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Host:
    """Where the quiet checks read this machine: the real one by default, a busy or quiet fake in tests."""

    loadavg: Callable[[], tuple[float, float, float]] | None = getattr(os, "getloadavg", None)  # None: Windows
    cpus: Callable[[], int | None] = os.cpu_count  # the system's CPUs: the load average counts all of them
    usable: Callable[[], int] = usable_cores
    timer: Callable[[], float] = time.perf_counter  # seconds; the CPU step timer's clock


def cpu_load(host: Host) -> Check:
    """The 1-minute load average per CPU: pass when under LOAD_PER_CPU, else warn."""
    if host.loadavg is None:
        return Check("cpu_load", CANNOT, "this system has no load average (os.getloadavg)")
    try:
        load = host.loadavg()[0]
    except OSError as exc:
        return Check("cpu_load", CANNOT, f"load average unreadable: {exc}")
    cpus, usable = host.cpus() or 1, host.usable()
    per_cpu = load / cpus
    figures = {"load_1min": load, "cpus": cpus, "usable_cores": usable, "per_cpu": per_cpu, "bound": LOAD_PER_CPU}
    text = f"1-minute load average {load:.2f} on {cpus} CPU(s): {per_cpu:.2f} per CPU ({usable} usable here)"
    if usable < cpus:  # a cpuset or taskset slice: the load average cannot tell whether its own cores are busy
        text += "; host-wide, so a busy slice of this host can read quiet (the repeatability check times it)"
    if per_cpu > LOAD_PER_CPU:
        why = (f"{text}, past {LOAD_PER_CPU:g}: other work competes for the cores, so step times will be noisy; "
               "stop it or wait (see top), then run mpbench doctor again")  # fmt: skip
        return Check("cpu_load", WARN, why, figures)
    return Check("cpu_load", PASS, f"{text}, under {LOAD_PER_CPU:g}: quiet", figures)


def cpu_sampler(timer: Callable[[], float], n: int = CPU_N) -> Callable[[], float]:
    """One sample: a run of (n x n) fp32 matmuls on the CPU timed by `timer`, in ms per matmul; the
    run's length comes from warm timings, so that a sample takes about SAMPLE_S on any CPU."""
    gen = torch.Generator().manual_seed(0)
    a, b, out = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen), torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up: the first call starts the thread pool and touches the pages
    slowest = 0.0
    for _ in range(3):  # sized from the slowest of 3: one lucky fast call must not make 20 samples take seconds
        t0 = timer()
        torch.mm(a, b, out=out)
        slowest = max(slowest, timer() - t0)
    inner = min(max(1, math.ceil(SAMPLE_S / slowest)), 1000) if slowest > 0 else 1

    def sample() -> float:
        t0 = timer()
        for _ in range(inner):
            torch.mm(a, b, out=out)  # out=: no allocation in the timed run
        return (timer() - t0) * 1e3 / inner

    return sample


def gpu_sampler(cuda: Any, n: int = GPU_N) -> Callable[[], float]:
    """One sample: a loop of (n x n) bf16 matmuls through the CUDA boundary, timed by CUDA events as the
    step timer is, in ms per matmul; the loop is sized to about SAMPLE_S of GPU time."""
    iters = probes.iters_for(cuda, "bf16", SAMPLE_S, n)
    return lambda: cuda.matmul_loop("bf16", n, iters).event_ms / iters


def repeatability(sample: Callable[[], float], what: str, repeats: int = REPEATS) -> Check:
    """The same work timed `repeats` times: its p10-p90 spread as a fraction of the median, against
    NOISY_SPREAD (pass under it, warn past it)."""
    t = TimingStats.from_times([sample() for _ in range(repeats)])  # the step timer's median and percentiles
    if not t.median_ms > 0:
        return Check("repeatability", CANNOT, f"{what}: the clock did not advance (median {t.median_ms} ms)")
    spread = (t.p90_ms - t.p10_ms) / t.median_ms
    figures = {"what": what, "samples": repeats, "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
               "spread": spread, "bound": NOISY_SPREAD}  # fmt: skip
    text = (f"{what} timed {repeats}x: median {t.median_ms:.3g} ms, p10-p90 {t.p10_ms:.3g}-{t.p90_ms:.3g} ms, "
            f"spread {spread:.0%} of the median")  # fmt: skip
    if spread > NOISY_SPREAD:
        return Check("repeatability", WARN, f"{text}, past {NOISY_SPREAD:.0%}: mpbench compare would call a step-time "
                     "'same' inconclusive; find what else runs (cpu_load, no_other_process, top, nvidia-smi), "
                     "stop it, and run mpbench doctor again", figures)  # fmt: skip
    return Check("repeatability", PASS, f"{text}, under {NOISY_SPREAD:.0%}: repeatable", figures)
