"""The predicted lower bound on a step's time, per mode, with the ceilings it used: the record's roofline fields.

Ceilings: on a GPU the datasheet's dense peak FLOP/s per arithmetic (`peaks.peak_flops`) and its DRAM
bandwidth (`peaks.peak_bandwidth`); on a CPU this machine's calibrated matmul ceilings and memory bandwidth
(`mpbench calibrate`; `calibration.ceiling`, `calibration.bandwidth`). A ceiling that is missing makes the
prediction null with the reason, never a figure borrowed from elsewhere; so does an emulated mode, whose step
time is not a speed.

Data parallelism: the bound is per GPU. Each rank's GEMMs, casts and activations cover its own batch
(batch_size is per process); AdamW covers every parameter under DDP and 1/nproc of them under FSDP2. The
gradient all-reduce (FSDP: all-gather and reduce-scatter) is not modelled: communication only adds time or
overlaps, so the per-GPU figure stays a lower bound, and `roofline_inputs["communication"]` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models import GPTConfig
from suite.hardware import DeviceInfo
from suite.metrics import calibration, peaks
from suite.metrics.roofline import (
    FORMAT_BYTES,
    FORMAT_PEAK,
    converted_layers,
    gemm_seconds,
    mode_formats,
    model_gemms,
    result_format,
)
from suite.metrics.roofline_step import cast_traffic, gemm_totals, model_linears, rest_traffic
from suite.modes import build_mode

# A native 4-bit case (nvfp4 on a 10.0+ GPU): the peak table has the B200's FP4 rate (its mfu uses it), but the
# roofline has no 4-bit column (roofline.FORMAT_PEAK) nor a model of torchao's fused NVFP4 casts (Hadamard
# transform, 2-D weight scales, stochastic rounding): no bound rather than a guessed one.
NO_4BIT_ROOFLINE = "the roofline has no 4-bit GEMM ceiling nor a model of the fused NVFP4 casts: no bound is predicted"
COMMUNICATION = "not modelled (gradient all-reduce, FSDP all-gather/reduce-scatter): the per-GPU bound stays a bound"


@dataclass(frozen=True)
class Ceilings:
    """Peak FLOP/s per arithmetic and memory bandwidth (bytes/s), where they come from, and why any is missing."""

    flops_per_s: dict[str, float | None]
    bandwidth: float | None
    source: str
    missing: str | None  # the first missing ceiling's reason; None when every one needed is known


def ceilings(device: DeviceInfo, dtypes: set[str]) -> Ceilings:
    """The ceilings of `device` for GEMMs in `dtypes`: datasheet figures on a GPU, calibrated ones on a CPU."""
    flops: dict[str, float | None] = {}
    reasons: list[str] = []
    for dtype in sorted(dtypes):
        if device.type == "cuda":
            flops[dtype], why = peaks.peak_flops(device.name, dtype) if dtype in peaks.DTYPES else (None, dtype)
        else:
            flops[dtype], why = calibration.ceiling(device, dtype)
        if flops[dtype] is None:
            reasons.append(f"no {dtype} ceiling: {why}")
    if device.type == "cuda":
        bandwidth, why = peaks.peak_bandwidth(device.name)
        row = peaks.peak_row(device.name)
        source = f"datasheet: {row['source']}; bandwidth: {row['bandwidth_source']}" if row else "datasheet: none"
    else:
        bandwidth, why = calibration.bandwidth(device)
        source = f"calibrated: {calibration.calibration_path(device)}"
    if bandwidth is None:
        reasons.append(f"no memory bandwidth: {why}")
    return Ceilings(flops, bandwidth, source, "; ".join(reasons) or None)


@dataclass(frozen=True)
class Prediction:
    """A predicted lower bound on one step, its parts (ms), their totals and the ceilings; None + reason."""

    step_ms: float | None
    gemm_ms: float | None
    cast_ms: float | None
    rest_ms: float | None
    inputs: dict[str, Any]
    reason: str | None


def predict(
    config: GPTConfig,
    batch: int,
    seq_len: int,
    mode_name: str,
    device: DeviceInfo,
    converted: list[str] | None = None,
    nproc: int = 1,
    parallel: str | None = None,
    keep_high: str = "",
    fp4_recipe: str = "",
) -> Prediction:
    """The lower bound on one training step of `mode_name` on `device`, per GPU (batch per process), under the
    case's layer policy `keep_high` ("": the mode's default): the Linears it converts (`converted`, from the run,
    or as the mode's prepare selects them) and the GEMM kinds it keeps high, at the bf16 peak."""
    mode = build_mode(mode_name, device, keep_high, fp4_recipe)
    if converted is None:  # not known from a run: the Linears the mode's own prepare converts
        converted = converted_layers(mode, config)
    formats_of, attention = mode_formats(mode, converted)
    gemms = model_gemms(config, batch, seq_len, formats_of, attention)
    linears, params = model_linears(config, mode_name, formats_of)
    tokens = batch * seq_len
    casts = cast_traffic(linears, tokens)
    head = formats_of("lm_head")
    # activations between layers are in the unconverted format (attention's), whether or not the policy converts
    # the LM head; a converted head returns what its mode's converted Linears return (their grad_weight's dtype:
    # bf16, int8-mixed's fp32), a plain one what its operands' GEMM writes
    act = FORMAT_BYTES[attention]
    converted_head = converted is not None and "lm_head" in converted
    logits = FORMAT_BYTES[head["grad_weight"] if converted_head else result_format(head["input"], head["weight"])]
    rest = rest_traffic(config, tokens, mode_name, act, logits, params, 1 / nproc if parallel == "fsdp" else 1.0)
    ceil = ceilings(device, {g.compute for g in gemms if g.compute})
    totals = gemm_totals(gemms)
    inputs: dict[str, Any] = {
        "device": device.name,
        "source": ceil.source,
        "flops_per_s": ceil.flops_per_s,
        "bandwidth_bytes_per_s": ceil.bandwidth,
        "tokens_per_gpu": tokens,
        "gemm_count": totals["count"],
        "gemm_flops": totals["flops"],
        "gemm_bytes": totals["bytes"],
        "cast_bytes": casts["read"] + casts["written"],
        "rest_bytes": rest["activations"] + rest["optimizer"],
        "optimizer_bytes": rest["optimizer"],
        "communication": COMMUNICATION if nproc > 1 or parallel else None,
    }
    if why := type(mode).emulation_reason(device):
        return Prediction(None, None, None, None, inputs, f"emulated kernels ({why}): no roofline for emulation")
    if four_bit := sorted({f for g in gemms if g.compute is None for f in (g.a, g.b) if FORMAT_PEAK.get(f) is None}):
        return Prediction(None, None, None, None, inputs, f"{', '.join(four_bit)} GEMMs: {NO_4BIT_ROOFLINE}")
    if ceil.missing:
        return Prediction(None, None, None, None, inputs, ceil.missing)
    seconds = [gemm_seconds(g, ceil.flops_per_s, ceil.bandwidth) for g in gemms]
    bw = ceil.bandwidth or 1.0  # not None here: `missing` says when it is
    gemm_ms = sum(s for s in seconds if s is not None) * 1e3
    cast_ms, rest_ms = inputs["cast_bytes"] / bw * 1e3, inputs["rest_bytes"] / bw * 1e3
    return Prediction(gemm_ms + cast_ms + rest_ms, gemm_ms, cast_ms, rest_ms, inputs, None)


def record_fields(
    config: GPTConfig,
    batch: int,
    seq_len: int,
    mode_name: str,
    device: DeviceInfo,
    converted: list[str] | None,
    nproc: int = 1,
    parallel: str | None = None,
    keep_high: str = "",
    fp4_recipe: str = "",
) -> dict[str, Any]:
    """The record's roofline fields for a timed case: the bound, its parts, the speed-ups the roofline predicts
    against bf16 and fp32 (their bound over this mode's), its inputs, and the reason for any null."""
    own = predict(config, batch, seq_len, mode_name, device, converted, nproc, parallel, keep_high, fp4_recipe)
    fields: dict[str, Any] = {
        "predicted_step_ms": own.step_ms,
        "predicted_gemm_ms": own.gemm_ms,
        "predicted_cast_ms": own.cast_ms,
        "predicted_rest_ms": own.rest_ms,
        "roofline_inputs": own.inputs,
        "roofline_reason": own.reason,
    }
    reasons = [own.reason] if own.reason else []
    for ref in ("bf16", "fp32"):
        key = f"predicted_speedup_vs_{ref}"
        base = predict(config, batch, seq_len, ref, device, None, nproc, parallel) if own.step_ms else None
        if base is not None and base.step_ms and own.step_ms:
            fields[key] = base.step_ms / own.step_ms
        else:
            fields[key] = None
            if own.reason is None and base is not None:
                reasons.append(f"{key}: {base.reason}")
    fields["roofline_reason"] = "; ".join(reasons) or None
    return fields
