"""Nothing of a run outlives it: after a timeout, an interrupt or a kill -9 of `mpbench run`, no process
the run started is left (workers, the fork server, torchrun, its ranks).

Each test marks its run with a variable of its own in the environment, which every process the run
starts inherits whatever its session or parent, and looks for survivors by that mark in /proc.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from suite.records import store
from suite.running.lifeline import CASE_TOKEN, is_running, marked, stop_marked
from suite.running.runner import run_cases
from tests.helpers import small_case

MARK = "MPBENCH_TEST_RUN"
ROOT = Path(__file__).parent.parent
RUN = [sys.executable, "-m", "suite.cli", "run", "--device", "cpu", "--model", "tiny", "--steps", "6",
       "--batch-size", "2", "--seq-len", "32", "--modes", "fp32"]  # fmt: skip

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")


@pytest.fixture
def mark(monkeypatch) -> str:
    value = secrets.token_hex(6)
    monkeypatch.setenv(MARK, value)
    return value


def _left(value: str) -> list[int]:
    """Processes of the marked run that still run."""
    return [p for p in marked(MARK, value) if is_running(p)]


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def _ranks(value: str) -> list[int]:
    """Processes of the marked run started for a data-parallel case (torchrun and its ranks)."""
    return [p for p in _left(value) if CASE_TOKEN.encode() in Path(f"/proc/{p}/environ").read_bytes()]


def test_stop_marked_finds_processes_outside_the_tree_and_session(mark):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        assert _wait_for(lambda: child.pid in marked(MARK, mark), 10)
        assert stop_marked(MARK, mark) == [] and child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()


def _watcher(pid: int, code: int) -> subprocess.Popen:
    """A process that calls exit_with(pid, code), then sleeps."""
    script = f"from suite.running.lifeline import exit_with; import time; exit_with({pid}, {code}); time.sleep(600)"
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)


def test_a_process_exits_with_the_one_it_watches():
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    watcher = _watcher(parent.pid, 7)
    try:
        time.sleep(1.5)
        assert watcher.poll() is None  # watching, not exited
        parent.kill()
        parent.wait()
        assert watcher.wait(timeout=10) == 7
        assert _watcher(parent.pid, 9).wait(timeout=30) == 9  # a parent already gone: exit at once
    finally:
        parent.kill()
        watcher.kill()


def test_a_timed_out_data_parallel_case_leaves_no_rank_running(mark, monkeypatch):
    monkeypatch.setenv("MPBENCH_FAULT", "hang:fp32")
    r = run_cases([small_case(mode="fp32", nproc=2)], log=None, case_timeout=20)[0]
    assert r["status"] == "timeout" and r["reason"].endswith("all ranks stopped"), r["reason"]
    assert _left(mark) == []  # torchrun and both ranks, though each rank ran in its own session


@pytest.mark.parametrize(
    "how, nproc",
    [(signal.SIGKILL, 1), (signal.SIGKILL, 2), (signal.SIGTERM, 2)],  # (SIGTERM of a worker: test_isolation)
    ids=["kill-9-worker", "kill-9-ranks", "sigterm-ranks"],
)
def test_a_stopped_run_leaves_nothing_running(mark, tmp_path, nproc, how):
    out = tmp_path / "r.jsonl"
    env = os.environ | {"MPBENCH_FAULT": "hang:fp32"}
    run = subprocess.Popen([*RUN, "--nproc", str(nproc), "--out", str(out)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(run.stderr), daemon=True).start()

    def hanging() -> bool:  # the worker said it trains (then hangs); torchrun and both ranks exist
        return any("training 6 steps" in line for line in lines) if nproc == 1 else len(_ranks(mark)) >= 3

    try:
        assert _wait_for(hanging, 60), f"the case never started: {''.join(lines)[-2000:]}"
        time.sleep(1.0)  # in the injected hang now
        run.send_signal(how)
        code = run.wait(timeout=60)
        assert code == (128 + signal.SIGTERM if how == signal.SIGTERM else -signal.SIGKILL), "".join(lines)
        assert _wait_for(lambda: not _left(mark), 15), f"still running: {_left(mark)}"
    finally:
        run.kill()
        stop_marked(MARK, mark)
    assert not out.exists() or store.read(out) == []  # nothing finished, nothing half-written
