"""The largest batch that fits, per mode: doubling, then bisection, each try in its own process.

A try is a short run of the case (3 steps) at one batch size, isolated like every case so
that allocator state never carries over. It fits when it ends `ok` (no out-of-memory) and,
when a limit is given, its peak memory (`peak_mem_mb`: NVML for this process on a GPU, RSS on
a CPU) stays at or under the limit. Sequence length, model and mode stay those of the case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from suite.hardware import resolve_device
from suite.running.execute import case_fields
from suite.running.worker import train_isolated
from suite.training.case import Case

TRY_STEPS = 3


def _try(case: Case, batch: int, timeout_s: float | None) -> dict[str, Any]:
    trial = dataclasses.replace(case, batch_size=batch, steps=TRY_STEPS, warmup=1, eval_batches=1, eval_every=0)
    flops = case_fields(trial, resolve_device(trial.device))["flops_per_step"]
    return train_isolated(trial, flops, f"max-batch {case.mode} b{batch}", timeout_s)


def find_max_batch(
    case: Case,
    memory_limit_mb: float | None = None,
    cap: int = 4096,
    timeout_s: float | None = None,
    attempt: Callable[[Case, int, float | None], dict[str, Any]] = _try,
) -> dict[str, Any]:
    """Record fields: `max_batch` (None if even 1 does not fit), the limit, and every try.

    The limit is compared with `peak_mem_mb` only (this process: NVML on a GPU, RSS on a CPU),
    never with a device-wide figure; a try whose process peak is unknown ends the search, with
    `max_batch_reason` saying why, rather than judging it on another figure.
    """
    tries: list[list[Any]] = []
    unknown: list[str] = []

    def fits(batch: int) -> bool:
        values = attempt(case, batch, timeout_s)
        peak = values.get("peak_mem_mb")
        ran = values.get("status") == "ok"
        if ran and memory_limit_mb is not None and peak is None:
            unknown.append(f"batch {batch}: peak_mem_mb unknown ({values.get('peak_mem_reason') or 'no reason'})")
        ok = ran and not unknown and (memory_limit_mb is None or peak <= memory_limit_mb)
        tries.append([batch, values.get("status"), peak, ok])
        return ok

    last_ok, first_bad, batch = None, None, 1
    while batch <= cap:  # doubling
        if not fits(batch):
            first_bad = batch
            break
        last_ok, batch = batch, batch * 2
    if last_ok is not None and first_bad is not None:
        lo, hi = last_ok, first_bad
        while hi - lo > 1:  # bisection between the last fit and the first failure
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        last_ok = lo
    if unknown:  # the limit cannot be judged: no figure rather than one judged on something else
        return {"max_batch": None, "max_batch_limit_mb": memory_limit_mb, "max_batch_tries": tries,
                "max_batch_reason": f"--memory-limit-mb cannot be checked: {unknown[0]}"}  # fmt: skip
    return {"max_batch": last_ok, "max_batch_limit_mb": memory_limit_mb, "max_batch_tries": tries}
