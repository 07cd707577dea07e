"""Fault injection for tests: make one case fail in a chosen way, inside its worker process.

MPBENCH_FAULT="KIND:MODE" (or "KIND:MODEL/MODE", and "@RANK" after either to strike only
that rank of a data-parallel case) picks the case; KIND is one of
  raise  an exception in the worker (-> status error)
  oom    torch.OutOfMemoryError (-> status oom)
  nan    the training loss turns NaN from step 3 on (-> status diverged at step 3)
  hang   the worker sleeps forever (-> status timeout, with --case-timeout)
  crash  the worker process dies at once, no cleanup (-> status error, "worker died")
`mpbench run` refuses a malformed one before running anything; only the case's worker (or
rank) acts on it; nothing in the train loop knows about faults.
"""

from __future__ import annotations

import os
import time

from models import GPTConfig
from suite.modes import MODES
from suite.training.case import Case

ENV = "MPBENCH_FAULT"
KINDS = ("raise", "oom", "nan", "hang", "crash")


def parse_spec() -> tuple[str, str, str, int | None] | None:
    """MPBENCH_FAULT as (kind, model or "", mode, rank or None), None when unset; ValueError naming the
    accepted forms when malformed (`mpbench run` refuses it before running anything)."""
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    kind, sep, target = spec.partition(":")
    target, at, on_rank = target.partition("@")
    model, _, mode = target.rpartition("/")
    known = mode in MODES and (not model or model in GPTConfig.presets())
    if not sep or kind not in KINDS or not known or (at and not on_rank.isdigit()):
        raise ValueError(
            f"{ENV}={spec!r}: expected KIND:MODE or KIND:MODEL/MODE, optionally @RANK, with KIND one of "
            f"{', '.join(KINDS)} and a known mode (e.g. nan:bf16); unset it to inject nothing"
        )
    return kind, model, mode, int(on_rank) if at else None


def fault_for(case: Case, rank: int | None = None) -> str | None:
    """The fault kind injected into `case` (on `rank`), or None; ValueError for a malformed variable."""
    parsed = parse_spec()
    if parsed is None:
        return None
    kind, model, mode, on_rank = parsed
    if on_rank is not None and on_rank != (rank or 0):
        return None
    return kind if mode == case.mode and (not model or model == case.model) else None


def inject_before_training(kind: str) -> None:
    """Faults that strike before the first step."""
    import torch

    if kind == "raise":
        raise RuntimeError("injected fault: raise")
    if kind == "oom":
        raise torch.OutOfMemoryError("injected fault: CUDA out of memory. Tried to allocate 80.00 GiB")
    if kind == "hang":
        while True:  # the parent's --case-timeout ends this
            time.sleep(3600)
    if kind == "crash":
        os._exit(86)  # no exception, no cleanup, no result: like a segfault or the OOM killer


def poison_losses(kind: str) -> None:
    """For 'nan': wrap this process's train step so that losses from step 3 on (counting from 1, as the
    progress lines and `diverged_at_step` do) are NaN."""
    if kind != "nan":
        return
    import suite.training.train as train

    real_step = train.train_step
    calls = [0]

    def nan_after_two(*args, **kwargs):
        loss, stepped = real_step(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] > 2 else loss), stepped

    train.train_step = nan_after_two
