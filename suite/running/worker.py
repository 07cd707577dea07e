"""One case in its own spawned process, with a time limit; the parent gets record values back.

Spawned (not forked): the child starts with no CUDA context, no allocator history and no
thread state from earlier cases, so peaks and failures never leak between cases. The child
ignores SIGINT (the parent decides what an interrupt stops) and sends its progress events, then
its values, over a pipe; the parent hands the events to its sink as they come. A child that
dies without sending its values becomes an `error` record saying how it died.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from typing import Any

from suite.running.progress import Event, PlainLines, Sink
from suite.text import log_to_stderr
from suite.training.case import Case


class Interrupted(Exception):
    """The parent was asked to stop (SIGINT/SIGTERM) while a case ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _child(case: Case, flops_per_step: int, label: str, conn: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from suite.quiet import quiet_dependencies

    quiet_dependencies()  # before anything imports torchao
    from suite.running import faults
    from suite.running.execute import train_in_process

    def inject() -> None:  # tests only: MPBENCH_FAULT names a fault and a case
        kind = faults.fault_for(case)
        if kind:
            faults.poison_losses(kind)
            faults.inject_before_training(kind)

    conn.send(train_in_process(case, flops_per_step, label, conn.send, before=inject))  # events, then values
    conn.close()


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"worker process killed by {signal.Signals(-exitcode).name}"
    return f"worker process exited with code {exitcode} before reporting a result"


def train_isolated(
    case: Case, flops_per_step: int, label: str, timeout_s: float | None, progress: Sink | None = None
) -> dict[str, Any]:
    """Run the case in a spawned process; `timeout` / `error` values if it hangs or dies.

    Its progress events go to `progress` (default: the plain lines, on stderr)."""
    progress = progress or PlainLines(log_to_stderr)
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, flops_per_step, label, send), name=f"mpbench-{case.mode}")
    proc.start()
    send.close()  # the child holds the only write end: EOF when it dies
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while True:
            if receive.poll(0.2):
                try:
                    message = receive.recv()
                except EOFError:
                    proc.join()
                    return {"status": "error", "reason": _how_it_died(proc.exitcode)}
                if not isinstance(message, Event):
                    proc.join(timeout=30)
                    return message  # the values: the last thing a child sends
                progress(message)
            elif not proc.is_alive():  # nothing left to read and gone: it died before sending its values
                proc.join()
                return {"status": "error", "reason": _how_it_died(proc.exitcode)}
            if deadline and time.monotonic() > deadline:
                _stop(proc)
                return {"status": "timeout", "reason": f"case exceeded --case-timeout {timeout_s:g} s; worker stopped"}
    except BaseException:
        _stop(proc)  # an interrupt: the case in flight is stopped, not left running
        raise
    finally:
        receive.close()


def _stop(proc: mp.process.BaseProcess) -> None:
    proc.terminate()
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join()
