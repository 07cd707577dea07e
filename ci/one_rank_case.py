"""One case as a one-rank torchrun job under DDP or FSDP2, through the suite's own rank code.

`mpbench run` takes its data-parallel path only with more than one process: `--nproc 1` runs a
plain case (its record says `parallel: null`), and under a user's torchrun of one process
`launched_by_torchrun()` is false (WORLD_SIZE 1), so that too runs a plain case. A one-GPU
machine can still run DDP's and FSDP2's wrappers on one rank (NCCL or gloo, world size 1), and
ci/gpu-first-contact.sh needs exactly that. This stand-in builds the case, trains it with
`train_distributed` (torchrun with one process, `suite.running.rank`), and appends the record
made by the store's own functions, `parallel` and `grad_comm` set as the case ran. It goes once
`mpbench run` can run a one-rank job itself.

    python ci/one_rank_case.py --parallel fsdp --mode bf16 --out records.jsonl [--model ...]

Exit codes as `mpbench run`: 0 ok or skipped, 1 failed, 2 bad input, 128 + signal when stopped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import NoReturn


def _stop(signum: int, frame: object) -> NoReturn:
    # an exception, so that train_distributed stops the torchrun job it started
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Parse, run the one case, append its record; the exit code says how it ended."""
    p = argparse.ArgumentParser(prog="one_rank_case.py", description=__doc__.splitlines()[0])
    p.add_argument("--parallel", required=True, choices=("ddp", "fsdp"))
    p.add_argument("--mode", default="bf16")
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, resolved here, once")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--case-timeout", type=float, default=None, help="seconds before the job is stopped")
    p.add_argument("--out", required=True, help="JSON Lines file the record is appended to")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)

    from suite.quiet import quiet_dependencies

    quiet_dependencies()
    from suite.hardware import environment, resolve_device
    from suite.modes import get_mode
    from suite.modes.base import decide
    from suite.records import checks, store
    from suite.running.distributed import train_distributed
    from suite.running.execute import case_fields
    from suite.training.case import Case

    try:
        device = resolve_device(args.device)
        # the concrete device, never "auto": the ranks pick NCCL or gloo from it
        sizes = dict(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup)
        case = Case(model=args.model, mode=args.mode, device=str(device.torch_device), nproc=1, parallel=args.parallel,
                    **sizes)  # fmt: skip
        out = store.check_writable(args.out)
    except ValueError as exc:
        print(f"one_rank_case: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    values = {"run_id": store.new_run_id(), **case_fields(case, device), **environment(device)}
    values |= {"parallel": case.parallel, "grad_comm": case.grad_comm}  # case_fields nulls them at one process
    mode = get_mode(case.mode)
    reason, emulated = decide(mode, device, case.emulate)
    if not reason:
        reason = mode.fsdp_plan(case.grad_comm).unavailable if case.parallel == "fsdp" else mode.no_data_parallel
    values |= {"emulated": None if reason else emulated is not None, "emulated_reason": None if reason else emulated}
    label = f"{case.mode} {case.model} b{case.batch_size}x{case.seq_len} {case.parallel} 1 rank"
    if reason:
        values |= {"status": "skipped", "reason": reason}
    else:
        values |= train_distributed(case, values["flops_per_step"], label, args.case_timeout)
    values["elapsed_s"] = round(time.perf_counter() - t0, 3)
    record = store.make_record(**values)
    record["suspect"] = checks.check(record)
    store.append(out, record)
    print(f"{label}: {record['status']}" + (f": {record['reason']}" if record["reason"] else "") + f"; record in {out}")
    return 1 if record["status"] in store.FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
