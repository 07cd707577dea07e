"""Run a matrix of cases: validate everything first, then train each case, record each outcome.

A case that fails (out of memory, NaN loss, an exception) becomes a record with its status,
and the run goes on. Each record is appended to the results file as soon as it exists.
"""

from __future__ import annotations

import gc
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from models import GPT
from suite import convergence, results
from suite.case import Case
from suite.data import digest, make_corpus
from suite.hardware import DeviceInfo, environment, resolve_device
from suite.metrics.flops import utilization_fields
from suite.metrics.window import nvml_device
from suite.modes import get_mode
from suite.train import CaseResult, run_case

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def validate(cases: Sequence[Case]) -> dict[str, DeviceInfo]:
    """Everything that can be checked before any training: devices, data files, fit.

    Returns the resolved device of each requested device name; raises ValueError.
    """
    if not cases:
        raise ValueError("no cases to run: give at least one mode")
    devices = {c.device: resolve_device(c.device) for c in cases}
    for c in cases:
        corpus = make_corpus(c.data, c.model_config.vocab_size)
        if hasattr(corpus, "check_fits"):
            corpus.check_fits(c.seq_len)
    return devices


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


def _case_fields(case: Case, device: DeviceInfo) -> dict[str, Any]:
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
        "data": case.data,
        "lr": case.learning_rate,
        "eval_batches": case.eval_batches,
        "eval_every": case.eval_every,
        "weight_decay": case.weight_decay,
        "params": shapes.num_params(),
        "flops_per_token": per_token,
        "flops_per_step": per_token * case.tokens_per_step,
        "tokens_per_step": case.tokens_per_step,
    }


def _result_fields(case: Case, r: CaseResult, device: DeviceInfo, flops_per_step: int) -> dict[str, Any]:
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
    }
    if r.timing is not None:
        fields |= {
            "step_time_ms": r.timing.median_ms,
            "step_time_p10_ms": r.timing.p10_ms,
            "step_time_p90_ms": r.timing.p90_ms,
            "step_time_cv": r.timing.cv,
            "step_times_ms": r.timing.times_ms,
            "tokens_per_s": case.tokens_per_step / (r.timing.median_ms / 1e3),
            **utilization_fields(flops_per_step, r.timing.median_ms, r.compute, device),
        }
    return fields


def _failure_reason(exc: BaseException) -> str:
    tail = "".join(traceback.format_exception(exc)[-3:]).strip().replace("\n", " | ")
    return f"{type(exc).__name__}: {exc} [{tail[-600:]}]"


def reference_first(cases: Sequence[Case]) -> list[Case]:
    """Stable reorder so each group's fp32 case runs before the modes compared with it."""
    first_seen: dict[tuple, int] = {}
    for c in cases:
        first_seen.setdefault(_group(c), len(first_seen))
    return sorted(cases, key=lambda c: (first_seen[_group(c)], c.mode != convergence.REFERENCE))


def _group(case: Case) -> tuple:
    return (case.model, case.device, case.batch_size, case.seq_len, case.steps, case.seed, case.data, case.compile)


def _train_one(
    case: Case, device: DeviceInfo, batches: Batches, label: str, log: Log, flops_per_step: int
) -> dict[str, Any]:
    """Train one runnable case; its outcome (ok, diverged, oom, error) as record values."""
    log(f"{label}: training {case.steps} steps on {device.describe()}")
    corpus, train, heldout, data_digest = batches.get(case)
    values: dict[str, Any] = {"data_digest": data_digest, "loss_floor": corpus.loss_floor}

    def progress(step: int, steps: int, loss: float) -> None:
        log(f"{label}: step {step}/{steps} loss {loss:.4f}")

    try:
        r = run_case(case, device, corpus, train, heldout, progress)
        values |= _result_fields(case, r, device, flops_per_step)
        if r.diverged_at is None:
            values["status"] = "ok"
        else:
            values |= {"status": "diverged", "reason": f"loss became NaN/inf at step {r.diverged_at}"}
    except torch.OutOfMemoryError as exc:
        values |= {"status": "oom", "reason": _failure_reason(exc)}
    except Exception as exc:  # one broken case must not end the run
        values |= {"status": "error", "reason": _failure_reason(exc)}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return values


def run_cases(
    cases: Sequence[Case],
    out: str | Path | None = None,
    log: Log | None = _stderr,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Run each case in turn (each group's fp32 first); return their records and append each
    to `out` if given."""
    log = log or (lambda _line: None)
    devices = validate(cases)
    if out is not None:
        out = results.check_writable(out)
    run_id = run_id or results.new_run_id()
    for device in {d for d in devices.values() if d.type == "cuda"}:
        _, _, why = nvml_device(device.index)
        if why:
            log(f"mpbench: NVML unavailable ({why}); NVML memory, energy and GPM figures will be null")
    cases = reference_first(cases)
    batches = Batches()
    references: dict[tuple, dict[str, Any]] = {}
    records = []
    for i, case in enumerate(cases, start=1):
        device = devices[case.device]
        label = f"[{i}/{len(cases)}] {case.mode:<11} {case.model} b{case.batch_size}x{case.seq_len}"
        values: dict[str, Any] = {"run_id": run_id, **_case_fields(case, device), **environment(device)}
        t0 = time.perf_counter()
        reason = get_mode(case.mode).unavailable_reason(device)
        if reason:
            values |= {"status": "skipped", "reason": reason}
        else:
            values |= _train_one(case, device, batches, label, log, values["flops_per_step"])
        values["elapsed_s"] = round(time.perf_counter() - t0, 3)
        if case.mode == convergence.REFERENCE:
            references[_group(case)] = values
        values |= convergence.delta_fields(values, references.get(_group(case)))
        record = results.make_record(**values)
        if out is not None:
            results.append(out, record)
        records.append(record)
        log(f"{label}: {_summary(record)}")
    return records


def _summary(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record['reason']}"
    return (
        f"ok, {record['step_time_ms']:.1f} ms/step (p10-p90 {record['step_time_p10_ms']:.1f}-"
        f"{record['step_time_p90_ms']:.1f}), final loss {record['final_loss']:.4f}"
    )
