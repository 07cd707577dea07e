"""Every interrupt ends a run the same way: SIGHUP as SIGINT and SIGTERM do, and no KeyboardInterrupt
traceback from a Ctrl-C during start-up or from several in a row (issue 21, item 21)."""

from __future__ import annotations

import importlib
import os
import secrets
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from suite.cli.config import tomllib
from suite.records import store
from suite.running.lifeline import is_running, marked

REPO = Path(__file__).resolve().parent.parent
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RUN = ["run", "--device", "cpu", "--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--steps", "3"]


@pytest.fixture
def handlers():
    """This process's interrupt handlers as they were: a stopped command ignores interrupts until it exits."""
    before = {s: signal.getsignal(s) for s in INTERRUPTS}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys, handlers):
    """A Ctrl-C while the console script imports the command (torch: seconds): one line, exit 130."""
    importing = types.ModuleType("suite.cli.main")

    def interrupted(name: str):
        raise KeyboardInterrupt

    importing.__getattr__ = interrupted  # `from suite.cli.main import main` is interrupted
    monkeypatch.setitem(sys.modules, "suite.cli.main", importing)
    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["mpbench"]
    module, _, function = script.partition(":")
    assert getattr(importlib.import_module(module), function)(["models"]) == 130
    assert capsys.readouterr().err == "mpbench: interrupted by SIGINT (Ctrl-C); records already written are kept\n"


@pytest.mark.parametrize(
    "signals, code",
    [
        ((signal.SIGINT,) * 3, 130),  # Ctrl-C pressed three times
        ((signal.SIGHUP, signal.SIGINT, signal.SIGINT), 129),  # the terminal closed, as Ctrl-C was pressed
    ],
)
def test_interrupts_in_a_row_stop_the_run_once(tmp_path, signals, code):
    """Interrupts 20 ms apart while a case runs: one stop, the kept / resume line for the first, its exit
    code, no traceback, and no process of the run left."""
    out = tmp_path / "r.jsonl"
    mark = secrets.token_hex(6)  # every process of this run inherits it
    cmd = [sys.executable, "-m", "suite.cli", *RUN, "--modes", "fp32", "--out", str(out)]
    env = os.environ | {"MPBENCH_FAULT": "hang:fp32", "MPBENCH_TEST_RUN": mark}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = next((line for line in iter(proc.stderr.readline, "") if ": training " in line), None)
    assert started, "the case never started"
    time.sleep(0.5)  # its worker is now hanging
    for signum in signals:
        proc.send_signal(signum)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    name = signal.Signals(signals[0]).name
    assert f"interrupted by {name}; 0 finished record(s)" in err and "not finished: tiny/fp32" in err
    assert f"--resume {out}" in err and store.read(out) == []
    deadline = time.monotonic() + 15
    while (left := [p for p in marked("MPBENCH_TEST_RUN", mark) if is_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the interrupted run still running: {left}"
