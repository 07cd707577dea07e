"""Data parallelism: one case over N processes with DDP or FSDP2 (`case.parallel`), via torchrun.

Parent side, `train_distributed`: starts `python -m torch.distributed.run --standalone
--nproc-per-node N -m suite.running.rank SPEC DIR` and reads back what rank 0 wrote, or, when
a rank failed, which rank and why (never a hang: collectives time out, torchrun tears the
other ranks down, and the parent has --case-timeout).

Rank side, `main`: every rank builds the same global batches (N x batch_size sequences, as a
1-process run with N times the batch would see), trains on its own slice with the mode's
prepare/step and DDP gradient averaging (or FSDP2 sharding, `suite.running.sharding`), and
sends its figures to rank 0, which writes one set of record values: the slowest rank's step
time, the largest per-rank memory (each rank's in `rank_peak_mem_mb`), summed energy, losses
averaged over ranks (so the curve is the global batch's loss).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from suite.hardware import DeviceInfo, resolve_device
from suite.running.lifeline import CASE_TOKEN, PARENT_PID, exit_with, stop_marked
from suite.running.progress import Event, PlainLines, Sink, from_line, step_events, to_line
from suite.text import log_to_stderr
from suite.training.case import Case

COLLECTIVE_TIMEOUT_S = 120  # a rank that stops answering ends the case within this
COMPILE_COLLECTIVE_TIMEOUT_S = 1800  # with --compile: torch's gloo default; NCCL's own is 600 s


# ----------------------------------------------------------------------------- parent side


def _tee(stream: Any, keep: list[str], progress: Sink) -> None:
    """Rank 0's progress events to `progress`, the ranks' other output to our stderr; keep all
    of it for the failure summary."""
    for line in stream:
        keep.append(line)
        event = from_line(line)
        if event is not None:
            progress(event)
        else:
            sys.stderr.write(line)


def train_distributed(
    case: Case, flops_per_step: int, label: str, timeout_s: float | None, progress: Sink | None = None
) -> dict[str, Any]:
    """Run `case` on `case.nproc` processes; record values, or `error`/`timeout` naming the rank.

    Rank 0's progress events go to `progress` (default: the plain lines, on stderr)."""
    with tempfile.TemporaryDirectory(prefix="mpbench-ddp-") as tmp:
        spec = Path(tmp) / "case.json"
        spec.write_text(
            json.dumps({"case": dataclasses.asdict(case), "flops_per_step": flops_per_step, "label": label})
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={case.nproc}",
               "--max-restarts=0", "--monitor-interval=0.5",
               "-m", "suite.running.rank", str(spec), tmp]  # fmt: skip
        # torchrun sets 1 thread per rank when unset, and prints a banner saying so: set it ourselves. The
        # token marks every process of this case (torchrun and its ranks, whatever their session), and
        # the ranks exit when this process dies
        token = secrets.token_hex(8)
        env = {"OMP_NUM_THREADS": "1"} | dict(os.environ) | {CASE_TOKEN: token, PARENT_PID: str(os.getpid())}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
        )
        output: list[str] = []
        reader = threading.Thread(
            target=_tee, args=(proc.stderr, output, progress or PlainLines(log_to_stderr)), daemon=True
        )
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stopped = _stop_case(proc, token)
            return {"status": "timeout", "reason": f"case exceeded --case-timeout {timeout_s:g} s; {stopped}"}
        except BaseException:
            _stop_case(proc, token)  # an interrupt stops every rank
            raise
        stopped = _stop_case(proc, token)  # a rank torchrun lost track of must not train on
        reader.join(timeout=5)
        result = Path(tmp) / "result.json"
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
        reason = _rank_failure(Path(tmp), "".join(output), proc.returncode)
        return {"status": "error", "reason": reason if stopped == ALL_STOPPED else f"{reason}; {stopped}"}


ALL_STOPPED = "all ranks stopped"


def _stop_case(proc: subprocess.Popen, token: str) -> str:
    """Kill torchrun's group and every process marked with the case's token; say whether any survived."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # torchrun and its group already gone
        pass
    proc.wait()
    survivors = stop_marked(CASE_TOKEN, token)
    return f"processes {survivors} of the case could not be stopped" if survivors else ALL_STOPPED


def _rank_failure(tmp: Path, output: str, code: int) -> str:
    """Which rank failed first and why: torchrun's root cause, plus each rank's own error."""
    errors = {int(p.name.split("-")[1].split(".")[0]): json.loads(p.read_text())["reason"]
              for p in tmp.glob("rank-*.error.json")}  # fmt: skip
    root = re.search(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", output.split("Root Cause")[-1], re.S)
    parts = []
    if root:
        rank, exitcode = int(root.group(1)), int(root.group(2))
        how = f"killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exit code {exitcode}"
        parts.append(f"rank {rank} failed first ({how})" + (f": {errors.pop(rank)}" if rank in errors else ""))
    parts += [f"rank {r}: {why}" for r, why in sorted(errors.items())]
    return "; ".join(parts) or f"torchrun exited with code {code} and no rank reported why"


# ------------------------------------------------------------------------------- rank side


def rank_device(case: Case, local_rank: int) -> DeviceInfo:
    """This rank's device: on GPUs the case's GPU plus the local rank (a node's ranks on consecutive
    GPUs from the case's; `validate` checks they exist), on a CPU the CPU."""
    device = resolve_device(case.device)
    return resolve_device(f"cuda:{device.index + local_rank}") if device.type == "cuda" else device


def _ddp_wrapper(grad_comm: str, device: DeviceInfo):
    import torch.distributed.algorithms.ddp_comm_hooks.default_hooks as hooks
    from torch.nn.parallel import DistributedDataParallel

    def wrap(model, mode):
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if grad_comm == "bf16":
            ddp.register_comm_hook(None, hooks.bf16_compress_hook)
        elif grad_comm == "fp16":
            ddp.register_comm_hook(None, hooks.fp16_compress_hook)
        return ddp  # fp32: DDP's own all-reduce in the gradients' dtype

    return wrap


def _mean_over_ranks(values: list[float], world: int, device: DeviceInfo) -> list[float]:
    import torch
    import torch.distributed as dist

    # this rank's device: NCCL reduces only CUDA tensors, gloo takes CPU ones
    t = torch.tensor(values, dtype=torch.float64, device=device.torch_device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return (t / world).tolist()


def _first_divergence_over_ranks(device: DeviceInfo):
    """The train loop's `agree`: the first NaN/inf step of any rank, so that every rank stops at the
    same check point (one rank stopping alone would leave the others in a collective it never joins)."""
    import torch
    import torch.distributed as dist

    def agree(first_bad: int | None) -> int | None:
        t = torch.tensor(
            [math.inf if first_bad is None else first_bad], dtype=torch.float64, device=device.torch_device
        )
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        step = t.item()
        return None if math.isinf(step) else int(step)

    return agree


def run_rank(
    case: Case, flops_per_step: int, label: str, rank: int, world: int, device: DeviceInfo, emit: Sink | None = None
) -> dict | None:
    """Train this rank's slice of the case on `device` (`rank_device`); rank 0 returns the record values
    (and sends its progress events to `emit`), others None."""
    import torch.distributed as dist

    from suite.running.execute import result_fields
    from suite.training.data import digest, make_corpus
    from suite.training.train import run_case

    corpus = make_corpus(case.data, case.model_config.vocab_size)
    B, T = case.batch_size, case.seq_len
    train = corpus.batches(case.steps, B * world, T, case.seed, "train")  # the global batches
    heldout = corpus.batches(case.eval_batches, B * world, T, case.seed, "heldout")
    shard = slice(rank * B, (rank + 1) * B)

    progress = step_events(label, emit, " (rank 0 slice)") if rank == 0 and emit else None
    sharded: dict[str, Any] = {}  # FSDP: the policy's param_dtype and reduce_dtype
    if case.data_parallel == "fsdp":
        from suite.running.sharding import fsdp_wrapper, full_copy

        wrap, unshard = fsdp_wrapper(case.grad_comm, sharded), full_copy
    else:
        wrap, unshard = _ddp_wrapper(case.grad_comm, device), None
    r = run_case(case, device, corpus, train[:, shard], heldout[:, shard], progress, wrap=wrap, unshard=unshard,
                 agree=_first_divergence_over_ranks(device))  # fmt: skip
    # every rank takes part in every collective below, in the same order
    r.loss_curve = _mean_over_ranks(r.loss_curve, world, device)
    if r.final_loss is not None:
        r.final_loss = _mean_over_ranks([r.final_loss], world, device)[0]
        means = _mean_over_ranks([loss for _, loss in r.eval_curve], world, device)
        r.eval_curve = [[step, loss] for (step, _), loss in zip(r.eval_curve, means, strict=True)]
    mine = {"rank": rank, "host": socket.gethostname(), "device": str(device.torch_device), "timing": r.timing,
            "measurements": r.measurements}  # fmt: skip
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank != 0:
        return None
    slowest = _slowest(everyone)
    r.timing = slowest["timing"] if r.timing is not None else None
    r.measurements = _combined_measurements(everyone, slowest, case)
    values = {
        "data_digest": digest(train),
        "loss_floor": corpus.loss_floor,
        "rank_step_time_ms": [e["timing"].median_ms if e["timing"] else None for e in everyone],
        "rank_peak_mem_mb": [e["measurements"].get("peak_mem_mb") for e in everyone],
        "rank_devices": [e["device"] for e in everyone],
        **sharded,
        "hosts": sorted({e["host"] for e in everyone}),
        **result_fields(case, r, device, flops_per_step),
    }
    if r.diverged_at is None:
        return values | {"status": "ok"}
    return values | {"status": "diverged", "reason": f"loss became NaN/inf at step {r.diverged_at}"}


def _slowest(everyone: list[dict]) -> dict:
    timed = [e for e in everyone if e["timing"] is not None]
    return max(timed, key=lambda e: e["timing"].median_ms) if timed else everyone[0]


def _combined_measurements(everyone: list[dict], slowest: dict, case: Case) -> dict[str, Any]:
    """Per-rank figures into one: the slowest rank's, the largest memory, summed energy. A figure
    some rank lacks is null with that reason, never the other ranks' figure passed off as the job's."""
    m = dict(slowest["measurements"])
    ranks = [e["measurements"] for e in everyone]
    sources = {r.get("peak_mem_source") for r in ranks if r.get("peak_mem_mb") is not None}
    for key in ("peak_mem_mb", "peak_mem_device_mb", "peak_mem_allocated_mb", "peak_mem_reserved_mb"):
        missing = [e["rank"] for e in everyone if e["measurements"].get(key) is None]
        m[key] = None if missing else max(r[key] for r in ranks)  # never a sum: each GPU must fit its own peak
        if missing and len(missing) < len(ranks):
            m["peak_mem_reason"] = f"{key}: rank(s) {missing} have none ({_reason_of(everyone, missing, 'peak_mem')})"
    if len(sources) > 1:  # like with like: one rank's NVML process figure is not another's RSS
        m["peak_mem_mb"] = m["peak_mem_source"] = None
        m["peak_mem_reason"] = f"ranks measured peak_mem_mb differently ({sorted(map(str, sources))})"
    missing = [e["rank"] for e in everyone if e["measurements"].get("energy_j_per_step") is None]
    if not missing:
        m["energy_j_per_step"] = sum(r["energy_j_per_step"] for r in ranks)
        powers = [r.get("avg_power_w") for r in ranks]  # None where a rank's window was too short to tell
        m["avg_power_w"] = None if None in powers else sum(powers)
        m["tokens_per_joule"] = case.tokens_per_step / m["energy_j_per_step"]
    elif len(missing) < len(ranks):  # (when no rank has energy, the slowest's reason says why)
        m |= dict.fromkeys(("energy_j_per_step", "avg_power_w", "tokens_per_joule"))
        m["energy_reason"] = (
            f"rank(s) {missing} measured no energy ({_reason_of(everyone, missing, 'energy')}), so the job's "
            "energy is unknown (one rank's is not the job's)"
        )
    return m


def _reason_of(everyone: list[dict], ranks: list[int], group: str) -> str:
    """The first of these ranks' `{group}_reason`, or a plain 'no reason given'."""
    for e in everyone:
        if e["rank"] in ranks and e["measurements"].get(f"{group}_reason"):
            return e["measurements"][f"{group}_reason"]
    return "no reason given"


def launched_by_torchrun() -> bool:
    """True when this process is one rank of a job the user started with torchrun (or Slurm)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def local_world_size() -> int:
    """Ranks of this job on this node (torchrun's LOCAL_WORLD_SIZE; the world size when unset)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def collective_timeout_s(case: Case) -> int:
    """How long a collective waits for a silent rank before the case ends as an error: short, except
    while ranks compile (each compiles on its own, and eight at once take minutes)."""
    return COMPILE_COLLECTIVE_TIMEOUT_S if case.compile else COLLECTIVE_TIMEOUT_S


def _init_process_group(device: DeviceInfo, timeout_s: int) -> None:
    """NCCL on this rank's GPU (made current first, as NCCL wants), gloo on a CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device.index)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))


def train_here(case: Case, flops_per_step: int, label: str, progress: Sink | None = None) -> dict[str, Any]:
    """One case on this rank of a user-launched torchrun job; every rank calls it in the same
    order. Rank 0 gets the record values; the other ranks get a stand-in they never write."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device(case, int(os.environ.get("LOCAL_RANK", 0)))
    _init_process_group(device, collective_timeout_s(case))  # once: every case of the job shares the group
    emit = progress or PlainLines(log_to_stderr)
    values = run_rank(case, flops_per_step, label, rank, world, device, emit)
    return values if values is not None else {"status": "skipped", "reason": f"rank {rank}: rank 0 writes the record"}


def main(argv: list[str]) -> int:
    """Entry of each rank under torchrun: SPEC_JSON OUT_DIR."""
    from suite.quiet import quiet_dependencies

    quiet_dependencies()  # before anything imports torchao
    import torch.distributed as dist

    from suite.running import faults
    from suite.running.execute import failure_reason

    if PARENT_PID in os.environ:  # started by `mpbench run`: never outlive it
        exit_with(int(os.environ[PARENT_PID]))
    spec, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    case = Case(**spec["case"])
    try:
        device = rank_device(case, int(os.environ.get("LOCAL_RANK", 0)))
        _init_process_group(device, collective_timeout_s(case))
        kind = faults.fault_for(case, rank)
        if kind:
            faults.poison_losses(kind)
            faults.inject_before_training(kind)
        values = run_rank(case, spec["flops_per_step"], spec["label"], rank, world, device, _to_parent)
        if values is not None:
            tmp = out / "result.json.tmp"
            tmp.write_text(json.dumps(values))
            tmp.replace(out / "result.json")
        dist.destroy_process_group()
        return 0
    except BaseException as exc:
        (out / f"rank-{rank}.error.json").write_text(json.dumps({"reason": failure_reason(exc)}))
        raise


def _to_parent(event: Event) -> None:
    """Rank 0's progress: one marked line on stderr, which torchrun passes to the parent's reader."""
    sys.stderr.write(to_line(event))
    sys.stderr.flush()
