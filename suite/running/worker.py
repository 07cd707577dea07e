"""One case in its own fresh process, with a time limit; the parent gets record values back.

Each case is forked from multiprocessing's fork server, a clean process started once per run
that has imported torch and the harness but never touched CUDA, run a kernel or trained: the
child starts with no CUDA context, no allocator history and no state from earlier cases, so
peaks and failures never leak between cases, and it does not pay torch's import (~2 s of CPU)
again. The parent's environment is applied in the child (the server's dates from its start).
The child ignores SIGINT and SIGHUP (the parent decides what an interrupt stops) and sends its progress
events, then its values, over a pipe; the parent hands the events to its sink as they come. A
child that dies without sending its values becomes an `error` record saying how it died.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import secrets
import signal
import time
from typing import Any

from suite.running.lifeline import CASE_TOKEN, PARENT_PID, exit_with, stop_marked
from suite.running.progress import Event, PlainLines, Sink
from suite.text import log_to_stderr
from suite.training.case import Case

# what stops a run: Ctrl-C, kill's default and the terminal closing (Windows has no SIGHUP)
INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """The parent was asked to stop (SIGINT, SIGTERM or SIGHUP) while a case ran. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` around a case makes it that case's record."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def ignore_interrupts() -> None:
    """Ignore further interrupts in this process (main thread only): once a run is stopping, another
    Ctrl-C must not cut short the stop of its case, its message or its exit."""
    for signum in INTERRUPTS:
        signal.signal(signum, signal.SIG_IGN)


# What the fork server imports once, so that every case's process starts with it loaded. Nothing
# here may touch CUDA at import (not even torch.cuda.is_available(): CUDA does not survive a fork
# after its driver was initialized); torchao is left out for that reason, modes import it lazily.
PRELOAD = ["torch", "suite.running.execute"]


def worker_context() -> Any:
    """The multiprocessing context of case processes: the fork server where the platform has
    one (Linux, macOS), else spawn. Neither inherits a CUDA context from the parent."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts, the first time a case runs
    return ctx


def _apply_environment(env: dict[str, str]) -> None:
    """Make the child's environment the parent's of now (MPBENCH_FAULT, CUDA_VISIBLE_DEVICES...)."""
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)


def _child(case: Case, flops_per_step: int, label: str, conn: Any, env: dict[str, str]) -> None:
    _apply_environment(env)
    exit_with(int(env[PARENT_PID]))  # a parent killed with -9 takes its case with it
    for signum in INTERRUPTS:  # Ctrl-C and a closed terminal reach the whole group: the parent decides
        if signum != signal.SIGTERM:  # SIGTERM is how the parent stops it
            signal.signal(signum, signal.SIG_IGN)
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


def check_timeout(seconds: float | None) -> None:
    """ValueError unless `seconds` (--case-timeout) is None, no limit, or a positive finite number:
    0 and nan would silently mean no limit, a negative one a `timeout` for a case that never ran."""
    number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if seconds is not None and not (number and seconds > 0 and math.isfinite(seconds)):
        raise ValueError(
            f"case_timeout={seconds!r}: must be a positive number of seconds, such as 1800; leave it out for no limit"
        )


def train_isolated(
    case: Case, flops_per_step: int, label: str, timeout_s: float | None, progress: Sink | None = None
) -> dict[str, Any]:
    """Run the case in a fresh process; `timeout` / `error` values if it hangs or dies.

    Its progress events go to `progress` (default: the plain lines, on stderr)."""
    progress = progress or PlainLines(log_to_stderr)
    ctx = worker_context()
    receive, send = ctx.Pipe(duplex=False)
    token = secrets.token_hex(8)  # marks the worker and anything it starts (compile workers, say)
    args = (case, flops_per_step, label, send, dict(os.environ) | {CASE_TOKEN: token, PARENT_PID: str(os.getpid())})
    proc = ctx.Process(target=_child, args=args, name=f"mpbench-{case.mode}")
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
                _stop(proc, token)
                return {"status": "timeout", "reason": f"case exceeded --case-timeout {timeout_s:g} s; worker stopped"}
    except BaseException:
        _stop(proc, token)  # an interrupt: the case in flight is stopped, not left running
        raise
    finally:
        receive.close()


def _stop(proc: mp.process.BaseProcess, token: str) -> None:
    """Stop the worker (politely, then not) and whatever it started."""
    proc.terminate()
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    stop_marked(CASE_TOKEN, token)
