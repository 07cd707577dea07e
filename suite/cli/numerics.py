"""`mpbench numerics`: what each number format would do to fp32's tensors, per Linear and tensor role.

The GPT is built from the seed in strict fp32 (the fp32 mode: TF32 off) and trained --steps K steps with
THE train step (`train.train_step`), the fp32 mode's AdamW and the case's learning-rate schedule; the case
has K + 1 steps, so the state and the tensors are those of `mpbench run --modes fp32 --steps K+1` at its
last step. Step K + 1 then runs inside `numerics.watch`: each Linear's input, weight, grad_output and
grad_weight are taken through every format's round trip (`format_stats.tensor_stats_many`: all formats in one
pass over the tensor's chunks of rows) as the hooks hand them over, before the optimizer applies the step;
the tensors are not copied whole, only chunk by chunk, so the memory is a training step's plus a few chunks.

A format that cannot run here (`format_unavailable`) or fails on some tensor (not written yet, an error) is
left out whole, with why, in `numerics_skipped`; the others still run.
Exit codes: 0 statistics computed (some formats may be skipped), 1 nothing could be computed (training
failed, or no format ran), 2 bad input (nothing run), 74 the record could not be written.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from models import GPT
from suite.cli.fidelity import given_sizes
from suite.hardware import DeviceInfo, environment, on_device, resolve_device
from suite.modes import get_mode
from suite.modes.format_stats import TensorStats, tensor_stats, tensor_stats_many
from suite.modes.formats import FORMATS, WHATIF_FORMATS, check_format, format_unavailable
from suite.records import outputs, store
from suite.records.store import NUMERICS_COLUMNS as COLUMNS
from suite.reporting.numerics_table import SATURATION_MARK, UNDERFLOW_MARK
from suite.running.execute import case_fields, failure_reason, out_of_memory
from suite.text import fmt, render, rich_table
from suite.training.case import Case
from suite.training.data import digest, make_corpus
from suite.training.numerics import ROLES, linear_layers, watch
from suite.training.train import TrainLoop

# fp32 steps before the tensors are taken: enough to move off the initial weights' uniform statistics
DEFAULT_STEPS = {"cpu": 20, "cuda": 100}
WIDTH = 100  # the legend's lines, as the tables: a terminal of 100 columns shows them whole
Log = Callable[[str], None]


def add_arguments(p: argparse.ArgumentParser, int_type: Any) -> None:
    """The flags of `mpbench numerics`."""
    p.add_argument("--model", help="preset (default: tiny on CPU, gpt2-small on a GPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int_type, help="sequences per step (default: 4 CPU, 8 GPU)")
    p.add_argument("--seq-len", type=int_type, help="tokens per sequence (default: 64 CPU, 1024 GPU)")
    p.add_argument("--steps", type=int_type, help="fp32 steps trained before the tensors are taken; 0: the "
                   "initial weights (default: 20 CPU, 100 GPU)")  # fmt: skip
    p.add_argument("--seed", type=int_type, default=0, help="weights and batches (default: 0)")
    p.add_argument("--formats", help=f"comma-separated from {', '.join(FORMATS)}, or all "
                   f"(default: {','.join(WHATIF_FORMATS)})")  # fmt: skip
    p.add_argument("--layers", action="store_true", help="per format, the grid of every layer and role")
    p.add_argument("--out", help="JSON Lines file to append the record to (default: none)")


def parse_formats(text: str | None) -> list[str]:
    """The formats --formats names, in its order; ValueError naming an unknown one."""
    if text is None:
        return list(WHATIF_FORMATS)
    if text.strip() == "all":
        return list(FORMATS)
    names = list(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    if not names:
        raise ValueError(f"formats={text!r}: empty; give a comma-separated list such as fp16,bf16, or all")
    for name in names:
        check_format(name)
    return names


def make_case(args: argparse.Namespace, device: DeviceInfo) -> Case:
    """The fp32 case of K + 1 steps: K trained, the last one watched (Case names a bad field)."""
    k = DEFAULT_STEPS[device.type] if args.steps is None else args.steps
    if k < 0:
        raise ValueError(f"steps={k}: must be 0 (the initial weights) or more")
    return Case(mode="fp32", device=args.device, seed=args.seed, steps=k + 1, warmup=0, **given_sizes(args, device))


class Diverged(RuntimeError):
    """fp32's loss turned NaN/inf at `step` (counted from 1): its tensors say nothing of a format."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"fp32 diverged: the loss of step {step} is {loss}")
        self.step = step


@dataclass
class Whatif:
    """Every format's statistics of one watched step, and the formats left out with why."""

    layers: list[str]
    stats: dict[tuple[str, str, str], TensorStats] = field(default_factory=dict)  # (format, layer, role)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: bool = False  # some format raised an error (not merely unavailable or not written yet)
    tensors: int = 0  # tensors the hooks handed over

    def take(self, layer: str, role: str, t: torch.Tensor, formats: list[str]) -> None:
        """Every format's statistics of one tensor; a format that fails is skipped from here on."""
        self.tensors += 1
        live = [f for f in formats if f not in self.skipped]
        with torch.no_grad():
            try:  # every format in one pass: the tensor's chunks are read and converted once, not per format
                many: dict[str, TensorStats] | None = tensor_stats_many(t, live)
            except Exception:  # some format fails on this tensor: each on its own below, only that one skipped
                many = None
            for f in live:
                if many is not None:
                    self.stats[f, layer, role] = many[f]
                    continue
                try:
                    self.stats[f, layer, role] = tensor_stats(t, f)
                except NotImplementedError as exc:
                    self.skipped[f] = f"not implemented: {exc}"
                except Exception as exc:  # one broken format must not end the others
                    self.skipped[f], self.failed = f"failed on {layer} {role}: {failure_reason(exc)}", True

    def columns(self, step: int, formats: list[str]) -> dict[str, list]:
        """The record's numerics_whatif: one row per format that ran x layer x role, equal-length columns."""
        cols: dict[str, list] = {c: [] for c in COLUMNS}
        for f in (f for f in formats if f not in self.skipped):
            for layer in self.layers:
                for role in ROLES:
                    s = self.stats[f, layer, role]
                    row = (step, layer, role, f, s.amax, s.underflow, s.saturation, s.sqnr_db, s.scale)
                    for c, v in zip(COLUMNS, row, strict=True):
                        cols[c].append(v)
        return cols


def measure(case: Case, device: DeviceInfo, batches: torch.Tensor, formats: list[str], log: Log) -> Whatif:
    """Train the case's first K steps in fp32, then take every format's statistics on step K + 1 (batches:
    (K + 1, B, T + 1)). Diverged when fp32's loss turns NaN/inf; the caller's globals are left as they were."""
    mode, dev, k = get_mode("fp32")(device), device.torch_device, case.steps - 1
    # the global generators (nn.Linear's init draws from them) seeded as run_case seeds them, and given back
    # to the caller as they were
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), on_device(dev), mode.numerics():
        model = GPT(case.model_config, seed=case.seed)  # fp32 on the CPU, as every mode starts
        torch.manual_seed(case.seed)
        out = Whatif(linear_layers(model), skipped={f: why for f in formats if (why := format_unavailable(f))})
        live = [f for f in formats if f not in out.skipped]
        want = len(out.layers) * len(ROLES)
        model = mode.prepare(model.to(dev))
        optimizer = mode.make_optimizer(model, case.learning_rate, case.weight_decay)

        def progress(done: int, steps: int, loss: float) -> None:
            if done <= k:  # the watched step says how far its tensors got instead
                log(f"  fp32 step {done}/{k}: loss {loss:.4f}")

        def on_tensor(layer: str, role: str, t: torch.Tensor) -> None:
            out.take(layer, role, t, live)
            if out.tensors % max(1, want // 4) == 0 or out.tensors == want:
                log(f"  step {k + 1}: {out.tensors}/{want} tensors through {len(live)} format(s)")

        # the run's own loop (its rate schedule, its NaN/inf check points), K + 1 steps, the last one watched
        loop = TrainLoop(model, mode, optimizer, dev, k + 1, progress, schedule=case.schedule)
        loop.run(batches[:k])
        with watch(model, out.layers, on_tensor):
            loop.run(batches[k:])  # the optimizer applies it after every hook has run: step K + 1's own tensors
        if loop.diverged_at is not None:  # the statistics of NaN tensors say nothing of a format
            raise Diverged(loop.diverged_at, loop.curves()[0][loop.diverged_at - 1])
    if out.tensors != want:
        raise RuntimeError(f"the hooks handed over {out.tensors} of {want} tensors ({len(out.layers)} Linears x 4)")
    return out


def _result(case: Case, device: DeviceInfo, batches: torch.Tensor, formats: list[str], log: Log) -> dict[str, Any]:
    """Record values: ok with the statistics, or why there are none (skipped, oom, error)."""
    try:
        w = measure(case, device, batches, formats, log)
    except Diverged as exc:
        return {"status": "diverged", "reason": str(exc), "diverged_at_step": exc.step,
                "numerics_reason": "diverged: nothing computed"}  # fmt: skip
    except Exception as exc:  # training failed: nothing to compute on
        status = "oom" if out_of_memory(exc) else "error"
        return {"status": status, "reason": failure_reason(exc), "numerics_reason": f"{status}: nothing computed"}
    cols = w.columns(case.steps - 1, formats)
    values: dict[str, Any] = {"numerics_skipped": w.skipped}
    if cols["step"]:
        why = "a what-if record: every format on fp32's tensors is in numerics_whatif"
        return values | {"status": "ok", "numerics_whatif": cols, "numerics_reason": why}
    why = "no format could be computed here: " + "; ".join(f"{f}: {r}" for f, r in w.skipped.items())
    return values | {"status": "error" if w.failed else "skipped", "reason": why, "numerics_reason": why}


def _rows(cols: dict[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]


def _share(v: float) -> str:
    return "0" if v == 0 else f"{v:.1e}"


def _marks(r: dict[str, Any]) -> str:
    return ("U" if r["underflow"] > UNDERFLOW_MARK else "") + ("S" if r["saturation"] > SATURATION_MARK else "")


def summary(cols: dict[str, list]) -> str:
    """One row per format x role: the median and worst SQNR over layers (and the worst layer), how many
    layers are marked U / S, and the largest underflow and saturation shares."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in _rows(cols):
        groups.setdefault((r["format"], r["role"]), []).append(r)
    out, last = [], None
    for (f, role), rows in groups.items():
        rated = [r for r in rows if not math.isnan(r["sqnr_db"])]  # nan: an all-zero tensor, nothing to lose
        worst = min(rated, key=lambda r: r["sqnr_db"], default=None)
        lost = worst is not None and worst["sqnr_db"] < math.inf  # all exact: no worst layer to name
        median = statistics.median(r["sqnr_db"] for r in rated) if rated else None
        marks = [_marks(r) for r in rows]
        out.append([f if f != last else "", role, fmt(median, ".1f"), fmt(worst and worst["sqnr_db"], ".1f"),
                    worst["layer"] if lost else "-", f"{sum('U' in m for m in marks)}/{len(rows)}",
                    f"{sum('S' in m for m in marks)}/{len(rows)}", _share(max(r["underflow"] for r in rows)),
                    _share(max(r["saturation"] for r in rows))])  # fmt: skip
        last = f
    header = ["format", "role", "median", "worst", "worst layer", "U", "S", "max U", "max S"]
    return render(rich_table(out, header, right={2, 3, 5, 6, 7, 8}))


def grid(cols: dict[str, list], f: str) -> str:
    """Format `f`'s layers down, roles across: the SQNR in dB of each cell, with its U / S marks."""
    cells: dict[str, dict[str, str]] = {}
    for r in _rows(cols):
        if r["format"] == f:
            cells.setdefault(r["layer"], {})[r["role"]] = f"{r['sqnr_db']:.1f} {_marks(r)}".rstrip()
    out = [[layer, *(by_role.get(role, "-") for role in ROLES)] for layer, by_role in cells.items()]
    return render(rich_table(out, ["layer", *ROLES], right={1, 2, 3, 4}))


def _wrapped(text: str) -> str:
    """`text` in lines of at most WIDTH columns, three at most (a long reason is whole in the record)."""
    return "\n".join(textwrap.wrap(text, WIDTH, max_lines=3, placeholder=" ..."))


def legend(k: int, layers: bool) -> list[str]:
    """What the table's figures and marks mean, in lines of at most WIDTH columns."""
    lines = [
        "SQNR: dB of each tensor's round trip, 10 log10(sum x^2 / sum (x - q(x))^2); inf: exact"
        + ("." if layers else "; median, worst: over the layers; worst layer: where the worst is."),
        f"U: more than {UNDERFLOW_MARK:.1%} of the tensor's nonzero elements flush to zero; S: more than "
        f"{SATURATION_MARK:.1%} of its elements lie above the format's largest value after its scaling"
        + ("." if layers else " (U, S: layers so marked; max U, max S: the largest shares over the layers)."),
        f"tensors: fp32's of step {k + 1}, after {k} fp32 step(s).",
    ]
    return [part for line in lines for part in textwrap.wrap(line, WIDTH)]


def cmd_numerics(args: argparse.Namespace) -> int:
    """Every format's statistics on fp32's tensors at step --steps + 1; exit 1 when none could be computed."""
    device = resolve_device(args.device)
    case, formats = make_case(args, device), parse_formats(args.formats)
    case.check_batches_fit()
    out = outputs.check_records_out(args.out) if args.out else None
    k = case.steps - 1
    batches = make_corpus(None, case.model_config.vocab_size).batches(case.steps, case.batch_size, case.seq_len,
                                                                        case.seed, "train")  # fmt: skip
    print(f"mpbench numerics: {case.model}, batch {case.batch_size} x {case.seq_len}, {k} fp32 step(s) then the "
          f"tensors of step {k + 1}, seed {case.seed}, on {device.describe()}; {len(formats)} format(s)",
          file=sys.stderr)  # fmt: skip
    t0 = time.perf_counter()
    values = _result(case, device, batches, formats, lambda line: print(line, file=sys.stderr, flush=True))
    record = store.make_record(run_id=store.new_run_id(), **case_fields(case, device), **environment(device),
                               data_digest=digest(batches), elapsed_s=round(time.perf_counter() - t0, 3),
                               **values)  # fmt: skip
    cols, skipped = record["numerics_whatif"], record["numerics_skipped"] or {}
    if cols:
        ran = [f for f in formats if f not in skipped]
        blocks = [f"{f}:\n{grid(cols, f)}" for f in ran] if args.layers else [summary(cols)]
        print("\n\n".join(blocks) + "\n\n" + "\n".join(legend(k, args.layers)))
    else:  # the formats' reasons follow; a failed training says its own
        print(_wrapped(f"{record['status']}: {'no format could be computed here' if skipped else record['reason']}"))
    for f, why in skipped.items():
        print(_wrapped(f"not computed: {f}: {why}"))
    try:  # after the table: what was computed is shown even when the record cannot be kept
        if out is not None:
            store.append(out, record)
    except store.NotWritten as exc:
        print(f"mpbench numerics: stopped: the record could not be written: {exc}", file=sys.stderr)
        return store.EXIT_NOT_WRITTEN
    if out is not None:
        print(f"\nrecord: {out} (per layer, role and format in numerics_whatif)")
    return 0 if record["status"] == "ok" else 1
