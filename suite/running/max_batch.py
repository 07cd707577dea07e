"""The largest batch that fits, per mode: doubling, then bisection, each try in its own process.

A try is a short run of the case (3 steps) at one batch size, isolated like every case so
that allocator state never carries over. It fits when it ends `ok` (no out-of-memory) and,
when a limit is given, its peak memory (`peak_mem_mb`: NVML for this process on a GPU, RSS on
a CPU) stays at or under the limit. Sequence length, model and mode stay those of the case.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

from suite.hardware import resolve_device
from suite.running.execute import case_fields
from suite.running.progress import Sink
from suite.running.worker import train_isolated
from suite.training.case import Case

TRY_STEPS = 3


def _try(case: Case, batch: int, timeout_s: float | None, progress: Sink | None = None) -> dict[str, Any]:
    # no --numerics statistics in a trial: they would add their memory to the peak (and a 3-step trial sampled
    # every 2nd step leaves no step to time: the Case refuses it)
    trial = dataclasses.replace(case, batch_size=batch, steps=TRY_STEPS, warmup=1, eval_batches=1, eval_every=0,
                                numerics_every=0)  # fmt: skip
    flops = case_fields(trial, resolve_device(trial.device))["flops_per_step"]
    return train_isolated(trial, flops, f"max-batch {case.mode} b{batch}", timeout_s, progress)


def find_max_batch(
    case: Case,
    memory_limit_mb: float | None = None,
    cap: int = 4096,
    timeout_s: float | None = None,
    attempt: Callable[[Case, int, float | None], dict[str, Any]] | None = None,
    progress: Sink | None = None,
) -> dict[str, Any]:
    """Record fields: `max_batch` (None if even 1 does not fit), the limit, and every try.

    The limit is compared with `peak_mem_mb` only (this process: NVML on a GPU, RSS on a CPU),
    never with a device-wide figure; a try whose process peak is unknown ends the search, with
    `max_batch_reason` saying why, rather than judging it on another figure; so does a try that timed
    out (too slow to tell is not too big). Its entry in `max_batch_tries` has fits None: unknown.
    Each try is `attempt` (default: a short isolated run whose progress events go to `progress`).
    """
    tries: list[list[Any]] = []
    unknown: list[str] = []  # why a try could not say whether its batch fits: the search stops there
    attempt = attempt or functools.partial(_try, progress=progress)

    def fits(batch: int) -> bool:
        values = attempt(case, batch, timeout_s)
        status, peak = values.get("status"), values.get("peak_mem_mb")
        if status == "timeout":  # too slow to tell, which says nothing of its size
            unknown.append(f"batch {batch} timed out ({values.get('reason')}): whether it fits is unknown; "
                           "raise --case-timeout")  # fmt: skip
        elif status == "ok" and memory_limit_mb is not None and peak is None:
            unknown.append(f"--memory-limit-mb cannot be checked: batch {batch}: peak_mem_mb unknown "
                           f"({values.get('peak_mem_reason') or 'no reason'})")  # fmt: skip
        ok = status == "ok" and not unknown and (memory_limit_mb is None or peak <= memory_limit_mb)
        tries.append([batch, status, peak, None if unknown else ok])
        return ok

    last_ok, first_bad, batch = None, None, 1
    while batch <= cap:  # doubling
        if not fits(batch):
            first_bad = batch
            break
        last_ok, batch = batch, batch * 2
    if last_ok is not None and first_bad is not None:
        lo, hi = last_ok, first_bad
        while hi - lo > 1 and not unknown:  # bisection between the last fit and the first failure
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        last_ok = lo
    if unknown:  # no figure rather than one judged on something else
        return {"max_batch": None, "max_batch_limit_mb": memory_limit_mb, "max_batch_tries": tries,
                "max_batch_reason": unknown[0]}  # fmt: skip
    return {"max_batch": last_ok, "max_batch_limit_mb": memory_limit_mb, "max_batch_tries": tries}


def check_searchable(cases: Sequence[Case]) -> None:
    """ValueError for a data-parallel case: each try runs in one process, so its `max_batch` would
    describe another setup than the case's N processes."""
    for case in cases:
        if case.data_parallel:
            raise ValueError(
                f"find_max_batch with nproc={case.nproc} ({case.data_parallel}): the search tries each batch in one "
                "process; drop --find-max-batch, or --nproc/--scaling/--parallel"
            )
