"""The record schema and an append-only JSON Lines store.

One record per case, one JSON object per line, flat top-level keys, so that
`pandas.read_json(path, lines=True)` loads a results file directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import math
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from suite.records import validate

if TYPE_CHECKING:  # pandas is imported only by `load`: importing this module stays cheap
    import pandas

SCHEMA = "mpbench.record/1"
STATUSES = ("ok", "skipped", "oom", "diverged", "error", "timeout")
FAILED = ("oom", "diverged", "error", "timeout")  # a case that ran and did not finish well

# Every record has every key, in this order; a value that was not measured is None and,
# for a case that did not finish, `reason` says why.
# fmt: off
FIELDS: tuple[str, ...] = (
    # identity
    "schema", "run_id", "timestamp", "git_commit", "git_dirty",
    # the case
    "model", "mode", "device", "batch_size", "seq_len", "steps", "warmup", "seed",
    "compile", "data", "data_sha256", "lr", "lr_schedule", "lr_warmup_steps", "lr_floor", "weight_decay",
    "eval_batches", "eval_every", "numerics_every", "world_size", "grad_comm", "parallel", "vocab_multiple",
    "repeat", "keep_high", "fp4_recipe",
    # outcome
    "status", "reason", "elapsed_s",
    # self-check (suite/records/checks.py): rules the figures break, [] when none
    "suspect",
    # model and precision
    "params", "flops_per_token", "flops_per_step", "tokens_per_step", "compute_dtype",
    "weight_dtypes", "grad_dtypes", "optimizer_state_dtypes", "init_digest", "data_digest",
    # emulated kernels (fp8/MXFP8 without the hardware): numerics real, timings not a speed
    "emulated", "emulated_reason", "converted_layers", "unconverted_layers",
    # every Linear's GEMMs and the format each ran in: {fqn: {"forward": ..., "grad_input": ..., "grad_weight": ...}}
    "layer_formats",
    # speed (ms; timed steps only)
    "timed_steps", "step_time_ms", "step_time_p10_ms", "step_time_p90_ms", "step_time_cv",
    "step_times_ms", "tokens_per_s",
    # FLOP/s and utilization (fractions)
    "achieved_flops", "peak_flops", "peak_flops_dtype", "mfu", "mfu_bf16", "mfu_reason",
    # the share of the counted FLOPs that ran in the mode's dtype (8-bit modes: the converted Linears), and
    # MFU against the peak of that mix of dtypes (the rest at the bf16 peak)
    "mode_dtype_flops_share", "peak_flops_blended", "mfu_blended",
    "mamf", "mamf_flops", "mamf_reason",
    # roofline (suite/metrics/roofline.py): the least step time the case's GEMMs, casts and memory-bound rest
    # allow at this device's peaks and bandwidth (datasheet on a GPU, `mpbench calibrate` on a CPU), the
    # speed-ups those bounds predict against bf16 and fp32, and what went in (ceilings, their sources, totals)
    "predicted_step_ms", "predicted_gemm_ms", "predicted_cast_ms", "predicted_rest_ms",
    "predicted_speedup_vs_bf16", "predicted_speedup_vs_fp32", "roofline_inputs", "roofline_reason",
    # the optimizer that ran: "torch AdamW (fused)", "(foreach)", "(for-loop)", or a mode's own
    "optimizer_impl",
    "tensor_core_util", "tensor_core_util_hmma", "tensor_core_util_imma", "tensor_core_util_source",
    "tensor_core_util_reason", "tensor_core_top_kernels",
    # memory (MiB)
    "peak_mem_mb", "peak_mem_source", "peak_mem_device_mb", "peak_mem_allocated_mb",
    "peak_mem_reserved_mb", "peak_mem_reason",
    # energy and clocks (NVML, over the timed window)
    "energy_j_per_step", "avg_power_w", "tokens_per_joule", "energy_reason", "sm_clock_mhz",
    "temperature_c_max", "throttled", "throttle_reasons", "nvml_samples", "power_limit_w", "gpu_shared_with",
    "sampler_stalled", "nvml_reason",
    # energy protocol (mpbench run --energy-protocol): its settings, the wait for the idle GPU before this case
    # (how long, whether temperature and power settled) and where they started
    "energy_protocol", "cooldown_s", "cooldown_settled", "start_temperature_c", "start_power_w", "cooldown_reason",
    # the measured window: seconds of timed steps (held-out evaluation excluded)
    "window_s",
    # data parallel (world_size > 1): per-rank step times, memory and devices, hosts, efficiency vs 1 process
    "rank_step_time_ms", "rank_peak_mem_mb", "rank_devices", "hosts", "scaling_efficiency", "scaling_reason",
    # sharded (parallel "fsdp"): FSDP2's policy dtypes, memory saved per rank vs DDP
    "param_dtype", "reduce_dtype", "mem_saving_vs_ddp", "mem_saving_basis", "mem_saving_reason",
    # largest batch that fits (--find-max-batch)
    "max_batch", "max_batch_limit_mb", "max_batch_tries", "max_batch_reason",
    # convergence (nats / token)
    "loss_curve", "initial_loss", "final_loss", "eval_curve", "loss_floor", "excess_loss",
    "loss_delta_vs_fp32", "loss_delta_reason", "overflow_steps", "loss_scale_curve", "diverged_at_step",
    # over seeds (suite/reporting/seeds.py): how many seeds the run had (--seeds), and figures paired with that
    # seed's fp32 record: the last quarter's mean curve delta, steps and seconds to fp32's target loss, the
    # excess loss over the floor as a fraction of fp32's
    "seeds", "loss_delta_last_quarter", "target_loss", "steps_to_target", "seconds_to_target", "curve_reason",
    "seconds_to_target_reason", "excess_fraction", "excess_fraction_reason",
    # fidelity: gradients and update against a float64 step of the same weights and batch (--fidelity)
    "grad_cos_vs_fp64", "grad_rel_err_vs_fp64", "grad_max_abs_err_vs_fp64", "update_cos_vs_fp64",
    "update_rel_err_vs_fp64", "update_max_abs_err_vs_fp64", "grad_underflow_frac", "grad_overflow_frac",
    "scaled_grad_underflow_frac", "scaled_grad_overflow_frac", "fidelity_loss_diff", "fidelity_loss_scale",
    "fidelity_steps", "fidelity_layers", "fidelity_reason", "fidelity_ref_passes",
    # numerics (suite/training/numerics.py, suite/modes/formats.py): per Linear, tensor role and sampled step,
    # columns of equal length (pandas.DataFrame(record["numerics"])): step, layer, role, format, amax,
    # underflow, saturation, sqnr_db, scale. `numerics` in the mode's own formats during training
    # (--numerics), `numerics_formats` the mode's format per role; `numerics_whatif` every format on
    # fp32's tensors (mpbench numerics), `numerics_skipped` the formats it could not run, with why
    "numerics", "numerics_steps", "numerics_formats", "numerics_whatif", "numerics_skipped", "numerics_reason",
    # environment
    "gpu_name", "gpu_count", "gpu_capability", "gpu_memory_mb", "driver", "cuda", "torch",
    "python", "cpu", "cpu_count", "cpu_bf16_native", "cpu_fp16_native", "torch_threads", "hostname", "platform",
)
# fmt: on

# The columns of the numerics fields (`numerics`, `numerics_whatif`), one row per step, layer, tensor role
# and format, and the roles: a Linear's input and weight (the forward GEMM's operands), the gradient of its
# output (the input-gradient GEMM's) and of its weight (the weight-gradient GEMM's result).
NUMERICS_COLUMNS = ("step", "layer", "role", "format", "amax", "underflow", "saturation", "sqnr_db", "scale")
NUMERICS_ROLES = ("input", "weight", "grad_output", "grad_weight")

# The fidelity figures that are null, with `fidelity_reason`, when not compared or not comparable
# (fidelity_loss_scale is null for modes without loss scaling: that needs no reason).
FIDELITY_FIGURES = (
    "grad_cos_vs_fp64", "grad_rel_err_vs_fp64", "grad_max_abs_err_vs_fp64", "update_cos_vs_fp64",
    "update_rel_err_vs_fp64", "update_max_abs_err_vs_fp64", "grad_underflow_frac", "grad_overflow_frac",
    "scaled_grad_underflow_frac", "scaled_grad_overflow_frac", "fidelity_loss_diff", "fidelity_layers",
)  # fmt: skip

# A metric that may be null, and the field that then says why (same reason for a group).
REASON_FIELDS: dict[str, str] = {
    **dict.fromkeys(("peak_flops", "mfu", "mfu_bf16", "peak_flops_blended", "mfu_blended"), "mfu_reason"),
    **dict.fromkeys(("mamf", "mamf_flops"), "mamf_reason"),
    **dict.fromkeys(
        (
            "predicted_step_ms",
            "predicted_gemm_ms",
            "predicted_cast_ms",
            "predicted_rest_ms",
            "predicted_speedup_vs_bf16",
            "predicted_speedup_vs_fp32",
        ),
        "roofline_reason",
    ),  # fmt: skip
    **dict.fromkeys(
        ("tensor_core_util", "tensor_core_util_hmma", "tensor_core_util_imma", "tensor_core_util_source"),
        "tensor_core_util_reason",
    ),
    **dict.fromkeys(
        ("peak_mem_mb", "peak_mem_device_mb", "peak_mem_allocated_mb", "peak_mem_reserved_mb"), "peak_mem_reason"
    ),
    **dict.fromkeys(("energy_j_per_step", "avg_power_w", "tokens_per_joule"), "energy_reason"),
    **dict.fromkeys(
        ("sm_clock_mhz", "temperature_c_max", "throttled", "nvml_samples", "power_limit_w", "gpu_shared_with"),
        "nvml_reason",
    ),
    **dict.fromkeys(FIDELITY_FIGURES, "fidelity_reason"),
    **dict.fromkeys(("mem_saving_vs_ddp", "mem_saving_basis"), "mem_saving_reason"),
    **dict.fromkeys(("loss_delta_last_quarter", "target_loss", "steps_to_target"), "curve_reason"),
    "seconds_to_target": "seconds_to_target_reason",
    "excess_fraction": "excess_fraction_reason",
}


def new_run_id() -> str:
    """Sortable, unique enough: UTC time plus 4 random hex digits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def make_record(**values: Any) -> dict[str, Any]:
    """A record with every field of the schema; unknown keys are a programming error."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise KeyError(f"not in the record schema: {sorted(unknown)}")
    if values.get("status") not in STATUSES:
        raise ValueError(f"status={values.get('status')!r}: must be one of {STATUSES}")
    record = {name: values.get(name) for name in FIELDS}
    record["schema"] = SCHEMA
    record["timestamp"] = record["timestamp"] or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return record


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: write them as strings, so a diverged curve stays readable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Fields holding words, where 'inf' or 'nan' would be text (a data file or host so named), never a number.
_TEXT_FIELDS = frozenset(
    ("run_id", "git_commit", "model", "mode", "device", "data", "status", "reason", "hostname", "hosts", "cpu",
     "platform", "gpu_name", "driver", "cuda", "torch", "python", "compute_dtype")
)  # fmt: skip


def _decoded(value: Any) -> Any:
    """The inverse of `_json_safe`: 'nan', 'inf', '-inf' back to floats, inside lists and dicts too."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    if isinstance(value, dict):
        return {k: _decoded(v) for k, v in value.items()}
    return value


class NotWritten(Exception):
    """A record that could not be appended, and why; the file is left as it was before."""


class BadRecord(ValueError):
    """A line that is an mpbench record, with a field missing or of the wrong type."""


EXIT_NOT_WRITTEN = 74  # a command that stopped on a record it could not write (sysexits' EX_IOERR)


def append(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as one line, flushed and fsynced: earlier lines are never touched.

    A single write() on an O_APPEND descriptor lands whole at the end of the file, so
    concurrent writers do not interleave within a line. The line is written whole or not at
    all: a short write (a full disk) or a failed fsync is cut back off and raises NotWritten,
    as does a file that ends inside a line, which this line would be glued onto.
    """
    line = (json.dumps({k: _json_safe(v) for k, v in record.items()}, allow_nan=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: its last byte
    except OSError as exc:
        raise NotWritten(f"{path}: cannot open it to append ({exc.strerror})") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)  # /dev/null, a pipe: nothing to check or sync
        if regular:
            _check_tail(fd, path)
        _write_line(fd, path, line, sync=regular)
    finally:
        os.close(fd)


def _check_tail(fd: int, path: str | Path) -> None:
    for wait in (0.0, 0.01, 0.05, 0.2):  # a concurrent writer's line may be half-copied into the file for a moment
        time.sleep(wait)
        size = os.fstat(fd).st_size
        if not size or os.pread(fd, 1, size - 1) == b"\n":
            return
    raise NotWritten(
        f"{path}: it ends inside a line (a write that never finished); `mpbench run --resume {path}` "
        "repairs it before appending"
    )


def _write_line(fd: int, path: str | Path, line: bytes, sync: bool) -> None:
    """One write() of the whole line, then fsync; on any failure the file is cut back to where it was."""
    written = 0
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written (disk full?)")
        if sync:
            os.fsync(fd)
    except OSError as exc:
        if written and sync:  # with O_APPEND the offset now ends our bytes: cut them back off
            with contextlib.suppress(OSError):
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)
        raise NotWritten(f"{path}: {exc.strerror or exc}") from None


def read(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON Lines file; ValueError naming file, line and field for a broken one.

    Non-finite numbers, written as the strings 'nan', 'inf', '-inf', come back as floats here,
    once, so no consumer decodes them again.
    """
    with open(path, "rb") as f:
        return list(parse(f, path))


def parse(lines: Iterable[bytes], path: str | Path, start: int = 1) -> Iterator[dict[str, Any]]:
    """The records of these lines of `path` (the first is line `start`), each checked (`validate.problem`);
    ValueError naming file, line and field at the first bad one."""
    for number, raw in enumerate(lines, start=start):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path}:{number}: not text (byte {raw[exc.start]:#04x} is not UTF-8); not an mpbench records file"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            raise ValueError(f"{path}:{number}: not an mpbench record (schema {SCHEMA!r} expected)")
        record = {k: v if k in _TEXT_FIELDS else _decoded(v) for k, v in record.items()}
        why = validate.problem(record, STATUSES)
        if why:
            raise BadRecord(f"{path}:{number}: {why}; fix or remove that line")
        yield record


def read_all(paths_or_globs: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """Records of several files or glob patterns, each with its `source` file; ValueError
    naming a missing file, an empty glob, or the file and line of a broken record."""
    import glob

    items = [paths_or_globs] if isinstance(paths_or_globs, (str, Path)) else list(paths_or_globs)
    if not items:
        raise ValueError("records: no file or glob given; name at least one JSON Lines file")
    files: list[str] = []
    for item in map(str, items):
        if any(c in item for c in "*?["):  # a pattern, as glob reads one
            matched = sorted(glob.glob(item))
            if not matched:
                raise ValueError(f"records: the glob {item!r} matches no file; check the pattern")
        elif not Path(item).is_file():
            raise ValueError(f"records: {item!r} is not a file; check the path")
        else:
            matched = [item]
        files += [f for f in matched if f not in files]  # a file named twice is read once
    return [record | {"source": f} for f in files for record in read(f)]


def load(paths_or_globs: str | Path | Sequence[str | Path]) -> pandas.DataFrame:
    """Records of several files or glob patterns as one DataFrame, one row per record, with `source`."""
    import pandas

    rows = read_all(paths_or_globs)
    columns = list(FIELDS) + sorted({k for r in rows for k in r} - set(FIELDS) - {"source"}) + ["source"]
    return pandas.DataFrame.from_records(rows, columns=columns)


def check_writable(path: str | Path) -> Path:
    """Create the parent folder and make sure `path` can be appended to; ValueError if not."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ValueError(f"out={str(path)!r}: cannot write there ({exc.strerror}); choose another --out") from None
    return path
