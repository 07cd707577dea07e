"""Single train steps for pytest-benchmark's rounds, and their comparison with fp32.

The case's record comes from `run_cases` (a worker per case, every tracker, as `mpbench run`);
pytest-benchmark's table is built from rounds of one train step each, so that its min, max and
standard deviation describe steps, not one whole case. The model, mode and optimizer are
prepared here as `suite.training.train.run_case` prepares them, and each round calls the same
`train_step`, then waits for the device, because pytest-benchmark's clock knows nothing of GPUs.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from models import GPT
from suite.hardware import empty_cache, on_device, resolve_device, synchronize
from suite.modes import get_mode
from suite.modes.base import decide
from suite.running.execute import Batches
from suite.training.case import Case
from suite.training.train import train_step

REFERENCE = "fp32"  # every speed-up is against it; pytest-benchmark's own table compares with the fastest row


def emulated_reason(mode: str, device: str, emulate: bool) -> str | None:
    """Why `mode` runs on emulated kernels on `device` (its step time is then not a speed); None when native."""
    return decide(get_mode(mode), resolve_device(device), emulate)[1]


def case_id(mode: str, device: str, emulate: bool) -> str:
    """The mode's test id: `-emulated` marks a mode whose step time is not a speed here."""
    try:
        emulated = emulated_reason(mode, device, emulate) is not None
    except ValueError:  # an unknown mode: its test reports the error, the id stays plain
        emulated = False
    return f"{mode}-emulated" if emulated else mode


@contextlib.contextmanager
def prepared_steps(case: Case) -> Iterator[tuple[Callable[[torch.Tensor], None], Callable[[], Any]]]:
    """(step, next_batch) for pytest-benchmark's `pedantic(step, setup=next_batch)`; frees the
    model, the optimizer and the allocator's cache after, so later cases start as they would alone."""
    device = resolve_device(case.device)
    dev = device.torch_device
    mode = get_mode(case.mode)(device)
    _, train, _, _ = Batches().get(case)  # (steps, B, T+1): the case's own batches, in order
    model = GPT(case.model_config, seed=case.seed)
    torch.manual_seed(case.seed)  # as run_case: int8-weight's stochastic rounding draws from it
    gc.collect()  # a failed round before (its traceback held until now) may still hold device memory
    empty_cache(dev)
    held: dict[str, Any] = {}  # the model and its optimizer, dropped at the end so their memory can go
    with on_device(dev), mode.numerics():
        held["model"] = model = mode.prepare(model.to(dev))
        held["optimizer"] = mode.make_optimizer(model, case.learning_rate, case.weight_decay)
        held["fn"] = torch.compile(model) if case.compile else model
        del model
        taken = 0

        def next_batch() -> tuple[tuple[torch.Tensor], dict]:
            nonlocal taken
            batch = train[taken % len(train)].to(dev, non_blocking=True)  # outside the timed round
            taken += 1
            synchronize(dev)  # the copy is done before the clock starts
            return (batch,), {}

        def step(batch: torch.Tensor) -> None:
            train_step(held["fn"], mode, held["optimizer"], batch)
            synchronize(dev)  # the round ends when the device is done

        try:
            yield step, next_batch
        finally:
            held.clear()
            gc.collect()
            empty_cache(dev)


@dataclass(frozen=True)
class RoundStats:
    """One case's rounds, in ms."""

    median: float
    min: float
    max: float
    stddev: float
    rounds: int
    emulated: str | None  # the reason, when the step time is not a speed


def round_stats(benchmark: Any, emulated: str | None) -> RoundStats | None:
    """The rounds pytest-benchmark just timed; None when benchmarking is off (`--benchmark-disable`)."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None or not stats.data:
        return None
    ms = [t * 1e3 for t in stats.data]
    return RoundStats(statistics.median(ms), min(ms), max(ms), statistics.stdev(ms) if len(ms) > 1 else 0.0,
                      len(ms), emulated)  # fmt: skip


def speedup_vs_fp32(this: RoundStats | None, fp32: RoundStats | None) -> tuple[float | None, str | None]:
    """(fp32's median round / this one's, or None with the reason): above 1 is faster than fp32."""
    if this is None:
        return None, "no rounds were timed (--benchmark-disable)"
    if this.emulated:
        return None, f"emulated kernels ({this.emulated.split(':')[0]}): the step time is not a speed"
    if fp32 is None:
        return None, f"{REFERENCE} was not timed in this session; add it to --mpbench-modes"
    return fp32.median / this.median, None


def summary_lines(rounds: dict[tuple[str, str], RoundStats]) -> list[str]:
    """The train-step table with fp32 as each model's reference row, for the terminal summary."""
    lines = [f"{'case':<34}{'median ms':>11}{'min':>9}{'max':>9}{'stddev':>9}{'rounds':>8}  vs fp32"]
    models = dict.fromkeys(model for model, _ in rounds)
    for model in models:
        fp32 = rounds.get((model, REFERENCE))
        modes = [m for mm, m in rounds if mm == model]
        ordered = sorted(modes, key=lambda m: (m != REFERENCE, rounds[model, m].median))  # fp32 first
        for mode in ordered:
            r = rounds[model, mode]
            ratio, why = speedup_vs_fp32(r, fp32)
            label = f"{model}/{mode}" + (" (reference)" if mode == REFERENCE else " [emulated]" if r.emulated else "")
            short = "emulated" if r.emulated else f"no {REFERENCE} rounds" if fp32 is None else str(why)
            verdict = f"{ratio:.2f}x" if ratio is not None else f"n/a ({short})"
            figures = f"{r.median:>11.2f}{r.min:>9.2f}{r.max:>9.2f}{r.stddev:>9.2f}{r.rounds:>8}"
            lines.append(f"{label:<34}{figures}  {verdict}")
    return lines
