"""Run a matrix of cases: validate everything first, then each case in its own process.

Whatever happens to one case (out of memory, NaN loss, an exception, a hang, a crashed
worker) becomes a record with its status, and the run goes on. The parent writes every
record, appended and fsynced as soon as it exists, so an interrupted run keeps all it
finished and `resume=True` runs only what has no record yet.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from suite.hardware import DeviceInfo, environment, resolve_device
from suite.metrics.window import nvml_device
from suite.modes import get_mode
from suite.modes.base import decide
from suite.records import checks, outputs, store
from suite.records.cases import alike, case_key, machine, outcomes, pair_key
from suite.reporting import convergence
from suite.running import faults
from suite.running.cooldown import no_wait
from suite.running.distributed import launched_by_torchrun, local_world_size, train_distributed, train_here
from suite.running.energy_protocol import Protocol, ProtocolSettings
from suite.running.execute import Batches, case_fields, train_in_process
from suite.running.max_batch import check_searchable, find_max_batch
from suite.running.progress import Event, PlainLines, Sink, ignore
from suite.running.worker import INTERRUPTS, Interrupted, check_timeout, ignore_interrupts, train_isolated
from suite.text import log_to_stderr
from suite.training.case import Case
from suite.training.data import make_corpus

Log = Callable[[str], None]


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


class RunInterrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP stopped the run: what was finished and what was not."""

    def __init__(self, signum: int, done: list[dict[str, Any]], not_run: list[str]) -> None:
        super().__init__(f"{signal.Signals(signum).name}: {len(done)} case(s) finished, {len(not_run)} not")
        self.signum, self.done, self.not_run = signum, done, not_run


class RecordNotWritten(Exception):
    """A record could not be written (disk full, the file made read-only): the run stopped there,
    with every earlier record on disk."""

    def __init__(self, why: str, done: list[dict[str, Any]], lost: str, not_run: list[str]) -> None:
        super().__init__(f"{why}: {len(done)} record(s) written, not the one of {lost}; {len(not_run)} case(s) not run")
        self.why, self.done, self.lost, self.not_run = why, done, lost, not_run


def validate(cases: Sequence[Case]) -> dict[str, DeviceInfo]:
    """Everything that can be checked before any training: devices, data files, fit.

    Returns the resolved device of each case's device; raises ValueError.
    """
    if not cases:
        raise ValueError("no cases to run: give at least one mode")
    faults.parse_spec()  # a malformed MPBENCH_FAULT is bad input, not an error record in every case
    devices = {c.device: resolve_device(c.device) for c in cases}
    for c in cases:
        device = devices[c.device]
        if device.type == "cuda" and c.nproc > 1:
            _check_rank_gpus(c, device)
        if c.data_parallel == "ddp" and c.grad_comm == "bf16" and device.type != "cuda":
            raise ValueError(
                "grad_comm='bf16': torch's bf16 all-reduce hook needs CUDA and NCCL; use fp32 or fp16 on a CPU "
                "(or --parallel fsdp, whose bf16 reduce-scatter runs on gloo)"
            )
        c.check_batches_fit()
        corpus = make_corpus(c.data, c.model_config.vocab_size)
        if hasattr(corpus, "check_fits"):
            corpus.check_fits(c.seq_len)
    return devices


def _check_rank_gpus(case: Case, device: DeviceInfo) -> None:
    """The GPUs a node's ranks train on (the case's GPU and the next ones, one per local rank) exist here.

    Under the user's torchrun the node runs LOCAL_WORLD_SIZE of the job's ranks (a 2 x 8 job: 8
    here, 16 in all); otherwise mpbench starts all `nproc` ranks on this node."""
    by_torchrun = launched_by_torchrun()
    per_node = local_world_size() if by_torchrun else case.nproc
    gpus = torch_cuda_count()
    last = device.index + per_node - 1
    if last >= gpus:
        what, fix = (f"nproc={case.nproc}", "--nproc") if not by_torchrun else (
            f"torchrun's {per_node} ranks on this node", "--nproc-per-node")  # fmt: skip
        raise ValueError(
            f"{what} on device={case.device!r}: the ranks would use cuda:{device.index}..cuda:{last}, but {gpus} "
            f"GPU(s) are visible; use {fix} {gpus - device.index} or less, or an earlier --device "
            "(CUDA_VISIBLE_DEVICES picks which GPUs are visible)"
        )


def reference_first(cases: Sequence[Case]) -> list[Case]:
    """Stable reorder so each group's fp32 case runs before the modes compared with it."""
    first_seen: dict[tuple, int] = {}
    for c in cases:
        first_seen.setdefault(_group(c), len(first_seen))
    return sorted(cases, key=lambda c: (first_seen[_group(c)], c.mode != convergence.REFERENCE))


GROUP = ("model", "device", "batch_size", "seq_len", "steps", "seed", "data", "compile", "nproc", "grad_comm",
         "parallel", "lr_schedule", "lr_floor")  # fmt: skip


def _group(case_or_record: Case | dict[str, Any], keys: tuple[str, ...] = GROUP) -> tuple:
    """Cases compared with each other: fp32 vs the other modes; nproc 1 vs N for scaling."""
    if isinstance(case_or_record, dict):  # records name nproc world_size
        return tuple(case_or_record.get("world_size" if k == "nproc" else k) for k in keys)
    return tuple(getattr(case_or_record, "data_parallel" if k == "parallel" else k) for k in keys)


SCALING_GROUP = ("mode", *(k for k in GROUP if k not in ("nproc", "grad_comm", "parallel")))


def _scaling_group(case_or_record: Case | dict[str, Any]) -> tuple:
    """The same case on any number of processes."""
    return _group(case_or_record, SCALING_GROUP)


def scaling_fields(record: dict[str, Any], single: dict[str, Any] | None) -> dict[str, Any]:
    """Weak-scaling efficiency: tokens/s over N processes / (N x tokens/s of 1 process)."""
    n = record.get("world_size") or 1
    if record.get("tokens_per_s") is None:
        return {"scaling_reason": f"no throughput (status {record['status']})"}
    if n == 1:
        return {"scaling_efficiency": 1.0}
    if single is None or single.get("tokens_per_s") is None:
        return {"scaling_reason": "no ok 1-process run of this case in this invocation (use --scaling 1,N)"}
    return {"scaling_efficiency": record["tokens_per_s"] / (n * single["tokens_per_s"])}


def _ddp_twin(record: dict[str, Any]) -> tuple:
    """The same case on the same processes under DDP: what an FSDP record's memory is compared with."""
    return (*_scaling_group(record), record.get("world_size"), record.get("grad_comm"))


def memory_saving_fields(
    record: dict[str, Any], ddp: dict[str, Any] | None, single: dict[str, Any] | None
) -> dict[str, Any]:
    """FSDP's memory saving per rank: 1 - its largest rank peak / DDP's for the same case (else
    the 1-process run's, which holds what one DDP rank holds but DDP's gradient buckets).
    Allocator peaks where both have them (GPU), else peak_mem_mb (CPU: whole-process RSS)."""
    if record.get("parallel") != "fsdp":
        return {"mem_saving_reason": "not a sharded (--parallel fsdp) run"}
    for name, base in (("ddp", ddp), ("1-process", single)):
        if base is None or base.get("status") != "ok":
            continue
        for key in ("peak_mem_allocated_mb", "peak_mem_mb"):
            if record.get(key) and base.get(key):
                return {"mem_saving_vs_ddp": 1 - record[key] / base[key], "mem_saving_basis": f"{name} {key}"}
    if record.get("peak_mem_mb") is None:
        return {"mem_saving_reason": f"no peak memory (status {record['status']})"}
    return {"mem_saving_reason": "no ok DDP or 1-process run of this case in this invocation "
            "(use --parallel ddp,fsdp or --scaling 1,N)"}  # fmt: skip


@contextlib.contextmanager
def _interrupts() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (the terminal closed) stop the run alike: the first raises Interrupted in
    the parent; the ones after it are ignored while the case in flight is stopped."""

    def handler(signum: int, frame: object) -> None:
        ignore_interrupts()
        raise Interrupted(signum)

    try:
        previous = {signum: signal.signal(signum, handler) for signum in INTERRUPTS}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, was in previous.items():
            signal.signal(signum, signal.SIG_DFL if was is None else was)


def run_cases(
    cases: Sequence[Case],
    out: str | Path | None = None,
    log: Log | None = log_to_stderr,
    run_id: str | None = None,
    isolate: bool = True,
    case_timeout: float | None = None,
    fail_fast: bool = False,
    resume: bool = False,
    max_batch: dict[str, Any] | None = None,
    progress: Sink | None = None,
    retry_failed: bool = False,
    energy_protocol: ProtocolSettings | None = None,
) -> list[dict[str, Any]]:
    """Run each case (each group's fp32 first); return the new records, appending each to `out`.

    isolate: each case in its own spawned process (the default, and what `mpbench run` does);
    False trains in this process (faster for tests; no time limit). case_timeout: seconds per
    case (isolated only). fail_fast: stop after the first failed case. resume: skip cases
    that already have a record in `out`, and go on as the run that wrote its last record (its run
    id); retry_failed: with resume, run again the cases whose latest record is not ok (the earlier
    record stays in the file; readers take the latest); `mpbench run` locks `out` meanwhile.
    max_batch: search each runnable case's largest batch first, with these `find_max_batch`
    arguments (e.g. {"memory_limit_mb": 2048}). progress: where the run's events go (the command
    line's live bars); by default each becomes a plain line to `log` (None: nothing is shown).
    energy_protocol: run under the energy protocol (suite.running.energy_protocol, docs/energy.md): the idle
    baseline first, each group's steps extended for long enough energy windows (unrecorded sizing runs), every
    case `repeats` times in a seeded shuffled order, a wait for the idle GPU before each; the cases' records carry
    `repeat`, the cooldown fields and `energy_protocol`.
    Raises RunInterrupted on SIGINT, SIGTERM or SIGHUP, RecordNotWritten when a record cannot be written.
    """
    sink = progress or (PlainLines(log) if log else ignore)

    def note(line: str) -> None:
        sink(Event("note", text=line))

    devices = validate(cases)
    check_timeout(case_timeout)
    if max_batch is not None:
        check_searchable(cases)
    existing: list[dict[str, Any]] = []
    if out is not None:
        out = outputs.check_records_out(out, note)
        existing = store.read(out) if resume else []
    # a resumed run goes on as the run it resumes: one run id in the file, one group in the report
    run_id = (existing[-1].get("run_id") if existing else None) or run_id or store.new_run_id()
    for device in {d for d in devices.values() if d.type == "cuda"}:
        _, _, why = nvml_device(device.index)
        if why:
            note(f"mpbench: NVML unavailable ({why}); NVML memory, energy and GPM figures will be null")
    protocol = None
    if energy_protocol is not None:
        protocol = Protocol(energy_protocol, devices, existing)
        batches_ = Batches()

        def measure(sizing: Case) -> float | None:  # an unrecorded short run: its median step time
            label = f"sizing {sizing.mode:<11} {sizing.model} b{sizing.batch_size}x{sizing.seq_len}"
            sink(Event("case", label, 0, sizing.steps))
            r = _run_one(sizing, devices[sizing.device], label, run_id, sink, batches_, isolate, case_timeout)
            note(f"{label}: {_summary(r)} (not recorded)")
            return r.get("step_time_ms")

        try:  # an interrupt while sizing stops the run as one between cases does: nothing of it is written
            with _interrupts():
                cases = protocol.plan(cases, devices, measure, note)
        except (KeyboardInterrupt, Interrupted) as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            raise RunInterrupted(signum, [], [_describe(c) for c in cases]) from None
    recorded = {case_key(r): r for r in existing}  # the latest record of each case
    have = {k for k, r in recorded.items() if not (retry_failed and r["status"] != "ok")}
    # each mode's fp32: the same case but the mode, on this machine (a resumed file may hold fp32s trained
    # otherwise, or elsewhere)
    references = {_reference_key(r): r for r in existing if r["mode"] == convergence.REFERENCE}
    singles = {_scaling_group(r): r for r in existing if (r.get("world_size") or 1) == 1}
    ddps = {_ddp_twin(r): r for r in existing if r.get("parallel") == "ddp"}
    keys = {c: _key(c, devices) for c in cases}  # once per case: a data file's key reads (hashes) the whole file
    # the protocol's order already runs each repeat's fp32 before the modes compared with it
    todo = [c for c in (cases if protocol else reference_first(cases)) if keys[c] not in have]
    if resume:  # a failed case is not run again unless asked: say so, or say it is
        failed = [r for r in recorded_cases(cases, devices, existing) if r["status"] in store.FAILED]
        again = "run again" if retry_failed else "not run again (--retry-failed reruns them)"
        why = f"; {len(failed)} failed before ({outcomes(failed)}): {again}" if failed else ""
        note(f"mpbench: resuming {out}: {len(cases) - len(todo)} case(s) already recorded, {len(todo)} to run{why}")
    asked: dict[tuple, set[int]] = {}  # the seeds of each set of alike cases (`seeds` of their records)
    for c in cases:
        asked.setdefault(alike(keys[c]), set()).add(c.seed)
    batches = Batches()  # shared across cases when they train in this process
    records: list[dict[str, Any]] = []
    sink(Event("matrix", total=len(todo)))
    with _interrupts():
        for i, case in enumerate(todo, start=1):
            label = f"[{i}/{len(todo)}] {case.mode:<11} {case.model} b{case.batch_size}x{case.seq_len}"
            sink(Event("case", label, 0, case.steps))
            try:
                cooled = _cool(protocol, case, devices[case.device], functools.partial(_prefixed, note, label))
                record = _run_one(case, devices[case.device], label, run_id, sink, batches, isolate, case_timeout)
                if protocol:
                    record |= cooled | {"energy_protocol": protocol.settings_dict(case)}
                if max_batch is not None and record["status"] != "skipped":
                    note(f"{label}: searching the largest batch that fits")
                    record |= find_max_batch(case, timeout_s=case_timeout, progress=sink, **max_batch)
            except (KeyboardInterrupt, Interrupted) as exc:
                signum = getattr(exc, "signum", signal.SIGINT)
                raise RunInterrupted(signum, records, [_describe(c) for c in todo[i - 1 :]]) from None
            if case.mode == convergence.REFERENCE:
                references[_reference_key(record)] = record
            record |= convergence.delta_fields(record, references.get(_reference_key(record)))
            record["seeds"] = len(asked[alike(keys[case])])
            if case.data_parallel is None:
                singles[_scaling_group(record)] = record
            record |= scaling_fields(record, singles.get(_scaling_group(record)))
            if record.get("parallel") == "ddp":
                ddps[_ddp_twin(record)] = record
            record |= memory_saving_fields(record, ddps.get(_ddp_twin(record)), singles.get(_scaling_group(record)))
            record["suspect"] = checks.check(record)  # the last step before writing: every figure is in
            try:
                if out is not None:
                    store.append(out, record)
            except store.NotWritten as exc:  # stop as an interrupt does: what is on disk stays valid
                lost = f"{_describe(case)} ({_summary(record)})"
                raise RecordNotWritten(str(exc), records, lost, [_describe(c) for c in todo[i:]]) from None
            records.append(record)
            sink(Event("done", label, text=_summary(record), status=record["status"]))
            if fail_fast and record["status"] in store.FAILED:
                note(f"mpbench: --fail-fast: stopping after {_describe(case)} ended as {record['status']}")
                break
    return records


def _prefixed(note: Log, label: str, line: str) -> None:
    note(f"{label}: {line}")


def _cool(protocol: Protocol | None, case: Case, device: DeviceInfo, note: Log) -> dict[str, Any]:
    """The protocol's wait before a case (none for a case its mode cannot run here): its cooldown fields."""
    if protocol is None:
        return {}
    if decide(get_mode(case.mode), device, case.emulate)[0]:
        return no_wait("the mode does not run here (skipped): no wait")
    return protocol.before(case, note)


def _reference_key(record: dict[str, Any]) -> tuple:
    """The record's case but its mode, and its machine: its fp32 reference has the same one."""
    return (*pair_key(record), machine(record))


def _key(case: Case, devices: dict[str, DeviceInfo]) -> tuple:
    return case_key(case_fields(case, devices[case.device]))


def recorded_cases(
    cases: Sequence[Case], devices: dict[str, DeviceInfo], records: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The latest record of each case of the matrix, in running order: a resumed run's whole table."""
    latest = {case_key(r): r for r in records}
    keys = dict.fromkeys(_key(c, devices) for c in reference_first(cases))
    return [latest[k] for k in keys if k in latest]


def _describe(case: Case) -> str:
    return f"{case.model}/{case.mode} b{case.batch_size}x{case.seq_len} seed {case.seed}"


def _run_one(
    case: Case, device: DeviceInfo, label: str, run_id: str, sink: Sink, batches: Batches, isolate: bool,
    case_timeout: float | None,
) -> dict[str, Any]:  # fmt: skip
    """The record of one case: skipped with the mode's reason, or trained and its outcome."""
    values: dict[str, Any] = {"run_id": run_id, **case_fields(case, device), **environment(device)}
    t0 = time.perf_counter()
    mode = get_mode(case.mode)
    reason, emulated = decide(mode, device, case.emulate)
    if not reason and case.data_parallel:
        reason = mode.fsdp_plan(case.grad_comm).unavailable if case.data_parallel == "fsdp" else mode.no_data_parallel
    values |= {"emulated": None if reason else emulated is not None, "emulated_reason": None if reason else emulated}
    if reason:
        values |= {"status": "skipped", "reason": reason}
    elif case.data_parallel and launched_by_torchrun():  # the user's torchrun started this rank
        values |= train_here(case, values["flops_per_step"], label, sink)
    elif case.data_parallel:  # always in worker processes: torchrun starts the ranks
        values |= train_distributed(case, values["flops_per_step"], label, case_timeout, sink)
    elif isolate:
        values |= train_isolated(case, values["flops_per_step"], label, case_timeout, sink)
    else:
        values |= train_in_process(case, values["flops_per_step"], label, sink, batches)
    values["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return store.make_record(**values)


def _summary(record: dict[str, Any]) -> str:
    suspect = "; ".join(s["note"] for s in record.get("suspect") or [])
    suspect = f"; SUSPECT: {suspect}" if suspect else ""
    if record["status"] != "ok":
        return f"{record['status']}: {record['reason']}{suspect}"
    return (
        f"ok, {record['step_time_ms']:.1f} ms/step (p10-p90 {record['step_time_p10_ms']:.1f}-"
        f"{record['step_time_p90_ms']:.1f}), final loss {record['final_loss']:.4f}{suspect}"
    )
