"""Bad input is refused before anything runs (one line, exit 2), from flags and config files alike;
what can only fail while a case runs becomes that case's record (issue 21: items 10, 12-14, 16-18, 23)."""

from __future__ import annotations

import math

import pytest
import torch

from suite import run_cases
from suite.cli.main import main
from suite.modes import MODES
from suite.modes.base import PrecisionMode
from suite.running.execute import train_in_process
from suite.running.max_batch import find_max_batch
from suite.running.progress import ignore
from tests.helpers import error_line, small_case

HUGE = 10**12


@pytest.mark.parametrize(
    "args, match",
    [
        (["--steps", str(HUGE)], f"steps={HUGE}, batch_size=2: the token batches built before training take"),
        (["--batch-size", str(HUGE)], f"batch_size={HUGE}: the token batches"),
        (["--seed", str(10**20)], f"seed={10**20}: must be in 0..4294967295"),
        (["--seed", str(2**63 - 1)], f"seed={2**63 - 1}: must be in 0..4294967295"),
        (["--modes", ""], "modes: empty; give a comma-separated list"),
        (["--modes", "fp32,fp32"], "modes: 'fp32' is given twice"),
        (["--model", ""], "models: empty"),
        (["--lr", "inf"], "lr=inf: must be a positive finite number"),
        (["--lr", "nan"], "lr=nan: must be a positive finite number"),
        (["--weight-decay", "inf"], "weight_decay=inf: must be zero or a positive finite number"),
        (["--case-timeout", "-5"], "case_timeout=-5.0: must be a positive number of seconds"),
        (["--case-timeout", "0"], "case_timeout=0.0: must be a positive number"),
        (["--case-timeout", "nan"], "case_timeout=nan: must be a positive number"),
        (["--find-max-batch", "--nproc", "2"], "find_max_batch with nproc=2 (ddp): the search tries each batch in one"),
        (["--nproc", "2", "--scaling", "1,2"], "nproc and scaling: give one"),
        (["--scaling", "1,x"], "scaling='1,x': expected process counts"),
        (["--memory-limit-mb", "100"], "memory_limit_mb=100.0: needs --find-max-batch"),
        (["--steps", "1e12"], "argument --steps: '1e12' is not an integer; see mpbench run --help"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'; see mpbench run --help"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(args, match, capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    argv = ["run", "--device", "cpu", "--modes", "fp32", "--batch-size", "2", "--seq-len", "32", "--steps", "3"]
    assert _exit_code([*argv, *args, "--out", str(out)]) == 2
    line = error_line(capsys)
    assert match in line and line.startswith("mpbench run: error: "), line
    assert not out.exists()


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # argparse's own errors
        return done.code


def test_usage_errors_of_every_command_are_one_line(capsys):
    assert _exit_code(["compare", "a.jsonl"]) == 2
    assert error_line(capsys) == (
        "mpbench compare: error: the following arguments are required: b; see mpbench compare --help"
    )


def test_a_data_file_gone_after_validation_is_an_error_record(tmp_path):
    """Batches are built inside the case's guard: a file deleted mid-run ends that case with its message."""
    values = train_in_process(small_case(data=str(tmp_path / "gone.txt")), 0, "case", ignore)
    assert values["status"] == "error" and "ValueError: data=" in values["reason"], values
    assert "gone.txt" in values["reason"] and "no such file" in values["reason"]


class HostOutOfMemory(PrecisionMode):
    name = "test-host-oom"

    def prepare(self, model):
        torch.empty(1 << 60, dtype=torch.uint8)  # torch's own CPU allocator failure, a RuntimeError


def test_host_out_of_memory_is_status_oom(monkeypatch):
    monkeypatch.setitem(MODES, HostOutOfMemory.name, HostOutOfMemory)
    r = run_cases([small_case(mode=HostOutOfMemory.name)], log=None, isolate=False)[0]
    assert r["status"] == "oom", r["reason"]
    assert "out of memory at batch 2 x 32" in r["reason"] and "DefaultCPUAllocator" in r["reason"]


def test_a_try_that_timed_out_is_not_a_batch_that_does_not_fit():
    def attempt(case, batch, timeout_s):  # fits up to 8; 4 is slow enough to time out
        if batch == 4:
            return {"status": "timeout", "reason": "case exceeded --case-timeout 5 s; worker stopped"}
        return {"status": "ok" if batch <= 8 else "oom", "peak_mem_mb": 10.0 * batch}

    found = find_max_batch(small_case(), timeout_s=5, attempt=attempt)
    assert found["max_batch"] is None and found["max_batch_tries"][-1] == [4, "timeout", None, None]
    assert "batch 4 timed out" in found["max_batch_reason"] and "raise --case-timeout" in found["max_batch_reason"]


def test_the_diverged_step_is_numbered_as_the_progress_lines_are(monkeypatch):
    """NaN losses from the third step: the progress shows steps 1 and 2 finite, the record says step 3."""
    import suite.training.train as train

    real_step, calls = train.train_step, [0]

    def nan_from_the_third(*args, **kwargs):
        loss, stepped = real_step(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] >= 3 else loss), stepped

    monkeypatch.setattr(train, "train_step", nan_from_the_third)
    lines: list[str] = []
    r = run_cases([small_case(mode="fp32", steps=4)], log=lines.append, isolate=False)[0]
    shown = [int(line.split("step ")[1].split("/")[0]) for line in lines if ": step " in line]
    assert shown == [1, 2] and r["diverged_at_step"] == 3 and "NaN/inf at step 3" in r["reason"]
    assert math.isfinite(r["loss_curve"][shown[-1] - 1]) and math.isnan(r["loss_curve"][r["diverged_at_step"] - 1])
