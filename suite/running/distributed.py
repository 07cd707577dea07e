"""Data parallelism: one case over N processes with DistributedDataParallel, via torchrun.

Parent side, `train_distributed`: starts `python -m torch.distributed.run --standalone
--nproc-per-node N -m suite.running.distributed SPEC DIR` and reads back what rank 0 wrote, or, when
a rank failed, which rank and why (never a hang: collectives time out, torchrun tears the
other ranks down, and the parent has --case-timeout).

Rank side, `main`: every rank builds the same global batches (N x batch_size sequences, as a
1-process run with N times the batch would see), trains on its own slice with the mode's
prepare/step and DDP gradient averaging, and sends its figures to rank 0, which writes one
set of record values: the slowest rank's step time, the largest per-rank memory, summed
energy, losses averaged over ranks (so the curve is the global batch's loss).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from suite.training.case import Case

COLLECTIVE_TIMEOUT_S = 120  # a rank that stops answering ends the case within this


# ----------------------------------------------------------------------------- parent side


def _tee(stream: Any, keep: list[str]) -> None:
    """Copy the ranks' output to our stderr (progress) and keep it for the failure summary."""
    for line in stream:
        keep.append(line)
        sys.stderr.write(line)


def train_distributed(case: Case, flops_per_step: int, label: str, timeout_s: float | None) -> dict[str, Any]:
    """Run `case` on `case.nproc` processes; record values, or `error`/`timeout` naming the rank."""
    with tempfile.TemporaryDirectory(prefix="mpbench-ddp-") as tmp:
        spec = Path(tmp) / "case.json"
        spec.write_text(
            json.dumps({"case": dataclasses.asdict(case), "flops_per_step": flops_per_step, "label": label})
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={case.nproc}",
               "--max-restarts=0", "--monitor-interval=0.5",
               "-m", "suite.running.distributed", str(spec), tmp]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        output: list[str] = []
        reader = threading.Thread(target=_tee, args=(proc.stderr, output), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "reason": f"case exceeded --case-timeout {timeout_s:g} s; all ranks stopped"}
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # an interrupt stops every rank
            proc.wait()
            raise
        reader.join(timeout=5)
        result = Path(tmp) / "result.json"
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
        return {"status": "error", "reason": _rank_failure(Path(tmp), "".join(output), proc.returncode)}


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


def _ddp_wrapper(grad_comm: str, device_ids: list[int] | None):
    import torch.distributed.algorithms.ddp_comm_hooks.default_hooks as hooks
    from torch.nn.parallel import DistributedDataParallel

    def wrap(model):
        ddp = DistributedDataParallel(model, device_ids=device_ids)
        if grad_comm == "bf16":
            ddp.register_comm_hook(None, hooks.bf16_compress_hook)
        elif grad_comm == "fp16":
            ddp.register_comm_hook(None, hooks.fp16_compress_hook)
        return ddp  # fp32: DDP's own all-reduce in the gradients' dtype

    return wrap


def _mean_over_ranks(values: list[float], world: int) -> list[float]:
    import torch
    import torch.distributed as dist

    # NCCL reduces only CUDA tensors (on this rank's device, set at init); gloo takes CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return (t / world).tolist()


def run_rank(case: Case, flops_per_step: int, label: str, rank: int, world: int, local_rank: int) -> dict | None:
    """Train this rank's slice of the case; rank 0 returns the record values, others None."""
    import torch.distributed as dist

    from suite.hardware import resolve_device
    from suite.running.execute import result_fields
    from suite.training.data import digest, make_corpus
    from suite.training.train import run_case

    device = resolve_device(f"cuda:{local_rank}" if case.device.startswith("cuda") else "cpu")
    corpus = make_corpus(case.data, case.model_config.vocab_size)
    B, T = case.batch_size, case.seq_len
    train = corpus.batches(case.steps, B * world, T, case.seed, "train")  # the global batches
    heldout = corpus.batches(case.eval_batches, B * world, T, case.seed, "heldout")
    shard = slice(rank * B, (rank + 1) * B)

    def progress(step: int, steps: int, loss: float) -> None:
        if rank == 0:
            print(f"{label}: step {step}/{steps} loss {loss:.4f} (rank 0 slice)", file=sys.stderr, flush=True)

    wrap = _ddp_wrapper(case.grad_comm, [local_rank] if device.type == "cuda" else None)
    r = run_case(case, device, corpus, train[:, shard], heldout[:, shard], progress, wrap=wrap)
    # every rank takes part in every collective below, in the same order
    r.loss_curve = _mean_over_ranks(r.loss_curve, world)
    if r.final_loss is not None:
        r.final_loss = _mean_over_ranks([r.final_loss], world)[0]
        means = _mean_over_ranks([loss for _, loss in r.eval_curve], world)
        r.eval_curve = [[step, loss] for (step, _), loss in zip(r.eval_curve, means, strict=True)]
    mine = {"rank": rank, "host": socket.gethostname(), "timing": r.timing, "measurements": r.measurements}
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
        m["avg_power_w"] = sum(r.get("avg_power_w") or 0 for r in ranks)
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


def _init_process_group(device_type: str) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def train_here(case: Case, flops_per_step: int, label: str) -> dict[str, Any]:
    """One case on this rank of a user-launched torchrun job; every rank calls it in the same
    order. Rank 0 gets the record values; the other ranks get a stand-in they never write."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _init_process_group("cuda" if case.device.startswith("cuda") else "cpu")
    values = run_rank(case, flops_per_step, label, rank, world, int(os.environ.get("LOCAL_RANK", 0)))
    return values if values is not None else {"status": "skipped", "reason": f"rank {rank}: rank 0 writes the record"}


def main(argv: list[str]) -> int:
    """Entry of each rank under torchrun: SPEC_JSON OUT_DIR."""
    import torch.distributed as dist

    from suite.running import faults
    from suite.running.execute import failure_reason

    spec, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    case = Case(**spec["case"])
    try:
        _init_process_group("cuda" if case.device.startswith("cuda") else "cpu")
        kind = faults.fault_for(case, rank)
        if kind:
            faults.poison_losses(kind)
            faults.inject_before_training(kind)
        values = run_rank(case, spec["flops_per_step"], spec["label"], rank, world, local_rank)
        if values is not None:
            tmp = out / "result.json.tmp"
            tmp.write_text(json.dumps(values, default=_jsonable))
            tmp.replace(out / "result.json")
        dist.destroy_process_group()
        return 0
    except BaseException as exc:
        (out / f"rank-{rank}.error.json").write_text(json.dumps({"reason": failure_reason(exc)}))
        raise


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
