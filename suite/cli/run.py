"""`mpbench run`: options from flags and a TOML config, the cases, the run, the summary."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import sys
from pathlib import Path
from typing import Any

from models import GPTConfig
from suite.cli.config import load_config, seed_list, seeds_type
from suite.cli.progress import LiveBars
from suite.cli.summary import print_summary, summary_table  # noqa: F401 (summary_table: for the tests)
from suite.hardware import NATIVE_FLAGS, DeviceInfo, native_flag, resolve_device
from suite.modes import MODES
from suite.policy import DEFAULT_POLICY, FP4_ALLOWED
from suite.records import outputs, store
from suite.records.cases import case_key, locked, outcomes
from suite.records.store import FAILED
from suite.reporting import energy
from suite.reporting.plots import plot_loss_curves
from suite.running.distributed import launched_by_torchrun
from suite.running.energy_protocol import ProtocolSettings
from suite.running.max_batch import check_searchable
from suite.running.runner import RecordNotWritten, RunInterrupted, recorded_cases, run_cases, validate
from suite.running.worker import check_timeout, ignore_interrupts
from suite.text import log_to_stderr, shown
from suite.training.case import PARALLEL, Case
from suite.training.fidelity import check_fits
from suite.training.numerics import default_every
from suite.training.schedule import DEFAULT_FLOOR, DEFAULT_SCHEDULE

# What `mpbench run` does with no arguments, by device: tiny in about a minute on two CPU cores.
# The default modes include bf16 and fp16 ones, which a CPU without native support runs in software
# (13-30x slower than fp32), so the CPU's sizes shrink with each dtype it lacks; every mode gets the
# same sizes, so they stay comparable. On a GPU, GPT-2 small at its full context.
RUN_DEFAULTS = {
    "cpu": dict(model="tiny", batch_size=8, seq_len=128, steps=40, warmup=5),  # bf16 and fp16 native
    "cpu-one-in-software": dict(model="tiny", batch_size=8, seq_len=64, steps=40, warmup=5),
    "cpu-both-in-software": dict(model="tiny", batch_size=4, seq_len=64, steps=40, warmup=5),
    "cuda": dict(model="gpt2-small", batch_size=16, seq_len=1024, steps=100, warmup=10),
}


def run_defaults(device_type: str) -> tuple[dict[str, Any], str | None]:
    """(default sizes for this device, the one-line reason on a CPU)."""
    if device_type == "cuda":
        return RUN_DEFAULTS["cuda"], None
    native = {dtype: native_flag(dtype) for dtype in NATIVE_FLAGS}
    soft = [dtype for dtype, flag in native.items() if flag is None]
    d = RUN_DEFAULTS[("cpu", "cpu-one-in-software", "cpu-both-in-software")[len(soft)]]
    sizes = f"batch {d['batch_size']} x {d['seq_len']} tokens, {d['steps']} steps"
    parts = [f"{dtype} native ({flag})" for dtype, flag in native.items() if flag]
    parts += [f"no native {dtype} (none of {'/'.join(NATIVE_FLAGS[dtype])})" for dtype in soft]
    reason = f"CPU with {'; '.join(parts)}: default {sizes}"
    if soft:
        reason += (
            f"; {' and '.join(soft)} in software (13-30x slower than fp32), so every mode gets these smaller sizes"
        )
    return d, reason


def default_help(key: str) -> str:
    """The default of one size for --help, read from RUN_DEFAULTS: a CPU's depends on its native dtypes."""
    cpu = [RUN_DEFAULTS[k][key] for k in ("cpu", "cpu-one-in-software", "cpu-both-in-software")]
    if len(set(cpu)) == 1:
        on_cpu = f"{cpu[0]} CPU"
    else:  # the first line of a CPU run says which of these it chose and why
        on_cpu = f"on a CPU {cpu[0]} with native bf16 and fp16, {cpu[1]} with one in software, {cpu[2]} with both"
    return f"default: {on_cpu}; {RUN_DEFAULTS['cuda'][key]} GPU"


# flags whose value, when given, overrides the config file (dest name -> config key)
OVERRIDES = ("device", "modes", "batch_size", "seq_len", "steps", "warmup", "seed", "seeds", "lr", "lr_schedule",
             "lr_warmup", "lr_floor", "weight_decay",
             "eval_every", "compile", "data", "out", "case_timeout", "fail_fast", "nproc", "grad_comm",
             "scaling", "fidelity", "parallel", "emulate", "numerics", "numerics_every", "vocab_multiple",
             "energy_protocol", "keep_high", "fp4_recipe")  # fmt: skip


def add_arguments(run: argparse.ArgumentParser, int_type: Any) -> None:
    """The flags of `mpbench run`. Defaults are None so that a config file can fill them."""
    modes = ", ".join(MODES)
    add = run.add_argument
    add(
        "--model",
        help=f"preset(s), comma-separated: {', '.join(GPTConfig.presets())} (default: tiny on CPU, gpt2-small)",
    )
    add(
        "--modes",
        help=f"comma-separated, from {modes}, or all (default: all on a GPU; on a CPU those that "
        "fit in a minute: no 8-bit or pure-bf16 mode)",
    )
    add("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    add("--batch-size", type=int_type, help=f"sequences per step ({default_help('batch_size')})")
    add("--seq-len", type=int_type, help=f"tokens per sequence ({default_help('seq_len')})")
    add("--steps", type=int_type, help=f"optimizer steps, warm-up included ({default_help('steps')})")
    add("--warmup", type=int_type, help=f"steps left out of timing ({default_help('warmup')})")
    add("--seed", type=int_type, help="weights and batch order (default: 0)")
    add(
        "--seeds",
        type=seeds_type,
        help="run every mode once per seed, seeds SEED..SEED+N-1, each paired with its own fp32 (default: 1)",
    )
    add("--lr", type=float, help="AdamW peak learning rate (default: by model size)")
    add(
        "--lr-schedule",
        help="cosine (linear warm-up, then cosine decay to --lr-floor by the last step) | constant (default: cosine)",
    )
    add("--lr-warmup", type=int_type, help="learning-rate warm-up steps (default: a tenth of --steps)")
    add("--lr-floor", type=float, help="the last step's rate as a fraction of the peak (default: 0.1)")
    add("--weight-decay", type=float, help="AdamW decoupled weight decay (default: 0.1)")
    add("--eval-every", type=int_type, help="held-out loss every N steps (default: only at the end)")
    add("--plot", action="store_true", help="also write the loss curves as a PNG beside the records")
    add("--compile", action="store_true", default=None, help="torch.compile the model (compile time is in warm-up)")
    add("--data", help="text file (byte tokens) or .bin of uint16 tokens (default: synthetic corpus)")
    add("--out", help="JSON Lines file to append records to (default: results/runs/RUN_ID.jsonl)")
    add("--config", help="TOML file with the whole matrix (format: docs/running.md, Config file); flags override it")
    add("--resume", metavar="FILE", help="append to FILE, running only the cases it has no record of")
    add(
        "--retry-failed",
        action="store_true",
        help="with --resume: also rerun the cases whose latest record is not ok (earlier records stay; the latest "
        "counts)",
    )
    add("--case-timeout", type=float, help="seconds one case may take before it is stopped (default: none)")
    add("--fail-fast", action="store_true", default=None, help="stop at the first failed case")
    add("--nproc", type=int_type, help="data-parallel processes per case (torchrun; batch size is per process)")
    add("--scaling", help="process-count ladder, e.g. 1,2,4: every case at each count, with scaling efficiency")
    add("--grad-comm", help="gradient all-reduce precision with --nproc > 1: fp32 | bf16 | fp16 (default: fp32)")
    add(
        "--fidelity",
        action="store_true",
        default=None,
        help="also compare each case's first step with a float64 reference (after training, untimed)",
    )
    add(
        "--numerics",
        action="store_true",
        default=None,
        help="also record each Linear's tensor statistics (amax, underflow, saturation, SQNR in the mode's own "
        "formats) on sampled steps, untimed: the first, the last and every max(2, steps/4)-th",
    )
    add("--numerics-every", type=int_type, help="with --numerics: sample every N-th step instead (implies --numerics)")
    add(
        "--vocab-multiple",
        type=int_type,
        help="pad the vocabulary (embedding and LM head rows) to a multiple of N, e.g. 64 for tensor cores "
        "(default: 1, GPT-2's 50257)",
    )
    add(
        "--keep-high",
        help="what the low-precision modes keep in bf16: first:K, last:K (a count or a share such as 15%%), "
        "block:I, lm_head, forward, grad_input, grad_weight, comma-separated, or none (default: each mode's "
        "published recipe; docs/layer-policy.md)",
    )
    add(
        "--fp4-recipe",
        help="the 4-bit modes' switches on: sr (stochastic rounding of gradients), rht (random Hadamard transform "
        "on the weight-gradient GEMM), 2d (16 x 16 weight scales, nvfp4), comma-separated, or none (default: "
        "nvfp4 sr,rht,2d; mxfp4 sr,rht)",
    )
    add(
        "--energy-protocol",
        action="store_true",
        default=None,
        help="measure energy under a protocol: idle GPU before each case, modes in shuffled order, repeats, "
        "long enough windows (docs/energy.md)",
    )
    add(
        "--parallel",
        help="ddp | fsdp (FSDP2 sharding), or both as ddp,fsdp (default: ddp with --nproc > 1); with --nproc 1, "
        "a one-rank torchrun job (the data-parallel path on one device)",
    )
    add(
        "--emulate",
        action="store_true",
        default=None,
        help="run fp8/MXFP8 modes with emulated kernels on a GPU below their capability (numerics only; "
        "a CPU always emulates them)",
    )
    add("--find-max-batch", action="store_true", help="also find each mode's largest batch that fits")
    add("--memory-limit-mb", type=float, help="with --find-max-batch: a batch fits only if its peak stays under this")
    add("--quiet", "-q", action="store_true", help="print only the summary: no progress bars or lines")


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Config file, then explicit flags on top; --resume names the output file."""
    opts = load_config(args.config) if args.config else {}
    opts |= {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    if args.model is not None:  # "" too: refused below, not read as "no flag"
        opts["models"] = [m.strip() for m in args.model.split(",") if m.strip()]
    if args.resume:
        if opts.get("out") and Path(opts["out"]) != Path(args.resume):
            raise ValueError(f"resume={args.resume!r} and out={opts['out']!r}: --resume appends to its own file")
        opts["out"] = args.resume
    return opts


def _parse_modes(text: str) -> list[str]:
    if text.strip() == "all":
        return list(MODES)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"modes: {m!r} is unknown; choose from {', '.join(MODES)} (comma-separated)")
    return _each_once("modes", modes, "fp32,bf16")


def _each_once(field: str, names: list[str], example: str) -> list[str]:
    """`names` when there is at least one and none repeats (a repeat would run one case twice, under one
    case key); ValueError otherwise. An empty list is refused, not read as "the defaults"."""
    if not names:
        raise ValueError(f"{field}: empty; give a comma-separated list such as {example}")
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ValueError(f"{field}: {twice!r} is given twice; give each once")
    return names


def cases_from_options(opts: dict[str, Any]) -> list[Case]:
    """models x modes, unset sizes filled with the defaults of the device found."""
    device = resolve_device(opts.get("device", "auto"))  # the one reading of --device; cases carry the result
    defaults, _ = run_defaults(device.type)
    modes = _parse_modes(opts["modes"]) if "modes" in opts else default_modes(device.type)
    # a Case of a mode that takes no policy (no 4-bit switches) holds none: the flag would change nothing, silently
    for field, takers, what in (("keep_high", DEFAULT_POLICY, "takes a layer policy"),
                                ("fp4_recipe", FP4_ALLOWED, "is a 4-bit one")):  # fmt: skip
        if opts.get(field) and not any(mode in takers for mode in modes):
            flag = "--" + field.replace("_", "-")
            raise ValueError(
                f"{field}={opts[field]!r}: {flag} given but none of the modes ({', '.join(modes)}) {what}; add one "
                f"of {', '.join(takers)} to --modes, or drop {flag}"
            )
    models = _each_once("models", opts["models"], "tiny,gpt2-small") if "models" in opts else [defaults["model"]]
    steps = opts.get("steps", defaults["steps"])
    # default warm-up never takes more than half the steps, so a short run still times some
    warmup = opts.get("warmup", min(defaults["warmup"], steps // 2) if isinstance(steps, int) else 0)
    cases = []
    strategies = _parallel(opts)
    # one process trains plainly (the 1 of --scaling too), unless --nproc 1 names --parallel: then it is
    # a one-rank torchrun job, the data-parallel code path on one device
    one_rank = opts.get("nproc") == 1 and "parallel" in opts
    ladder = [(n, p) for n in _ladder(opts) for p in (strategies if n > 1 or one_rank else [None])]
    # seed-major: each seed's whole matrix, its fp32 first (the runner's reference_first), then the next seed's
    for seed, (nproc, parallel), model in itertools.product(seed_list(opts), ladder, models):
        block = GPTConfig.preset(model).block_size if model in GPTConfig.presets() else defaults["seq_len"]
        fixed = dict(device=str(device.torch_device), steps=steps, warmup=warmup, seed=seed,
                     batch_size=opts.get("batch_size", defaults["batch_size"]),
                     seq_len=opts.get("seq_len", min(defaults["seq_len"], block)),
                     eval_every=opts.get("eval_every", 0), compile=opts.get("compile", False),
                     data=opts.get("data"), lr=opts.get("lr"), weight_decay=opts.get("weight_decay", 0.1),
                     lr_schedule=opts.get("lr_schedule", DEFAULT_SCHEDULE), lr_warmup=opts.get("lr_warmup"),
                     lr_floor=opts.get("lr_floor", DEFAULT_FLOOR),
                     nproc=nproc, grad_comm=opts.get("grad_comm", "fp32"), parallel=parallel,
                     fidelity=bool(opts.get("fidelity")), emulate=bool(opts.get("emulate", False)),
                     numerics_every=_numerics_every(opts, steps),
                     vocab_multiple=opts.get("vocab_multiple", 1), keep_high=opts.get("keep_high", ""),
                     fp4_recipe=opts.get("fp4_recipe", ""))  # fmt: skip
        cases += [Case(model=model, mode=mode, **fixed) for mode in modes]
    return cases


def _numerics_every(opts: dict[str, Any], steps: object) -> object:
    """--numerics-every N as given (0: off; the Case checks it), else --numerics's default, else 0."""
    if opts.get("numerics_every") is not None:
        return opts["numerics_every"]
    if opts.get("numerics") and isinstance(steps, int) and not isinstance(steps, bool):
        return default_every(steps)
    return 0


def _parallel(opts: dict[str, Any]) -> list[str | None]:
    """--parallel ddp, fsdp or ddp,fsdp (DDP first: each FSDP record's memory is compared with it)."""
    items = [t.strip() for t in str(opts.get("parallel", "ddp")).split(",") if t.strip()]
    bad = [t for t in items if t not in PARALLEL]
    if not items or bad:
        what = f"{bad[0]!r} is unknown" if bad else "empty"
        raise ValueError(f"parallel={opts.get('parallel')!r}: {what}; give ddp, fsdp, or both as ddp,fsdp")
    return sorted(set(items), key=PARALLEL.index)


def default_modes(device_type: str) -> list[str]:
    """Every mode on a GPU; on a CPU the modes whose `cpu_default` says they fit the minute."""
    return [name for name, mode in MODES.items() if device_type != "cpu" or mode.cpu_default]


def _ladder(opts: dict[str, Any]) -> list[int]:
    """Process counts to run every case at: --scaling 1,2,4, else --nproc, else 1."""
    if opts.get("scaling"):
        if opts.get("nproc"):
            raise ValueError("nproc and scaling: give one; --scaling 1,2,4 runs every count")
        items = [t.strip() for t in str(opts["scaling"]).split(",") if t.strip()]
        if not items or not all(t.isdigit() and int(t) >= 1 for t in items):
            raise ValueError(f"scaling={opts['scaling']!r}: expected process counts such as 1,2,4")
        return sorted({int(t) for t in items})  # 1 first: the others' efficiency needs it
    return [opts.get("nproc", 1)]


def cmd_run(args: argparse.Namespace) -> int:
    if args.memory_limit_mb is not None and (not args.find_max_batch or not args.memory_limit_mb > 0):
        raise ValueError(f"memory_limit_mb={args.memory_limit_mb}: needs --find-max-batch and a positive MiB figure")
    if args.retry_failed and not args.resume:
        raise ValueError("retry_failed: reruns the failed cases of a records file; give it with --resume FILE")
    opts = options(args)
    if launched_by_torchrun():
        return _run_as_rank(opts)
    cases = cases_from_options(opts)
    run_id = store.new_run_id()  # the file's name and the records' run_id agree (a resume keeps the file's)
    out = Path(opts.get("out") or Path("results") / "runs" / f"{run_id}.jsonl")
    devices = validate(cases)  # bad input ends here, before anything is written
    _check_fidelity(cases, devices)
    check_timeout(opts.get("case_timeout"))
    if args.find_max_batch:
        check_searchable(cases)
    outputs.check_records_out(out)  # refuses a file of another kind; repairs a torn last line
    _, why = run_defaults(devices[cases[0].device].type)
    if why and not {"batch_size", "seq_len", "steps"} <= opts.keys() and not args.quiet:
        print(f"mpbench: {why} (flags override them)", file=sys.stderr)
    protocol = ProtocolSettings() if opts.get("energy_protocol") else None
    if not args.quiet:
        times = f" x {protocol.repeats} repeats (energy protocol, docs/energy.md)" if protocol else ""
        print(f"mpbench: {len(cases)} case(s){times}, records go to {out}", file=sys.stderr)
    # a terminal gets live bars; a pipe or a CI log the plain lines; --quiet nothing until the summary
    live = LiveBars() if not args.quiet and LiveBars.available() else None
    try:
        search = {"memory_limit_mb": args.memory_limit_mb} if args.find_max_batch else None
        # a resume reads the file to decide what to run: it needs the file to itself
        with locked(out, exclusive=bool(args.resume)), live or contextlib.nullcontext():
            done = run_cases(cases, out=out, run_id=run_id, case_timeout=opts.get("case_timeout"),
                             fail_fast=bool(opts.get("fail_fast")), resume=bool(args.resume), max_batch=search,
                             log=None if args.quiet else log_to_stderr, progress=live,
                             retry_failed=args.retry_failed, energy_protocol=protocol)  # fmt: skip
    except RunInterrupted as stop:
        ignore_interrupts()  # a second Ctrl-C must not cut this message or the exit short
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone; a log still gets the line
            print(
                f"mpbench: interrupted by {signal.Signals(stop.signum).name}; {len(stop.done)} finished record(s) "
                f"of this run kept in {out}; not finished: {', '.join(stop.not_run)}; "
                f"to finish: rerun the same command with --resume {out}",
                file=sys.stderr,
            )
        return 128 + stop.signum  # 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP
    except RecordNotWritten as stop:
        print(
            f"mpbench: stopped: the record of {stop.lost} could not be written: {stop.why}; {len(stop.done)} "
            f"finished record(s) of this run kept in {out}; not run: {', '.join(stop.not_run) or 'none'}; "
            f"to finish: make room or fix {out}, then rerun the same command with --resume {out}",
            file=sys.stderr,
        )
        return store.EXIT_NOT_WRITTEN
    # a resumed run's table is the whole run's: the speed-ups need the fp32 case recorded before
    whole = done
    if args.resume:  # the protocol's cases (repeats, sized steps) are the run's, not `cases`: read them back
        whole = (
            _protocol_records(store.read(out), done) if protocol else recorded_cases(cases, devices, store.read(out))
        )
    if args.resume and not done:
        print("nothing to run: every case already has a record")
    print_summary(whole)
    if protocol:
        print("\nenergy per token under the energy protocol (median over the repeats):")
        print("\n".join(f"  {line}" for line in energy.lines(whole)) or "  no ok case under the protocol")
    print(f"\nrecords: {shown(out)} ({len(done)} written)")
    if args.plot and whole:
        print(f"loss curves: {plot_loss_curves(whole, out.with_suffix('.png'))}")
    loss_floor = next((r["loss_floor"] for r in whole if r["loss_floor"] is not None), None)
    if loss_floor is not None:
        print(f"loss floor of the synthetic corpus (optimal loss): {loss_floor:.4f} nats/token")
    ran = {case_key(r) for r in done}
    kept = [r for r in whole if r["status"] in FAILED and case_key(r) not in ran]
    if kept:  # the exit code says the run is not clean: say why, and how to finish it
        print(f"mpbench: {len(kept)} case(s) failed before this resume and were not run again ({outcomes(kept)}); "
              f"rerun them with --resume {out} --retry-failed", file=sys.stderr)  # fmt: skip
    return 1 if any(r["status"] in FAILED for r in whole) else 0


def _protocol_records(records: list[dict[str, Any]], done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A resumed protocol run's whole table: the latest record of each protocol case of the resumed run (its id)."""
    run_id = done[0]["run_id"] if done else next((r["run_id"] for r in reversed(records)), None)
    latest = {case_key(r): r for r in records if r.get("run_id") == run_id and r.get("energy_protocol")}
    return list(latest.values())


def _check_fidelity(cases: list[Case], devices: dict[str, DeviceInfo]) -> None:
    """--fidelity compares one process's step: refuse data parallelism and models that cannot fit twice."""
    for case in cases:
        if case.fidelity and case.data_parallel:
            raise ValueError("fidelity: compares a one-process step; drop --nproc/--scaling or --fidelity")
    for case in {(c.model, c.device): c for c in cases if c.fidelity}.values():
        check_fits(case, devices[case.device])


def _run_as_rank(opts: dict[str, Any]) -> int:
    """Under the user's torchrun (one node or many): every rank runs every case together with
    the others; rank 0 writes the records and prints the table."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if opts.get("energy_protocol"):  # its waits and repeats are the parent's, which torchrun's ranks have not
        raise ValueError("energy_protocol: not available under torchrun; run mpbench run --energy-protocol --nproc N")
    if opts.get("nproc") not in (None, world) or opts.get("scaling"):
        raise ValueError(f"nproc/scaling: under torchrun the world size ({world}) is the process count; drop them")
    cases = cases_from_options(opts | {"nproc": world})
    out = Path(
        opts.get("out") or Path("results") / "runs" / f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}.jsonl"
    )
    validate(cases)
    lead = rank == 0
    done = run_cases(cases, out=out if lead else None, log=log_to_stderr if lead else None, isolate=False)
    if lead:
        print_summary(done)
        print(f"\nrecords: {out} ({len(done)} written; world size {world})")
    return 1 if any(r["status"] in FAILED for r in done) else 0
