"""`mpbench fidelity`: each mode's first steps against a float64 reference step, in this process.

One row per mode of the registry (or of --modes): `ok` with its figures, `skipped` with the
mode's reason, or `error` / `oom` with what went wrong; one mode failing never stops the others.
Exit codes: 0 every mode ok or skipped, 1 some mode failed, 2 bad input (nothing run).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

import torch

from suite.hardware import DeviceInfo, empty_cache, environment, resolve_device
from suite.modes import MODES, get_mode
from suite.records import outputs, store
from suite.running.execute import case_fields, failure_reason
from suite.text import fmt, table
from suite.training import fidelity
from suite.training.case import Case
from suite.training.data import digest, make_corpus

# Small by default: float64 on a CPU is slow, and fp16 there is ~30x slower than fp32.
DEFAULTS = {"cpu": dict(model="tiny", batch_size=4, seq_len=64), "cuda": dict(model="gpt2-small", batch_size=8,
            seq_len=1024)}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser, int_type: Any) -> None:
    """The flags of `mpbench fidelity`."""
    p.add_argument("--model", help="preset (default: tiny on CPU, gpt2-small on a GPU)")
    p.add_argument("--modes", default="all", help=f"comma-separated from {', '.join(MODES)}, or all (default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int_type, help="sequences per step (default: 4 CPU, 8 GPU)")
    p.add_argument("--seq-len", type=int_type, help="tokens per sequence (default: 64 CPU, 1024 GPU)")
    p.add_argument("--steps", type=int_type, default=1, help="steps compared, each from the mode's own weights")
    p.add_argument("--seed", type=int_type, default=0, help="weights and batches (default: 0)")
    p.add_argument("--out", help="JSON Lines file to append one record per mode to (default: none)")


def _cases(args: argparse.Namespace, device: DeviceInfo) -> list[Case]:
    names = list(MODES) if args.modes.strip() == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    if not names:
        raise ValueError("modes: empty; give a comma-separated list such as fp32,bf16, or all")
    for name in names:
        get_mode(name)  # ValueError naming the unknown mode
    sizes = dict(device=args.device, steps=args.steps, warmup=0, seed=args.seed, **given_sizes(args, device))
    return [Case(mode=name, **sizes) for name in names]  # Case names a bad field


def given_sizes(args: argparse.Namespace, device: DeviceInfo) -> dict[str, Any]:
    """--model, --batch-size and --seq-len as given, else this device type's defaults. A given 0 stays 0, so
    that Case refuses it (`or` would have quietly run the default)."""
    given = dict(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len)
    return {name: DEFAULTS[device.type][name] if value is None else value for name, value in given.items()}


def _one(case: Case, device: DeviceInfo, batches: torch.Tensor) -> dict[str, Any]:
    """Record values of one mode: ok with the figures, skipped, oom or error."""
    reason = get_mode(case.mode).unavailable_reason(device)
    if reason:
        return {"status": "skipped", "reason": reason, "fidelity_reason": f"skipped: {reason}"}
    try:
        return {"status": "ok", **fidelity.record_fields(fidelity.measure(case, device, batches))}
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return {"status": "oom", "reason": failure_reason(exc), "fidelity_reason": "out of memory"}
    except Exception as exc:  # one broken mode must not end the others
        return {"status": "error", "reason": failure_reason(exc), "fidelity_reason": "the comparison failed"}
    finally:
        gc.collect()
        empty_cache(device.torch_device)  # with the case's GPU current (a context on GPU 0 otherwise)


def _worst(r: dict[str, Any]) -> str:
    """The tensor with the largest gradient error at the last step compared."""
    rows = [x for x in r.get("fidelity_layers") or [] if x["step"] == r["steps"] and "grad_rel_err" in x]
    if not rows:
        return "-"
    top = max(rows, key=lambda x: float(x["grad_rel_err"]))
    return f"{top['tensor']} {float(top['grad_rel_err']):.2e}"


def summary(records: list[dict[str, Any]]) -> str:
    """One line per mode: the global figures of the last step compared."""
    rows = [
        [r["mode"], r["status"], fmt(r.get("grad_cos_vs_fp64"), ".7f"), fmt(r.get("grad_rel_err_vs_fp64"), ".2e"),
         fmt(r.get("grad_max_abs_err_vs_fp64"), ".2e"), fmt(r.get("update_cos_vs_fp64"), ".5f"),
         fmt(r.get("update_rel_err_vs_fp64"), ".2e"), fmt(r.get("grad_underflow_frac"), ".2e"),
         fmt(r.get("scaled_grad_underflow_frac"), ".2e"), fmt(r.get("grad_overflow_frac"), ".2e"),
         fmt(r.get("fidelity_loss_diff"), "+.2e"), fmt(r.get("fidelity_loss_scale"), ".0f"), _worst(r),
         (r.get("reason") or r.get("fidelity_reason") or "")[:60]]
        for r in records
    ]  # fmt: skip
    header = ["mode", "status", "grad cos", "grad rel err", "grad max err", "upd cos", "upd rel err", "underflow",
              "underflow scaled", "inf/nan", "loss - fp64", "scale", "worst tensor (grad rel err)",
              "reason"]  # fmt: skip
    return table(rows, header)


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Compare every mode's first --steps steps with float64; exit 1 if a mode failed."""
    device = resolve_device(args.device)
    cases = _cases(args, device)
    plan = fidelity.check_fits(cases[0], device)  # one line naming the field and exit 2 when nothing fits
    out = outputs.check_records_out(args.out) if args.out else None
    c = cases[0]
    batches = make_corpus(None, c.model_config.vocab_size).batches(c.steps, c.batch_size, c.seq_len, c.seed, "train")
    print(f"mpbench fidelity: {c.model}, batch {c.batch_size} x {c.seq_len}, {c.steps} step(s), seed {c.seed}, "
          f"on {device.describe()}; float64 reference in {plan.passes} pass(es) of up to {plan.rows} row(s), "
          f"about {plan.need_bytes / 2**30:.1f} of {plan.have_bytes / 2**30:.1f} GiB", file=sys.stderr)  # fmt: skip
    run_id, env, records = store.new_run_id(), environment(device), []
    for case in cases:
        t0 = time.perf_counter()
        values = _one(case, device, batches)
        values |= {"run_id": run_id, **case_fields(case, device), **env, "data_digest": digest(batches),
                   "elapsed_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
        record = store.make_record(**values)
        try:
            if out is not None:
                store.append(out, record)
        except store.NotWritten as exc:
            print(f"mpbench fidelity: stopped: the record of {case.mode} could not be written: {exc}; "
                  f"{len(records)} record(s) kept in {out}", file=sys.stderr)  # fmt: skip
            return store.EXIT_NOT_WRITTEN
        records.append(record)
        print(f"  {case.mode}: {record['status']} in {record['elapsed_s']:.1f} s", file=sys.stderr)
    print(summary(records))
    if out is not None:
        print(f"\nrecords: {out} ({len(records)} written; per-tensor rows in fidelity_layers)")
    return 1 if any(r["status"] in store.FAILED for r in records) else 0
