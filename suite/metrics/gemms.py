"""The GEMMs of a training step one by one, in each mode's arithmetic, measured and predicted (`mpbench gemms`).

Each mode's Linears run three GEMMs (forward, grad_input, grad_weight: suite.metrics.roofline) on operands
in the mode's formats. Rows group the GEMMs of Linears of one kind ("attn.c_attn", "mlp.c_fc", "lm_head")
that share a shape and an arithmetic; each distinct (arithmetic, m, k, n) is timed once per run (a cache),
whichever modes share it. Beside it, the cost of casting its 8-bit operands from bf16 (`cast`), and the
roofline's least time (`roofline.gemm_seconds`) with the ceilings the records' roofline uses
(`roofline_predict.ceilings`).

Attention's batched GEMMs are left out: the step runs them inside fused SDPA/flash kernels with the
softmax, so a bare bmm would time a kernel the step never launches.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from models import GPTConfig
from suite.hardware import DeviceInfo, on_device
from suite.metrics import calibration, roofline, roofline_predict
from suite.metrics.timing import TimingStats
from suite.modes import MODES
from suite.modes.base import tf32_matmuls

# A CPU has no matrix units for these: torch's CPU _scaled_mm runs (tests/test_gemms.py checks its numbers)
# but as a reference kernel, so its time would be no fp8 speed. TF32 does not exist on a CPU.
_NO_FP8 = ("a CPU has no fp8 matrix arithmetic: torch's CPU _scaled_mm is a reference kernel whose time is not "
           "an fp8 speed; time it on a GPU of compute capability >= 8.9")  # fmt: skip
CPU_SKIP = {"tf32": "a CPU has no TF32: its tf32 matmuls run in fp32 (the fp32 mode's rows time those)",
            **dict.fromkeys(("fp8", "fp8-rowwise", "fp8-rowwise-rescaled"), _NO_FP8)}  # fmt: skip
TARGET_S = {"cpu": 0.005, "cuda": 0.001}  # each timed batch of calls lasts about this long
LEFT_OUT = "attention's batched GEMMs: the step runs them fused in SDPA kernels, not as bare GEMMs"


def arithmetic(gemm: roofline.Gemm) -> str | None:
    """The calibration arithmetic (calibration.ARITHMETICS) a GEMM runs in: its peak column; fp8 split as
    torchao 0.18 runs it: tensorwise, rowwise in the forward (with fast accumulation), rowwise in the backward
    as the tensorwise kernel with the scales applied after (float8_ops.py addmm_float8_unwrapped: the rowwise
    kernel is "so slow" without fast accumulation); None for a format with no column (4-bit)."""
    compute = gemm.compute
    if compute == "fp8" and "rowwise" in gemm.a + gemm.b:
        return "fp8-rowwise" if gemm.kind == "forward" else "fp8-rowwise-rescaled"
    return compute


def fast_accum(gemm: roofline.Gemm) -> bool:
    """Whether torchao runs the GEMM with `_scaled_mm`'s fast accumulation: the float8 forward only
    (Float8LinearConfig's gemm_config_output; grad_input and grad_weight keep full accumulation)."""
    return gemm.kind == "forward" and arithmetic(gemm) in ("fp8", "fp8-rowwise")


def layer_kind(fqn: str) -> str:
    """'blocks.3.mlp.c_fc' -> 'mlp.c_fc': the same Linear in every block."""
    return re.sub(r"^blocks\.\d+\.", "", fqn)


def mode_gemms(mode_name: str, device: DeviceInfo, config: GPTConfig, batch: int, seq_len: int) -> list[roofline.Gemm]:
    """The Linears' GEMMs of one step of `mode_name` (the mode prepared on a meta-device model, so its layer
    selection is the one a run makes, with no weights allocated)."""
    mode = MODES[mode_name](device)
    formats_of, attention = roofline.mode_formats(mode, roofline.converted_layers(mode, config))
    every = roofline.model_gemms(config, batch, seq_len, formats_of, attention)
    return [g for g in every if g.kind in roofline.KINDS]


class Ceilings:
    """The roofline's ceilings (suite.metrics.roofline_predict.ceilings: datasheet peaks and bandwidth on a GPU,
    calibrated ones on a CPU), asked once per arithmetic, so that a row's missing prediction says only what
    its own arithmetic lacks."""

    def __init__(self, device: DeviceInfo) -> None:
        self.device = device
        self.by_dtype: dict[str, roofline_predict.Ceilings] = {}
        none = roofline_predict.ceilings(device, set())  # the bandwidth alone: where the figures come from
        self.source, self.bandwidth, self.bandwidth_reason = none.source, none.bandwidth, none.missing

    def of(self, compute: str) -> roofline_predict.Ceilings:
        if compute not in self.by_dtype:
            self.by_dtype[compute] = roofline_predict.ceilings(self.device, {compute})
        return self.by_dtype[compute]


def skip_reason(device: DeviceInfo, arith: str | None) -> str | None:
    """Why GEMMs in `arith` are not timed on `device`, or None."""
    if arith is None:
        return "a 4-bit format: no arithmetic of ours times it"
    if device.type == "cpu" and arith in CPU_SKIP:
        return CPU_SKIP[arith]
    return calibration.unavailable(device, arith)


def cast(fmt: str, rows: int, cols: int, device: DeviceInfo) -> Callable[[], object] | None:
    """The cast of a bf16 (rows x cols) operand into 8-bit format `fmt`, scaled along cols (the GEMM's K), in
    plain eager torch ops doing what torchao's cast does: fp8 tensorwise amax + scale + saturated cast;
    rowwise one amax per row (-pow2: the scale rounded down to a power of 2); int8-rowwise absmax / 127 and
    round; mxfp8 one e8m0 exponent per 32 elements. None for a format that needs no cast (16/32-bit)."""
    if roofline.FORMAT_BYTES.get(fmt, 2.0) > 1.5 or roofline.FORMAT_PEAK.get(fmt, "") is None:
        return None  # 16/32-bit: no cast; 4-bit: no cast of ours (their GEMMs are never timed: skip_reason)
    x = torch.randn(rows, cols, device=device.torch_device).to(torch.bfloat16)
    if fmt == "int8-rowwise":
        return lambda: (x / (x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127)).round().clamp(
            -128, 127).to(torch.int8)  # fmt: skip
    if fmt.startswith("mxfp8"):
        blocks = x.view(rows, -1, 32) if cols % 32 == 0 else None
        if blocks is None:
            return None
        rceil = fmt.endswith("rceil")

        def mx() -> object:
            amax = blocks.abs().amax(dim=2, keepdim=True).float().clamp(min=2**-127)
            exp = torch.ceil(torch.log2(amax / 448.0)) if rceil else torch.floor(torch.log2(amax)) - 8
            return (blocks.float() * torch.exp2(-exp)).clamp(-448, 448).to(torch.float8_e4m3fn), (exp + 127).to(
                torch.uint8)  # fmt: skip

        return mx
    name, _, scaling = fmt.partition("-")
    target = torch.float8_e4m3fn if name == "e4m3" else torch.float8_e5m2
    top = torch.finfo(target).max  # 448 (e4m3fn), 57344 (e5m2)

    def fp8() -> object:
        amax = x.abs().amax(dim=1, keepdim=True) if scaling.startswith("rowwise") else x.abs().max()
        scale = top / amax.float().clamp(min=1e-12)
        if scaling.endswith("pow2"):
            scale = torch.exp2(torch.floor(torch.log2(scale)))
        return (x.float() * scale).clamp(-top, top).to(target), scale

    return fp8


class Timer:
    """Each distinct GEMM (arithmetic, m, k, n) and cast (format, rows, cols) timed once: the cache of a run."""

    def __init__(self, device: DeviceInfo, repeats: int, log: Callable[[str], None] | None = None) -> None:
        self.device, self.repeats, self.log = device, repeats, log
        self.gemms: dict[tuple[str, int, int, int, bool, str], TimingStats | str] = {}  # + fast accum, layout
        self.casts: dict[tuple[str, int, int], TimingStats | None] = {}
        self.skips: dict[str | None, str | None] = {}

    def skip(self, arith: str | None) -> str | None:
        """skip_reason, asked once per arithmetic (it runs a small product to see whether the kernel runs)."""
        if arith not in self.skips:
            self.skips[arith] = skip_reason(self.device, arith)
        return self.skips[arith]

    def _time(self, call: Callable[[], object]) -> TimingStats:
        once = calibration.time_call(self.device, call, repeats=1, inner=1, warmup=1)[0]
        inner = max(1, min(50, round(TARGET_S[self.device.type] / max(once, 1e-9))))
        seconds = calibration.time_call(self.device, call, self.repeats, inner, warmup=1)
        return TimingStats.from_times([s * 1e3 for s in seconds])

    def gemm(self, arith: str, m: int, k: int, n: int, fast: bool = False, layout: str = "nn") -> TimingStats | str:
        """The GEMM's timings, or why its kernel refused to run it (one shape's failure ends nothing else)."""
        layout = layout if arith in ("fp32", "tf32", "fp16", "bf16") else "nn"  # the 8-bit kernels fix their own
        key = (arith, m, k, n, fast, layout)
        if key not in self.gemms:
            if self.log:
                what = f"{arith}{' (fast accumulation)' if fast else ''} {m} x {k} x {n}"
                self.log(f"gemms: timing {what} ({len(self.gemms) + 1} distinct so far)")
            try:
                with on_device(self.device.torch_device), tf32_matmuls(arith == "tf32"):
                    call = calibration.gemm(self.device, arith, m, k, n, fast_accum=fast, layout=layout)
                    self.gemms[key] = self._time(call)
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # torch.OutOfMemoryError included
                self.gemms[key] = f"the {arith} kernel refused {m} x {k} x {n}: {type(exc).__name__}: {str(exc)[:160]}"
        return self.gemms[key]

    def cast(self, fmt: str, rows: int, cols: int) -> TimingStats | None:
        key = (fmt, rows, cols)
        if key not in self.casts:
            with on_device(self.device.torch_device):
                call = cast(fmt, rows, cols, self.device)
                self.casts[key] = self._time(call) if call else None
        return self.casts[key]


# The operand autograd hands each GEMM of a Linear transposed (calibration.gemm's `layout`)
LAYOUT = {"forward": "nt", "grad_input": "nn", "grad_weight": "tn"}


def rows_of(mode_name: str, gemms: list[roofline.Gemm], timer: Timer, ceil: Ceilings) -> list[dict[str, Any]]:
    """One row per (layer kind, GEMM kind, shape, arithmetic, formats) of a mode: its count in the step, the
    measured time (median, p10-p90), FLOP/s, the prediction and the 8-bit operands' cast time."""
    groups: dict[tuple, list[roofline.Gemm]] = {}
    for g in gemms:
        groups.setdefault((layer_kind(g.layer), g.kind, g.shape, arithmetic(g), g.a, g.b), []).append(g)
    rows = []
    for (layer, kind, (m, k, n), arith, a, b), same in groups.items():
        g = same[0]
        row: dict[str, Any] = {"mode": mode_name, "layer": layer, "gemm": kind, "m": m, "k": k, "n": n,
                               "count": len(same), "arithmetic": arith, "a": a, "b": b, "out": g.out,
                               "flops": g.flops}  # fmt: skip
        known = ceil.of(g.compute) if g.compute else None
        predicted = roofline.gemm_seconds(g, known.flops_per_s, known.bandwidth) if known else None
        row["predicted_ms"] = None if predicted is None else predicted * 1e3
        row["predicted_reason"] = None if predicted is not None else known.missing if known else "no peak column"
        why = timer.skip(arith)
        row["fast_accum"] = fast_accum(g)
        row["layout"] = LAYOUT.get(kind, "nn") if arith in ("fp32", "tf32", "fp16", "bf16") else "nn"
        stats = None if why else timer.gemm(arith, m, k, n, row["fast_accum"], row["layout"])
        if isinstance(stats, str):  # the kernel refused this shape (CUDA's multiples of 16), or memory ran out
            why, stats = stats, None
        row["skipped_reason"] = why
        if why or stats is None:
            rows.append({**row, "measured_ms": None, "p10_ms": None, "p90_ms": None, "tflops": None,
                         "measured_over_predicted": None, "cast_ms": None, "casts": []})  # fmt: skip
            continue
        casts = []  # operand a is (m x k), b is (k x n) scaled per column: cast as its (n x k) transpose
        for fmt, rows_, cols in ((a, m, k), (b, n, k)):
            timed = timer.cast(fmt, rows_, cols)
            if timed is not None:
                casts.append({"format": fmt, "rows": rows_, "cols": cols, "ms": timed.median_ms})
        row.update(measured_ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms,
                   tflops=g.flops / (stats.median_ms / 1e3) / 1e12,
                   measured_over_predicted=stats.median_ms / row["predicted_ms"] if row["predicted_ms"] else None,
                   cast_ms=sum(c["ms"] for c in casts) if casts else None, casts=casts)  # fmt: skip
        rows.append(row)
    return rows


def biggest_aligned(gemms: list[roofline.Gemm], multiple: int = 64) -> roofline.Gemm | None:
    """The GEMM with the most FLOPs among those whose dimensions are all multiples of `multiple`, as the square
    calibration's are (None: none is): the LM head's odd vocabulary (50257) runs other, slower cuBLAS kernels,
    a cost of the model's shape that a comparison with the calibrated ceiling must not blame on the timer."""
    aligned = [g for g in gemms if not any(d % multiple for d in g.shape)]
    return max(aligned, key=lambda g: g.flops) if aligned else None


def biggest(rows: list[dict[str, Any]], device: DeviceInfo) -> list[dict[str, Any]]:
    """Per measured arithmetic, its biggest GEMM (most FLOPs) against the calibrated matmul ceiling (square
    matmuls, `mpbench calibrate`; fp8-rowwise against the tensorwise fp8 ceiling)."""
    out = []
    for arith in dict.fromkeys(r["arithmetic"] for r in rows if r["measured_ms"]):  # fp8-*: the fp8 ceiling
        # the ceiling was timed without fast accumulation: compare like with like (the float8 forward has it)
        like = [r for r in rows if r["arithmetic"] == arith and r["measured_ms"] and not r.get("fast_accum")]
        if not like:
            continue
        top = max(like, key=lambda r: r["flops"])
        dtype = "fp8" if arith.startswith("fp8") else arith
        flops, why = calibration.ceiling(device, dtype)
        ratio = top["tflops"] * 1e12 / flops if flops else None
        out.append({"mode": top["mode"], "arithmetic": arith, "layer": top["layer"], "gemm": top["gemm"],
                    "shape": [top["m"], top["k"], top["n"]], "tflops": top["tflops"],
                    "ceiling_tflops": flops / 1e12 if flops else None, "of_ceiling": ratio, "reason": why})  # fmt: skip
    return out
