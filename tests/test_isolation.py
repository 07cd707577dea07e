"""The runner survives: each case in its own process, faults injected for real, nothing lost."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suite import run_cases
from suite.cli.main import main
from suite.records import store
from suite.running.lifeline import is_running, marked
from tests.helpers import small_case

REPO = Path(__file__).resolve().parent.parent
MODES = ["fp32", "bf16", "int8-weight"]  # fast on a CPU; the fault goes into bf16


@pytest.mark.parametrize(
    "fault, status, reason",
    [
        ("raise", "error", "RuntimeError: injected fault: raise"),
        ("oom", "oom", "out of memory at batch 2 x 32"),
        ("nan", "diverged", "loss became NaN/inf at step 3"),
        ("hang", "timeout", "exceeded --case-timeout"),
        ("crash", "error", "worker process exited with code 86"),
    ],
)
def test_a_fault_in_one_case_leaves_the_others_intact(tmp_path, monkeypatch, fault, status, reason):
    monkeypatch.setenv("MPBENCH_FAULT", f"{fault}:bf16")
    out = tmp_path / "r.jsonl"
    # the limit applies to every case: long enough for fp32 and int8-weight on a loaded 2-core machine
    # (6 s timed them out at load 8), short enough that the hang costs little; the other faults need none
    timeout = 20 if fault == "hang" else 120
    records = run_cases([small_case(mode=m) for m in MODES], out=out, log=None, case_timeout=timeout)
    on_disk = store.read(out)
    assert [(r["mode"], r["status"], r["final_loss"]) for r in on_disk] == [
        (r["mode"], r["status"], r["final_loss"]) for r in records
    ]
    assert [r["mode"] for r in on_disk] == MODES
    by_mode = {r["mode"]: r for r in on_disk}
    assert by_mode["bf16"]["status"] == status and reason in by_mode["bf16"]["reason"], by_mode["bf16"]["reason"]
    for mode in ("fp32", "int8-weight"):
        assert by_mode[mode]["status"] == "ok" and by_mode[mode]["final_loss"] > 0
    if fault == "nan":
        assert by_mode["bf16"]["diverged_at_step"] == 3 and len(by_mode["bf16"]["loss_curve"]) >= 3


@pytest.mark.parametrize("spec", ["explode:bf16", "raise", "raise:bf61", "raise:tiny/", "nan:bf16@one"])
def test_malformed_fault_variable_is_refused_before_running(tmp_path, monkeypatch, spec):
    monkeypatch.setenv("MPBENCH_FAULT", spec)
    out = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match=f"MPBENCH_FAULT={spec!r}: expected KIND:MODE or KIND:MODEL/MODE"):
        run_cases([small_case(mode="bf16")], out=out, log=None)
    assert not out.exists()  # refused before anything was written


def test_fail_fast_stops_after_the_first_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("MPBENCH_FAULT", "raise:fp32")
    records = run_cases([small_case(mode=m) for m in MODES], log=None, fail_fast=True)
    assert [(r["mode"], r["status"]) for r in records] == [("fp32", "error")]


def test_resume_runs_only_what_has_no_record(tmp_path):
    out = tmp_path / "r.jsonl"
    first = run_cases([small_case(mode="fp32")], out=out, log=None, isolate=False)
    again = run_cases([small_case(mode=m) for m in MODES], out=out, log=None, isolate=False, resume=True)
    assert [r["mode"] for r in again] == ["bf16", "int8-weight"]
    assert [r["mode"] for r in store.read(out)] == MODES
    # the fp32 reference from the first run still gives the resumed modes their delta
    assert again[0]["loss_delta_vs_fp32"] == pytest.approx(again[0]["final_loss"] - first[0]["final_loss"])
    assert run_cases([small_case(mode=m) for m in MODES], out=out, log=None, isolate=False, resume=True) == []


def _appender(path: str, tag: int, n: int) -> None:
    curve = [float(i) for i in range(2000)]  # ~20 kB lines: bigger than a pipe buffer, far from atomic by luck
    for i in range(n):
        store.append(path, store.make_record(status="ok", model="tiny", mode=f"w{tag}", seed=i, loss_curve=curve))


def test_two_concurrent_writers_never_interleave_within_a_line(tmp_path):
    out = str(tmp_path / "r.jsonl")
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_appender, args=(out, tag, 40)) for tag in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    records = store.read(out)  # raises on any broken line
    assert sorted((r["mode"], r["seed"]) for r in records) == sorted((f"w{t}", i) for t in (1, 2) for i in range(40))


def _wait_for_lines(path: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} never reached {n} line(s)")


def test_interrupted_runs_keep_their_records_and_resume_completes_them(tmp_path):
    """SIGINT stops the run at its second case, SIGTERM the resumed run at its third; each keeps
    what finished, and a last --resume completes the matrix (one run per signal, in sequence)."""
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "suite.cli", "run", "--device", "cpu", "--model", "tiny", "--modes",
           "fp32,bf16,int8-weight", "--batch-size", "2", "--seq-len", "32", "--steps", "4",
           "--out", str(out)]  # fmt: skip
    resume = [*cmd[:-2], "--resume", str(out)]
    for args, hangs, sig, code, kept in [
        (cmd, "bf16", signal.SIGINT, 130, ["fp32"]),
        (resume, "int8-weight", signal.SIGTERM, 143, ["fp32", "bf16"]),
    ]:
        mark = secrets.token_hex(6)  # every process of this run inherits it: none may be left after the signal
        env = os.environ | {"MPBENCH_FAULT": f"hang:{hangs}", "MPBENCH_TEST_RUN": mark}  # this case hangs
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_lines(out, len(kept), timeout=120)
        time.sleep(2)  # the next worker is now hanging
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == code, stderr[-2000:]
        assert f"not finished: tiny/{hangs}" in stderr and f"--resume {out}" in stderr
        assert [(r["mode"], r["status"]) for r in store.read(out)] == [(m, "ok") for m in kept]
        deadline = time.monotonic() + 15
        while (left := [p for p in marked("MPBENCH_TEST_RUN", mark) if is_running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes of the interrupted run still running: {left}"
    resumed = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["mode"] for r in store.read(out)] == ["fp32", "bf16", "int8-weight"]
    assert len({r["run_id"] for r in store.read(out)}) == 1  # three processes, one run


def test_config_file_defines_the_matrix_and_flags_override_it(tmp_path):
    cfg = tmp_path / "m.toml"
    out = tmp_path / "r.jsonl"
    cfg.write_text(f'models = ["tiny"]\nmodes = ["fp32", "bf16"]\ndevice = "cpu"\nbatch_size = 2\n'
                   f'seq_len = 32\nsteps = 3\nwarmup = 1\nout = "{out}"\n')  # fmt: skip
    assert main(["run", "--config", str(cfg), "--steps", "4"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["mode"], r["steps"], r["batch_size"]) for r in records] == [("fp32", 4, 2), ("bf16", 4, 2)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("steps = ", "invalid TOML"),
        ("stepz = 3", "key 'stepz' is unknown; allowed: model, models"),
        ('steps = "many"', "steps='many' must be int"),
        ("compile = 1", "compile=1 must be bool"),
        ("batch_size = true", "batch_size=True must be int"),
        ('model = "tiny"\nmodels = ["tiny"]', "model or models, not both"),
        ('modes = ["fp32", "fp7"]', "modes: 'fp7' is unknown"),
        ("steps = 0", "steps=0: must be at least 1"),
        # the values a flag refuses, refused alike in a config file
        ("modes = []", "modes: empty"),
        ('modes = ""', "modes: empty"),
        ('modes = ["bf16", "bf16"]', "modes: 'bf16' is given twice"),
        ("models = []", "models: empty"),
        ("steps = 99999999999999999999", "steps=99999999999999999999, batch_size=8: the token batches"),
        ("lr = inf", "lr=inf: must be a positive finite number"),
        ("weight_decay = inf", "weight_decay=inf: must be zero or a positive finite number"),
        ("case_timeout = -5", "case_timeout=-5: must be a positive number of seconds"),
    ],
)
def test_invalid_config_is_one_line_and_exit_2(tmp_path, capsys, text, match):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text + '\ndevice = "cpu"\n' if "device" not in text else text)
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_resume_and_a_different_out_are_refused(tmp_path, capsys):
    assert (
        main(["run", "--device", "cpu", "--resume", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "b.jsonl")]) == 2
    )
    assert "--resume appends to its own file" in capsys.readouterr().err
