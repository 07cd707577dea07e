"""Nothing of a run outlives it: processes marked by a token, found and stopped, and a lifeline to the parent.

A case's processes are not one tree for long: torchrun starts each rank in a session of its own,
and when torchrun is killed its ranks are re-parented to init, out of reach of a process-group
kill. So the processes of one case carry a token in their environment (`CASE_TOKEN`, inherited by
every descendant, whatever its session or parent), and `stop_marked` finds them by it in /proc,
kills them and checks that none is left. Independently, `exit_with(pid)` ends a worker or rank
when the `mpbench` process that started it dies (kill -9 included), so a hung case never runs on
for nobody.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from pathlib import Path

CASE_TOKEN = "MPBENCH_CASE_TOKEN"  # environment variable: marks every process of one case
PARENT_PID = "MPBENCH_PARENT_PID"  # environment variable: the mpbench process a rank must not outlive


def marked(name: str, value: str, proc: Path = Path("/proc")) -> list[int]:
    """Pids of the processes (not this one) whose environment has `name=value`; [] where /proc is missing."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in proc.glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and int(entry.name) != os.getpid():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def is_running(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)  # no /proc (macOS): existence only
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in ("Z", "X")


def stop_marked(name: str, value: str, wait_s: float = 10.0) -> list[int]:
    """SIGKILL every process marked `name=value` until none is left or `wait_s` passed; the survivors' pids.

    Looks again after each round: a process may start (torchrun spawning a rank) while others die."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = [p for p in marked(name, value) if is_running(p)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def exit_with(pid: int, code: int = 1) -> None:
    """End this process at once (exit `code`) when process `pid` ends; returns immediately.

    A daemon thread waits on a pidfd where Linux has one (no polling), else polls every 0.5 s."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            os._exit(code)  # already gone
        except (AttributeError, OSError):
            while is_running(pid):
                time.sleep(0.5)
        else:
            select.select([fd], [], [])  # readable when the process ends
        os._exit(code)

    threading.Thread(target=watch, name=f"mpbench-exit-with-{pid}", daemon=True).start()
