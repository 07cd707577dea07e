"""`mpbench sensitivity MODE`: which layers MODE must keep in bf16, ranked by the loss keeping each one recovers.

Trains fp32 and MODE once per candidate layer policy (suite/reporting/sensitivity.py `candidates`: none, each block
alone, the first and last K blocks, the LM head, the mode's default), per seed, every case on the same weights and
batches, through the matrix runner (each case in its own process; each record appended as the case ends, a failed
case a record with its status). Then the table, the one line "keep these blocks high: ...", or why it cannot be
said, and the chart (a PNG beside the records).
Exit codes: 0 the table was printed (every case ok or skipped), 1 some case failed (its record kept, the others
ranked), 2 bad input (nothing run), 130 / 143 / 129 interrupted (--resume finishes), 74 a record could not be written.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from models import GPTConfig
from suite.hardware import DeviceInfo, resolve_device
from suite.modes import MODES
from suite.policy import DEFAULT_POLICY, default_keep_high
from suite.records import outputs, store
from suite.records.cases import case_key, locked
from suite.reporting.convergence import REFERENCE
from suite.reporting.sensitivity import Candidate, analyse, candidates
from suite.reporting.sensitivity_section import HEADERS, chart, plain_rows, title, words
from suite.running.execute import case_fields
from suite.running.progress import Event, PlainLines, Sink
from suite.running.runner import RecordNotWritten, RunInterrupted, recorded_cases, run_cases, validate
from suite.running.worker import ignore_interrupts
from suite.text import log_to_stderr, shown, table
from suite.training.case import SEED_MAX, Case

# Short on a CPU on purpose: tiny's fp8 or 4-bit sweep (fp32 + 4 to 5 policies, 2 seeds) in a few minutes on two
# cores; long enough that the modes' gaps open past the first steps' noise. A GPU runs the real model.
DEFAULTS = {"cpu": dict(model="tiny", batch_size=8, seq_len=64, steps=100),
            "cuda": dict(model="gpt2-small", batch_size=8, seq_len=1024, steps=200)}  # fmt: skip
WARMUP = 5  # steps left out of timing (the sweep ranks losses; timing is not its figure)


def add_arguments(p: argparse.ArgumentParser, int_type: Any) -> None:
    """The flags of `mpbench sensitivity`."""
    takes = ", ".join(m for m in DEFAULT_POLICY if m in MODES)
    p.add_argument("mode", help=f"a mode that takes a layer policy: {takes}")
    p.add_argument("--model", help="preset (default: tiny on CPU, gpt2-small on a GPU)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, each with its own fp32 (default: 0,1)")
    p.add_argument("--steps", type=int_type, help="steps per case (default: 100 CPU, 200 GPU)")
    p.add_argument("--batch-size", type=int_type, help="sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int_type, help="tokens per sequence (default: 64 CPU, 1024 GPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--out", help="JSON Lines records file (default: results/sensitivity/MODE-MODEL.jsonl)")
    p.add_argument("--resume", action="store_true", help="run only the cases --out has no record of yet")
    p.add_argument("--chart", help="PNG of the ranking (default: --out with .png)")


def check_mode(mode: str) -> str:
    """`mode` when it takes a layer policy; ValueError naming it and the modes that do."""
    takes = [m for m in DEFAULT_POLICY if m in MODES]
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; give a mode that takes a layer policy: {', '.join(takes)}")
    if mode not in DEFAULT_POLICY:
        raise ValueError(f"mode={mode!r} takes no layer policy (it has no low-precision Linears to keep in bf16); "
                         f"give one of {', '.join(takes)}")  # fmt: skip
    return mode


def parse_seeds(text: str) -> list[int]:
    """'0,1' -> [0, 1]; ValueError naming the bad seed and the fix."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"seeds={text!r}: empty; give comma-separated seeds such as 0,1")
    for t in items:
        if not t.isdigit() or int(t) > SEED_MAX:
            raise ValueError(f"seeds={text!r}: {t!r} is not a seed; give whole numbers 0..{SEED_MAX} such as 0,1")
    if len(set(map(int, items))) < len(items):
        raise ValueError(f"seeds={text!r}: a seed is given twice; give each once")
    return [int(t) for t in items]


def plan(args: argparse.Namespace, device: DeviceInfo) -> tuple[list[Case], list[Candidate]]:
    """Per seed (seed-major): fp32, then MODE under each candidate policy. Case refuses a bad size, naming it."""
    mode = check_mode(args.mode)
    seeds = parse_seeds(args.seeds)
    d = DEFAULTS[device.type]
    model = args.model or d["model"]
    config = GPTConfig.preset(model)  # ValueError naming an unknown model
    steps = d["steps"] if args.steps is None else args.steps
    sizes = dict(model=model, device=str(device.torch_device), steps=steps,
                 warmup=min(WARMUP, steps // 2) if isinstance(steps, int) else 0,
                 batch_size=d["batch_size"] if args.batch_size is None else args.batch_size,
                 seq_len=min(d["seq_len"], config.block_size) if args.seq_len is None else args.seq_len)  # fmt: skip
    todo = candidates(mode, config.n_layer)
    cases = []
    for seed in seeds:
        cases.append(Case(mode=REFERENCE, seed=seed, **sizes))
        cases += [Case(mode=mode, seed=seed, keep_high=c.policy, **sizes) for c in todo]
    return cases, todo


def labelled(cases: list[Case], done: set[tuple], device: DeviceInfo, sink: Sink) -> Sink:
    """`sink` with each case's label naming its policy and seed: the runner labels a case "[i/n] mode model size",
    and runs the cases without a record in the order given (fp32 first per seed, as here)."""
    todo = [c for c in cases if case_key(case_fields(c, device)) not in done]
    names = {f"[{i}/{len(todo)}]": f"[{i}/{len(todo)}] {c.mode} {('keep ' + c.keep_high) if c.keep_high else ''} "
             f"seed {c.seed}".replace("  ", " ") for i, c in enumerate(todo, start=1)}  # fmt: skip

    def relabel(e: Event) -> None:
        head = e.label.split(" ", 1)[0]
        sink(Event(e.kind, names.get(head, e.label), e.done, e.total, e.loss, e.step_ms, e.text, e.status))

    return relabel


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Train the sweep (or finish it with --resume), then rank the policies; see the module's exit codes."""
    device = resolve_device(args.device)
    cases, todo = plan(args, device)
    devices = validate(cases)  # bad input ends here, before anything is written
    out = Path(args.out or Path("results") / "sensitivity" / f"{args.mode}-{cases[0].model}.jsonl")
    outputs.check_records_out(out)
    picture = Path(args.chart) if args.chart else out.with_suffix(".png")
    _check_chart(picture)
    n_layer = GPTConfig.preset(cases[0].model).n_layer
    merged = "; ".join(f"{' = '.join(c.also)} = {c.policy}, run once" for c in todo if c.also)
    log_to_stderr(f"mpbench sensitivity: {args.mode} on {cases[0].model} ({n_layer} blocks), {cases[0].steps} steps, "
                  f"seeds {args.seeds}: fp32 + {len(todo)} policies ({', '.join(c.policy for c in todo)})"
                  f"{f'; {merged}' if merged else ''}: {len(cases)} cases, records go to {shown(out)}")  # fmt: skip
    done = {case_key(r) for r in store.read(out)} if args.resume and out.is_file() else set()
    try:
        with locked(out, exclusive=bool(args.resume)):
            new = run_cases(cases, out=out, resume=bool(args.resume),
                            progress=labelled(cases, done, device, PlainLines(log_to_stderr)))  # fmt: skip
    except RunInterrupted as stop:
        ignore_interrupts()
        with contextlib.suppress(OSError):
            print(f"mpbench sensitivity: interrupted by {signal.Signals(stop.signum).name}; {len(stop.done)} "
                  f"record(s) kept in {shown(out)}; to finish: rerun the same command with --resume",
                  file=sys.stderr)  # fmt: skip
        return 128 + stop.signum
    except RecordNotWritten as stop:
        print(f"mpbench sensitivity: stopped: the record of {stop.lost} could not be written: {stop.why}; "
              f"to finish: fix {shown(out)}, then rerun with --resume", file=sys.stderr)  # fmt: skip
        return store.EXIT_NOT_WRITTEN
    whole = recorded_cases(cases, devices, store.read(out))
    default = default_keep_high(args.mode, cases[0].model)  # resolved for the model, as its cases hold it
    result = analyse(args.mode, [r for r in whole if r["mode"] == REFERENCE],
                     [r for r in whole if r["mode"] == args.mode], default)  # fmt: skip
    print(f"layer sensitivity: {title(result)}")
    print(table(plain_rows(result), HEADERS))
    lines = words(result)
    print("\n" + "\n".join(lines))
    print(f"\nrecords: {shown(out)} ({len(new)} written now, {len(whole)} in the sweep)")
    print(f"chart: {shown(chart(result, picture))}")
    return 1 if any(r["status"] in store.FAILED for r in whole) else 0


def _check_chart(path: Path) -> None:
    """The chart's path can take a PNG; ValueError naming it and the fix."""
    if path.suffix.lower() != ".png" or path.is_dir():
        raise ValueError(f"chart={str(path)!r}: the chart is a PNG file; give a file name ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"chart={str(path)!r}: cannot write there ({exc.strerror}); choose another --chart") from None
