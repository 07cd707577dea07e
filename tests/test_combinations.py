"""Every registered mode x {one process, 2-rank DDP, 2-rank FSDP2} x {eager, --compile} trains a few
steps on the CPU, or is refused with its reason before anything trains; none ends `error`.

The matrix is read from the registry, so a new mode is covered the day it is added. Each
(parallelism, compile) column runs all modes in one go to share the expensive parts: one process
for the single-process column, one torchrun job of two ranks (the user-launched path, every case in
the same ranks) for each distributed column, which also keeps torch.compile's caches warm across
modes.
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
PARALLEL = ("single", "ddp", "fsdp")
ROOT = Path(__file__).parent.parent


def refusal(mode: str, parallel: str) -> str | None:
    """Why this combination is skipped before training on this CPU (the mode's own reason), or None."""
    cls = MODES[mode]
    reason, _ = decide(cls, resolve_device("cpu"), emulate=False)
    if reason or parallel == "single":
        return reason
    return cls.fsdp_plan("fp32").unavailable if parallel == "fsdp" else cls.no_data_parallel


def _column(parallel: str, compile_: bool, tmp: Path) -> tuple[dict[str, dict], str]:
    """Every mode's record for one (parallelism, compile) column, by mode, and what went wrong if any did."""
    if parallel == "single":
        cases = [Case(mode=m, compile=compile_, **SIZES) for m in MODES]
        return {r["mode"]: r for r in run_cases(cases, log=None, isolate=False)}, ""
    out = tmp / f"{parallel}-{compile_}.jsonl"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()] + (["--compile"] if compile_ else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "suite.cli",
           "run", "--modes", "all", "--parallel", parallel, "--out", str(out), "--quiet", *flags]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    records = {r["mode"]: r for r in store.read(out)} if out.exists() else {}
    return records, f"the torchrun job ended with exit code {done.returncode}: {done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """column(parallel, compile) -> (records by mode, the job's failure); each column runs once, when a
    test first needs it."""
    tmp, columns = tmp_path_factory.mktemp("combinations"), {}

    def column(parallel: str, compile_: bool) -> tuple[dict[str, dict], str]:
        if (parallel, compile_) not in columns:
            columns[parallel, compile_] = _column(parallel, compile_, tmp)
        return columns[parallel, compile_]

    return column


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("parallel", PARALLEL)
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
