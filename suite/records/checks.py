"""Every record checks itself: rules that must hold whatever the machine, applied before it is written.

A figure that breaks a rule is kept as measured; the record's `suspect` field lists each broken
rule as a small flat dict, JSON-friendly and loadable by pandas as one object column:

    {"rule": "tokens_per_s", "fields": ["tokens_per_s"], "value": 51200.0, "limit": 40960.0,
     "note": "tokens_per_s 51200 != tokens_per_step / median step time 40960 (rel. tol. 1e-06)"}

`value` is the figure under suspicion, `limit` the value or bound it was held against, `fields`
the record fields the rule casts doubt on (a report marks those cells). `suspect` is `[]` for a
record that broke no rule and absent (None) for one written before the checks existed. A rule
whose inputs are None is not applied (a missing figure already carries its own reason).

This module reads the record only: the limits it needs (peak FLOP/s, calibrated ceiling, power
limit) are record fields, so it sits in the records layer and imports nothing of the suite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

Suspect = dict[str, Any]

# tokens_per_s is tokens_per_step / median, computed once in float64: only rounding may differ.
REL_ARITHMETIC = 1e-6
# mamf_flops is a measured best matmul; a real step may beat one measurement by noise, not by 5%.
MAMF_SLACK = 1.05
# NVML counts the CUDA context (hundreds of MiB) on top of the allocator's reserved pool, so the
# process figure sits well above `peak_mem_reserved_mb`. 64 MiB covers NVML's reporting granularity
# and a pool shrunk by empty_cache/free-and-retry between two 50 ms samples; more is a wrong figure.
MEM_SLACK_MB = 64.0
# No NVIDIA GPU running kernels draws under this (idle datacenter parts draw tens of W): a lower
# average means the energy counter or the window is wrong, not that the GPU was frugal.
IDLE_FLOOR_W = 5.0
# NVML's total-energy counter (mJ) updates every 20-100 ms (NVML docs): an end reading can be stale
# by up to one update, so an energy-derived figure over a window of W seconds may be off by up to
# COUNTER_UPDATE_S / W of itself, plus the 1 mJ quantum.
COUNTER_UPDATE_S = 0.1
COUNTER_QUANTUM_J = 1e-3
# Average power may pass the enforced limit for milliseconds (the limit is a running average);
# over a timed window the overshoot is at most a few percent.
POWER_OVERSHOOT = 0.05
# The roofline's predicted step is a lower bound (suite.metrics.roofline_predict); a measured step may beat
# the ceilings it is computed from by noise, not by 5%.
ROOFLINE_SLACK = 1.05
# CUDA events resolve about 0.5 us (cudaEventElapsedTime); perf_counter far better. 1 ms plus 0.1%
# covers both and the float sum over thousands of steps.
WINDOW_SLACK_MS, WINDOW_SLACK_REL = 1.0, 1e-3


def _num(x: Any) -> float | None:
    """A finite float, or None (missing, a 'nan' string from the JSON store, a bool)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _flag(rule: str, fields: list[str], value: Any, limit: Any, note: str) -> Suspect:
    return {"rule": rule, "fields": fields, "value": value, "limit": limit, "note": note}


def _percentiles(r: dict[str, Any]) -> Iterator[Suspect]:
    """p10 <= median <= p90."""
    lo, med, hi = (_num(r.get(k)) for k in ("step_time_p10_ms", "step_time_ms", "step_time_p90_ms"))
    if med is None:
        return
    if lo is not None and lo > med * (1 + 1e-12):
        yield _flag("percentiles_ordered", ["step_time_p10_ms", "step_time_ms"], lo, med,
                    f"step time p10 {lo:.6g} ms > median {med:.6g} ms")  # fmt: skip
    if hi is not None and hi < med * (1 - 1e-12):
        yield _flag("percentiles_ordered", ["step_time_p90_ms", "step_time_ms"], hi, med,
                    f"step time p90 {hi:.6g} ms < median {med:.6g} ms")  # fmt: skip


def _tokens_per_s(r: dict[str, Any]) -> Iterator[Suspect]:
    """tokens_per_s == tokens_per_step / median step time."""
    tps, tokens, med = _num(r.get("tokens_per_s")), _num(r.get("tokens_per_step")), _num(r.get("step_time_ms"))
    if tps is None or tokens is None or not med:
        return
    want = tokens / (med / 1e3)
    if not math.isclose(tps, want, rel_tol=REL_ARITHMETIC):
        yield _flag("tokens_per_s", ["tokens_per_s"], tps, want,
                    f"tokens_per_s {tps:.6g} != tokens_per_step / median step time {want:.6g} "
                    f"(rel. tol. {REL_ARITHMETIC:g})")  # fmt: skip


def _mfu(r: dict[str, Any]) -> Iterator[Suspect]:
    """achieved_flops <= the mode's datasheet peak, i.e. mfu in (0, 1]."""
    achieved, peak, mfu = _num(r.get("achieved_flops")), _num(r.get("peak_flops")), _num(r.get("mfu"))
    if mfu is None and achieved is not None and peak:
        mfu = achieved / peak
    if mfu is None:
        return
    if not 0 < mfu <= 1 + 1e-12:
        dtype = r.get("peak_flops_dtype") or "its dtype"
        yield _flag("mfu_in_range", ["mfu", "achieved_flops"], achieved if achieved is not None else mfu,
                    peak if peak is not None else 1.0,
                    f"mfu {mfu:.4g} outside (0, 1]: achieved {achieved or float('nan'):.4g} FLOP/s vs "
                    f"{dtype} peak {peak or float('nan'):.4g}")  # fmt: skip


def _mamf(r: dict[str, Any]) -> Iterator[Suspect]:
    """achieved_flops <= the calibrated matmul ceiling x 1.05."""
    achieved, ceiling = _num(r.get("achieved_flops")), _num(r.get("mamf_flops"))
    if achieved is None or not ceiling:
        return
    if achieved > ceiling * MAMF_SLACK:
        yield _flag("mamf_ceiling", ["mamf", "achieved_flops"], achieved, ceiling * MAMF_SLACK,
                    f"achieved {achieved:.4g} FLOP/s > {MAMF_SLACK:g} x calibrated matmul ceiling "
                    f"{ceiling:.4g} (stale calibration, or a step time too short)")  # fmt: skip


def _memory(r: dict[str, Any]) -> Iterator[Suspect]:
    """NVML's process peak (and device peak) >= the allocator's reserved peak minus a slack."""
    reserved = _num(r.get("peak_mem_reserved_mb"))
    if reserved is None:
        return
    checks = [("peak_mem_device_mb", "device")]
    if r.get("peak_mem_source") == "nvml-process":  # RSS or a device-wide fallback is another quantity
        checks.insert(0, ("peak_mem_mb", "process"))
    for key, what in checks:
        value = _num(r.get(key))
        if value is not None and value < reserved - MEM_SLACK_MB:
            yield _flag("nvml_peak_ge_reserved", [key], value, reserved,
                        f"NVML {what} peak {value:,.0f} MiB < allocator reserved peak {reserved:,.0f} MiB "
                        f"- {MEM_SLACK_MB:g} MiB (a sample missed the peak, or the wrong process/GPU)")  # fmt: skip


def _window_s(r: dict[str, Any]) -> float | None:
    """The measured window in seconds: `window_s`, else no figure."""
    w = _num(r.get("window_s"))
    return w if w and w > 0 else None


def _gpus(r: dict[str, Any]) -> int:
    """Energy and power of a data-parallel record are summed over its GPUs."""
    n = r.get("world_size")
    return n if isinstance(n, int) and n > 1 else 1


def _power(r: dict[str, Any]) -> Iterator[Suspect]:
    """IDLE_FLOOR_W x GPUs <= avg_power_w <= power_limit_w x GPUs, with the counter's resolution."""
    power = _num(r.get("avg_power_w"))
    if power is None:
        return
    n, window = _gpus(r), _window_s(r)
    # a counter reading up to one update stale at each end: over a window of W s the average may read
    # low by COUNTER_UPDATE_S / W of itself (0 W for a window shorter than one update)
    stale = COUNTER_UPDATE_S / window if window else 0.0
    floor = IDLE_FLOOR_W * n * (1 - stale)
    if power < floor:
        yield _flag("power_in_range", ["avg_power_w", "energy_j_per_step", "tokens_per_joule"], power,
                    floor, f"average power {power:.1f} W below an idle floor of {floor:.3g} W "
                    f"({n} GPU(s)): the energy counter did not count this window")  # fmt: skip
    limit = _num(r.get("power_limit_w"))
    if limit is None:  # unknown limit: that half of the rule cannot be checked
        return
    tol = POWER_OVERSHOOT + stale
    if power > limit * n * (1 + tol):
        yield _flag("power_in_range", ["avg_power_w", "energy_j_per_step", "tokens_per_joule"], power,
                    limit * n, f"average power {power:.1f} W above the enforced limit {limit * n:g} W "
                    f"({n} GPU(s)) by more than {tol:.1%}")  # fmt: skip


def _energy(r: dict[str, Any]) -> Iterator[Suspect]:
    """energy_j_per_step x timed_steps == avg_power_w x window_s, within the counter's resolution.

    Tolerance: both figures come from one energy counter and differ only by the time they are
    divided by; allow one counter update of energy at the average power (COUNTER_UPDATE_S x P:
    the two clocks and a stale end reading never differ by more) plus the 1 mJ quantum.
    """
    per_step, steps, power, window = (
        _num(r.get("energy_j_per_step")), _num(r.get("timed_steps")), _num(r.get("avg_power_w")), _window_s(r)
    )  # fmt: skip
    if per_step is None or not steps or power is None or window is None:
        return
    energy, expected = per_step * steps, power * window
    tol = COUNTER_UPDATE_S * power + COUNTER_QUANTUM_J * _gpus(r)
    if abs(energy - expected) > tol:
        yield _flag("energy_consistent", ["energy_j_per_step", "avg_power_w", "tokens_per_joule"], energy, expected,
                    f"energy {energy:.4g} J over {steps:.0f} steps != average power {power:.4g} W x window "
                    f"{window:.4g} s = {expected:.4g} J (tolerance {tol:.3g} J)")  # fmt: skip


def _window(r: dict[str, Any]) -> Iterator[Suspect]:
    """Sum of the timed steps' times <= the window's wall time (plus slack)."""
    times, window = r.get("step_times_ms"), _window_s(r)
    if not isinstance(times, list) or not times or window is None:
        return
    values = [_num(t) for t in times]
    if None in values:
        return
    total, limit = math.fsum(values), window * 1e3 * (1 + WINDOW_SLACK_REL) + WINDOW_SLACK_MS
    if total > limit:
        yield _flag("step_times_within_window", ["step_time_ms", "tokens_per_s"], total, window * 1e3,
                    f"timed steps sum to {total:.6g} ms > the window's {window * 1e3:.6g} ms wall time: the "
                    f"events timed something else (another device or stream)")  # fmt: skip


def _roofline(r: dict[str, Any]) -> Iterator[Suspect]:
    """step_time_ms x 1.05 >= predicted_step_ms: no step beats the roofline's lower bound by more than 5%."""
    step, bound = _num(r.get("step_time_ms")), _num(r.get("predicted_step_ms"))
    if step is None or not bound:
        return
    if step * ROOFLINE_SLACK < bound:
        inputs = r.get("roofline_inputs") if isinstance(r.get("roofline_inputs"), dict) else {}
        peaks = ", ".join(f"{k} {v:.4g} FLOP/s" for k, v in (inputs.get("flops_per_s") or {}).items() if _num(v))
        bw = _num(inputs.get("bandwidth_bytes_per_s"))
        ceilings = f"{peaks or 'peaks not recorded'}, bandwidth {f'{bw:.4g} B/s' if bw else 'not recorded'}"
        yield _flag("roofline_bound", ["step_time_ms", "tokens_per_s"], step, bound / ROOFLINE_SLACK,
                    f"step {step:.4g} ms is more than {ROOFLINE_SLACK - 1:.0%} below the roofline's lower bound "
                    f"{bound:.4g} ms (ceilings: {ceilings}; from {inputs.get('source') or 'an unrecorded source'}): "
                    "a ceiling too low, a step the model misses, or a wrong timer")  # fmt: skip


def _tensor_cores(r: dict[str, Any]) -> Iterator[Suspect]:
    """tensor_core_util* within [0, 1]."""
    for key in ("tensor_core_util", "tensor_core_util_hmma", "tensor_core_util_imma"):
        value = _num(r.get(key))
        if value is not None and not 0 <= value <= 1:
            yield _flag("tensor_core_util_in_range", [key], value, 1.0 if value > 1 else 0.0,
                        f"{key} {value:.4g} outside [0, 1]")  # fmt: skip


def _throttled(r: dict[str, Any]) -> Iterator[Suspect]:
    """Clocks throttled during the window: every speed and energy figure is of a slowed GPU."""
    if r.get("throttled") is True:
        reasons = r.get("throttle_reasons") or []
        yield _flag(
            "not_throttled",
            ["step_time_ms", "tokens_per_s", "mfu", "energy_j_per_step"],
            True,
            False,
            f"clocks throttled during the window ({', '.join(map(str, reasons)) or 'reason not given'})",
        )


def _shared(r: dict[str, Any]) -> Iterator[Suspect]:
    """Other processes on the GPU during the window: its energy, power and GPM figures are not ours alone."""
    others = r.get("gpu_shared_with")
    if isinstance(others, list) and others:
        fields = ["energy_j_per_step", "avg_power_w", "tokens_per_joule", "tensor_core_util", "step_time_ms"]
        pids = ", ".join(map(str, others))
        yield _flag("gpu_not_shared", fields, others, [], f"other processes used the GPU during the window: pid {pids}")


RULES: dict[str, Callable[[dict[str, Any]], Iterator[Suspect]]] = {
    "percentiles_ordered": _percentiles,
    "tokens_per_s": _tokens_per_s,
    "mfu_in_range": _mfu,
    "mamf_ceiling": _mamf,
    "roofline_bound": _roofline,
    "nvml_peak_ge_reserved": _memory,
    "power_in_range": _power,
    "energy_consistent": _energy,
    "step_times_within_window": _window,
    "tensor_core_util_in_range": _tensor_cores,
    "not_throttled": _throttled,
    "gpu_not_shared": _shared,
}


def check(record: dict[str, Any]) -> list[Suspect]:
    """Every rule the record breaks, in RULES order; [] when it breaks none."""
    return [s for rule in RULES.values() for s in rule(record)]


def suspect_fields(record: dict[str, Any]) -> dict[str, list[Suspect]]:
    """Record field -> the suspect entries naming it (empty for a clean or unchecked record)."""
    out: dict[str, list[Suspect]] = {}
    entries = record.get("suspect")
    for s in entries if isinstance(entries, list) else []:  # None: written before the checks existed
        if isinstance(s, dict):
            for key in s.get("fields") or []:
                out.setdefault(key, []).append(s)
    return out
