"""Every registered mode x {one process, 2-rank DDP, 2-rank FSDP2} x {eager, --compile} trains a few
steps on the CPU, or is refused with its reason before anything trains; none ends `error`.

The matrix is read from the registry, so a new mode is covered the day it is added. Each compile
setting runs all modes in one go to share the expensive parts: one process for the single-process
column, and one torchrun job of two ranks for both distributed columns (`--parallel ddp,fsdp`, the
user-launched path, every case in the same ranks), which also keeps torch.compile's caches warm
across modes and strategies. Each job is an xdist group: it runs once, in one worker.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from suite.hardware import resolve_device
from suite.modes import MODES
from suite.modes.base import decide
from suite.records import store
from suite.running.runner import run_cases
from suite.training.case import Case

SIZES = dict(model="tiny", device="cpu", batch_size=2, seq_len=32, steps=3, warmup=2)
ROOT = Path(__file__).parent.parent


def refusal(mode: str, parallel: str) -> str | None:
    """Why this combination is skipped before training on this CPU (the mode's own reason), or None."""
    cls = MODES[mode]
    reason, _ = decide(cls, resolve_device("cpu"), emulate=False)
    if reason or parallel == "single":
        return reason
    return cls.fsdp_plan("fp32").unavailable if parallel == "fsdp" else cls.no_data_parallel


def _job(parallel: str, compile_: bool, tmp: Path) -> tuple[dict[tuple[str, str], dict], str]:
    """The records of one job by (mode, parallelism), and what went wrong if anything did: the
    single-process column in this process, or both distributed columns in one torchrun job."""
    if parallel == "single":
        cases = [Case(mode=m, compile=compile_, **SIZES) for m in MODES]
        return {(r["mode"], "single"): r for r in run_cases(cases, log=None, isolate=False)}, ""
    out = tmp / f"distributed-{compile_}.jsonl"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()] + (["--compile"] if compile_ else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "suite.cli",
           "run", "--modes", "all", "--parallel", "ddp,fsdp", "--out", str(out), "--quiet", *flags]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    records = {(r["mode"], r["parallel"]): r for r in store.read(out)} if out.exists() else {}
    return records, f"the torchrun job ended with exit code {done.returncode}: {done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """column(parallel, compile) -> (records by mode, the job's failure); each job runs once, when a
    test first needs it (DDP's and FSDP's columns come from the same job)."""
    tmp, jobs = tmp_path_factory.mktemp("combinations"), {}

    def column(parallel: str, compile_: bool) -> tuple[dict[str, dict], str]:
        job = ("single" if parallel == "single" else "distributed", compile_)
        if job not in jobs:
            jobs[job] = _job(job[0], compile_, tmp)
        records, failure = jobs[job]
        return {mode: r for (mode, p), r in records.items() if p == parallel}, failure

    return column


def _columns() -> list:
    """(parallel, compile) in the order their jobs are slowest first (xdist starts them first); each
    job one xdist group, so one worker runs it once."""
    return [
        pytest.param(parallel, compile_, id=f"{parallel}-{'compile' if compile_ else 'eager'}",
                     marks=pytest.mark.xdist_group(f"combinations-{job}-{'compile' if compile_ else 'eager'}"))
        for compile_ in (True, False)
        for job, parallels in (("distributed", ("ddp", "fsdp")), ("single", ("single",)))
        for parallel in parallels
    ]  # fmt: skip


@pytest.mark.parametrize("parallel, compile_", _columns())
@pytest.mark.parametrize("mode", list(MODES))
def test_every_combination_trains_or_is_refused_with_its_reason(matrix, mode, parallel, compile_):
    records, failure = matrix(parallel, compile_)
    if mode not in records:  # a case that raised ends a user-launched torchrun job: this one or an earlier one
        pytest.fail(f"no record of {mode} {parallel} compile={compile_}; {failure}")
    r = records[mode]
    why = refusal(mode, parallel)
    if why:
        assert r["status"] == "skipped" and r["reason"] == why, r["reason"]
        return
    assert r["status"] == "ok", f"{mode} {parallel} compile={compile_}: {r['status']}: {r['reason']}"
    assert r["compile"] is compile_ and r["world_size"] == (1 if parallel == "single" else 2)
    assert r["parallel"] == (None if parallel == "single" else parallel)
    # trained every step to a finite loss (learning is tested elsewhere: pure-fp16 barely moves in 3 steps)
    assert len(r["loss_curve"]) == SIZES["steps"] and all(map(math.isfinite, [*r["loss_curve"], r["final_loss"]]))
