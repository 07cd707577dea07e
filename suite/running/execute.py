"""Training one case and turning its outcome into record values (ok, diverged, oom, error).

Used in the worker process of each case (`suite.running.worker`) and, for tests and scripting,
directly in the caller's process.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models import GPT
from suite.hardware import DeviceInfo, empty_cache, resolve_device
from suite.metrics import roofline_predict as roofline
from suite.metrics.flops import mode_dtype_share, utilization_fields
from suite.modes import get_mode
from suite.policy import gemm_kinds
from suite.running.progress import Event, Sink, step_events
from suite.training import fidelity
from suite.training.case import Case
from suite.training.data import digest, file_sha256, make_corpus
from suite.training.train import CaseResult, run_case

Log = Callable[[str], None]
MIB = 2**20


class Batches:
    """Train and held-out batches, built once per (data, sizes, seed) and shared by modes."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple] = {}

    def get(self, case: Case) -> tuple:
        vocab = case.model_config.vocab_size
        key = (case.data, vocab, case.batch_size, case.seq_len, case.steps, case.seed, case.eval_batches)
        if key not in self._cache:
            self._cache.clear()  # keep one set: batches for big models are large
            corpus = make_corpus(case.data, vocab)
            train = corpus.batches(case.steps, case.batch_size, case.seq_len, case.seed, "train")
            heldout = corpus.batches(case.eval_batches, case.batch_size, case.seq_len, case.seed, "heldout")
            self._cache[key] = (corpus, train, heldout, digest(train))
        return self._cache[key]


def case_fields(case: Case, device: DeviceInfo) -> dict[str, Any]:
    """Record values that follow from the case alone: its settings, sizes and analytic FLOPs."""
    cfg = case.model_config
    with torch.device("meta"):  # shapes only: no memory, no init
        shapes = GPT(cfg)
    per_token = shapes.flops_per_token(case.seq_len)
    return {
        "model": case.model,
        "mode": case.mode,
        "device": str(device.torch_device),
        "batch_size": case.batch_size,
        "seq_len": case.seq_len,
        "steps": case.steps,
        "warmup": case.warmup,
        "seed": case.seed,
        "compile": case.compile,
        # the file's absolute path and its content: one case under any spelling of the path
        "data": str(Path(case.data).resolve()) if case.data else None,
        "data_sha256": file_sha256(case.data) if case.data else None,
        "lr": case.learning_rate,  # the peak rate under a schedule
        "lr_schedule": case.lr_schedule,
        "lr_warmup_steps": case.schedule.warmup,
        "lr_floor": case.schedule.floor,
        "eval_batches": case.eval_batches,
        "eval_every": case.eval_every,
        "numerics_every": case.numerics_every,
        "vocab_multiple": case.vocab_multiple,
        "repeat": case.repeat,
        "keep_high": case.keep_high,
        "fp4_recipe": case.fp4_recipe,
        "world_size": case.nproc,
        "grad_comm": case.grad_comm if case.data_parallel else None,
        "parallel": case.data_parallel,
        "weight_decay": case.weight_decay,
        "params": shapes.num_params(),
        "flops_per_token": per_token,
        "flops_per_step": per_token * case.tokens_per_step,
        "tokens_per_step": case.tokens_per_step,
    }


def result_fields(case: Case, r: CaseResult, device: DeviceInfo, flops_per_step: int) -> dict[str, Any]:
    """Record values from what training produced: dtypes, trackers, speed, FLOP/s, convergence."""
    fields: dict[str, Any] = {
        "compute_dtype": r.compute,
        "init_digest": r.init_digest,
        **r.storage,
        **r.measurements,
        "loss_curve": r.loss_curve,
        "initial_loss": r.loss_curve[0] if r.loss_curve else None,
        "final_loss": r.final_loss,
        "overflow_steps": r.skipped_steps,
        "loss_scale_curve": r.loss_scale_curve,
        "eval_curve": r.eval_curve,
        "diverged_at_step": r.diverged_at,
        **r.numerics,  # numerics, numerics_steps, numerics_formats, numerics_reason (mpbench run --numerics)
    }
    if r.timing is not None:
        fields |= {
            "step_time_ms": r.timing.median_ms,
            "step_time_p10_ms": r.timing.p10_ms,
            "step_time_p90_ms": r.timing.p90_ms,
            "step_time_cv": r.timing.cv,
            "step_times_ms": r.timing.times_ms,
            "tokens_per_s": case.tokens_per_step / (r.timing.median_ms / 1e3),
        }
        # MFU per GPU: each of the nproc processes does 1/nproc of the step's FLOPs
        kept = len(gemm_kinds(case.keep_high))
        share = mode_dtype_share(case.model_config, case.seq_len, r.storage.get("converted_layers"), kept)
        fields |= utilization_fields(flops_per_step // case.nproc, r.timing.median_ms, r.compute, device, share)
        # a mode whose case left its native kernels (nvfp4 outside torchao's contract) says so in its storage
        why = r.storage.get("emulated_reason") or get_mode(case.mode).emulation_reason(device)
        fields |= emulated_speed_fields(why)
        fields |= roofline_fields(case, device, r.storage.get("converted_layers"))
    return fields


def roofline_fields(case: Case, device: DeviceInfo, converted: list[str] | None) -> dict[str, Any]:
    """The predicted lower bound on the step and the speed-ups it predicts (suite.metrics.roofline_predict),
    per GPU under data parallelism (batch_size is per process); a failure to predict is a reason, never the
    case's failure."""
    try:
        return roofline.record_fields(case.model_config, case.batch_size, case.seq_len, case.mode, device,
                                      converted, case.nproc, case.data_parallel, case.keep_high,
                                      case.fp4_recipe)  # fmt: skip
    except Exception as exc:
        return {"roofline_reason": f"the roofline could not be computed: {type(exc).__name__}: {exc}"}


def emulated_speed_fields(why: str | None) -> dict[str, Any]:
    """MFU and MAMF nulled, with the reason, when the mode ran on emulated kernels; else nothing."""
    if why is None:
        return {}
    reason = f"emulated kernels ({why}): the step time is not a speed"
    return {"mfu": None, "mfu_bf16": None, "mfu_blended": None, "mfu_reason": reason, "mamf": None,
            "mamf_reason": reason}  # fmt: skip


def failure_reason(exc: BaseException) -> str:
    """Exception type and message, then the tail of the traceback, on one line."""
    tail = "".join(traceback.format_exception(exc)[-3:]).strip().replace("\n", " | ")
    return f"{type(exc).__name__}: {exc} [{tail[-600:]}]"


# What torch's CPU allocator raises when the host has no memory left (a plain RuntimeError, not
# torch.OutOfMemoryError): "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes"
# (posix_memalign failing), or "not enough memory" where malloc returns nothing.
HOST_OOM = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device or the host ran out of memory (status `oom`, not `error`)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in HOST_OOM)


def _oom_values(case: Case, device: DeviceInfo, exc: BaseException) -> dict[str, Any]:
    """An `oom` record: the batch and the device memory at the time of the failure."""
    values: dict[str, Any] = {"status": "oom"}
    where = f"at batch {case.batch_size} x {case.seq_len}"
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device.index) / MIB
        reserved = torch.cuda.memory_reserved(device.index) / MIB
        total = torch.cuda.get_device_properties(device.index).total_memory / MIB
        values |= {"peak_mem_allocated_mb": torch.cuda.max_memory_allocated(device.index) / MIB,
                   "peak_mem_reserved_mb": torch.cuda.max_memory_reserved(device.index) / MIB}  # fmt: skip
        where += f": allocated {allocated:,.0f} MiB, reserved {reserved:,.0f} MiB of {total:,.0f} MiB"
    values["reason"] = f"out of memory {where}; {failure_reason(exc)}"
    return values


def fidelity_values(case: Case, device: DeviceInfo, batches: torch.Tensor, log: Log, label: str) -> dict[str, Any]:
    """The float64 comparison of `mpbench run --fidelity`, after training and outside every timed
    window: a fresh model from the case's seed, the case's first batch, so the step compared is
    the run's own first step. Failing never fails the case: `fidelity_reason` says why."""
    if not case.fidelity:
        return {"fidelity_reason": "not requested (mpbench run --fidelity, or mpbench fidelity)"}
    log(f"{label}: comparing step 1 with a float64 reference")
    try:
        return fidelity.record_fields(fidelity.measure(case, device, batches))
    except Exception as exc:
        return {"fidelity_reason": f"the float64 comparison failed: {failure_reason(exc)}"}
    finally:
        gc.collect()


def train_in_process(
    case: Case,
    flops_per_step: int,
    label: str,
    emit: Sink,
    batches: Batches | None = None,
    before: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train one runnable case here, reporting progress events to `emit`; its outcome as record
    values. Never raises for a failed case."""
    device = resolve_device(case.device)
    emit(Event("start", label, 0, case.steps, text=device.describe()))
    values: dict[str, Any] = {}
    try:  # from the batches on: a data file gone since validation, or no memory for them, is this case's record
        corpus, train, heldout, data_digest = (batches or Batches()).get(case)
        values |= {"data_digest": data_digest, "loss_floor": corpus.loss_floor}
        if before:
            before()
        r = run_case(case, device, corpus, train, heldout, step_events(label, emit))
        values |= result_fields(case, r, device, flops_per_step)
        values |= fidelity_values(case, device, train[:1], lambda line: emit(Event("note", text=line)), label)
        if r.diverged_at is None:
            values["status"] = "ok"
        else:
            values |= {"status": "diverged", "reason": f"loss became NaN/inf at step {r.diverged_at}"}
    except Exception as exc:  # one broken case must not end the run
        values |= (
            _oom_values(case, device, exc) if out_of_memory(exc) else {"status": "error", "reason": failure_reason(exc)}
        )
    finally:
        gc.collect()
        empty_cache(device.torch_device)  # with the case's GPU current (a context on GPU 0 otherwise)
    return values
