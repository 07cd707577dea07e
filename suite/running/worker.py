"""One case in its own fresh process, with a time limit; the parent gets record values back.

Each case is forked from multiprocessing's fork server, a clean process started once per run
that has imported torch and the harness but never touched CUDA, run a kernel or trained: the
child starts with no CUDA context, no allocator history and no state from earlier cases, so
peaks and failures never leak between cases, and it does not pay torch's import (~2 s of CPU)
again. The parent's environment is applied in the child (the server's dates from its start).
The child ignores SIGINT (the parent decides what an interrupt stops) and sends its values
over a pipe; a child that dies without sending becomes an `error` record saying how it died.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

from suite.training.case import Case


class Interrupted(Exception):
    """The parent was asked to stop (SIGINT/SIGTERM) while a case ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from suite.running import faults
    from suite.running.execute import train_in_process
    from suite.text import log_to_stderr

    def inject() -> None:  # tests only: MPBENCH_FAULT names a fault and a case
        kind = faults.fault_for(case)
        if kind:
            faults.poison_losses(kind)
            faults.inject_before_training(kind)

    conn.send(train_in_process(case, flops_per_step, label, log_to_stderr, before=inject))
    conn.close()


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"worker process killed by {signal.Signals(-exitcode).name}"
    return f"worker process exited with code {exitcode} before reporting a result"


def train_isolated(case: Case, flops_per_step: int, label: str, timeout_s: float | None) -> dict[str, Any]:
    """Run the case in a spawned process; `timeout` / `error` values if it hangs or dies."""
    ctx = worker_context()
    receive, send = ctx.Pipe(duplex=False)
    args = (case, flops_per_step, label, send, dict(os.environ))
    proc = ctx.Process(target=_child, args=args, name=f"mpbench-{case.mode}")
    proc.start()
    send.close()  # the child holds the only write end: EOF when it dies
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while True:
            if receive.poll(0.2):
                try:
                    values = receive.recv()
                except EOFError:
                    proc.join()
                    return {"status": "error", "reason": _how_it_died(proc.exitcode)}
                proc.join(timeout=30)
                return values
            if not proc.is_alive():
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
