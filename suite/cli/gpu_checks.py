"""The GPU checks of `mpbench doctor`: each judges what a probe of suite/metrics/probes.py measured.

A check returns a `Check` (pass, fail or cannot check, with the reason and the figures it judged);
`Machine` is what they share: the CUDA boundary, NVML and its handle for the same GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from suite.metrics import nvml as nvml_lib
from suite.metrics import peaks, probes
from suite.metrics.nvml_readings import EVENT_BITS, THROTTLE_BITS
from suite.records import checks as rules

PASS, FAIL, CANNOT = "pass", "fail", "cannot check"
WARN = "warn"  # works, but busy now: timings will be noisy (suite/cli/quiet_checks.py); not a failure
EVENT_SHORTFALL = 0.05  # events may time up to 5% (+2 ms) less than wall: launch and sync latency
GPM_MARGIN = 0.05  # bf16's tensor-core utilization must beat strict fp32's by 5 points
MEM_TOLERANCE_MB, MEM_TOLERANCE_REL = 32.0, 0.05  # NVML's growth vs the allocator's, for a 1 GiB block
SHARE_RANGE = (0.25, 1.05)  # a large bf16 matmul reaches 60-95% of a right datasheet row; outside: wrong row


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: str  # PASS, FAIL, CANNOT or WARN
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Durations:
    """GPU seconds of each probe: about 5 s in all with the defaults."""

    event_s: float = 0.3
    energy_s: float = 2.0  # the energy counter updates every 20-100 ms: 2 s reads it to a few percent
    gpm_s: float = 0.5  # per dtype; GPM needs more than 100 ms
    share_s: float = 0.5
    memory_mib: int = 1024


@dataclass
class Machine:
    """What the GPU checks share: the CUDA boundary, NVML and its handle for the same GPU."""

    cuda: Any
    nvml: Any | None = None
    handle: Any | None = None
    nvml_reason: str | None = None
    pid: int = field(default_factory=os.getpid)
    durations: Durations = field(default_factory=Durations)
    energy: probes.EnergyProbe | None = None


def gpu_visible(m: Machine) -> Check:
    why = m.cuda.unavailable()
    if why:
        return Check("gpu_visible", FAIL, why)
    return Check("gpu_visible", PASS, f"torch sees {m.cuda.name()}", {"name": m.cuda.name()})


def nvml_same_gpu(m: Machine, nvml_module: Any = None) -> Check:
    m.nvml, m.nvml_reason = nvml_lib.load_nvml(nvml_module)
    if m.nvml is None:
        return Check("nvml_same_gpu", FAIL, f"{m.nvml_reason}: NVML memory, energy and GPM figures will be null")
    uuid = m.cuda.uuid()
    if uuid is None:
        m.nvml_reason = "torch reports no UUID for this GPU"
        return Check("nvml_same_gpu", FAIL, f"{m.nvml_reason}, so NVML cannot be matched to it")
    try:
        m.handle = nvml_lib.find_handle(m.nvml, uuid)
    except LookupError as exc:
        m.nvml_reason = str(exc)
        return Check("nvml_same_gpu", FAIL, f"{exc}: NVML would read another GPU than torch runs on")
    return Check("nvml_same_gpu", PASS, f"NVML finds torch's GPU by UUID {uuid}", {"uuid": uuid})


def _event_vs_wall(m: Machine) -> Check:
    t = probes.loop_for(m.cuda, "bf16", m.durations.event_s)
    figures = {"event_ms": t.event_ms, "wall_ms": t.wall_ms, "iters": t.iters}
    text = f"{t.iters} bf16 {t.n}^3 matmuls: events {t.event_ms:.2f} ms, wall {t.wall_ms:.2f} ms"
    if t.event_ms > t.wall_ms * 1.001 + 0.1:
        return Check("event_vs_wall", FAIL, f"{text}: events longer than the wall clock", figures)
    if t.event_ms < t.wall_ms * (1 - EVENT_SHORTFALL) - 2.0:
        return Check("event_vs_wall", FAIL, f"{text}: events miss the GPU's work (another device or stream?)", figures)
    return Check("event_vs_wall", PASS, text, figures)


def _energy(m: Machine) -> Check:
    e = m.energy = probes.energy_probe(m.cuda, m.nvml, m.handle, m.durations.energy_s)
    figures = {"energy_j": e.energy_j, "wall_s": e.wall_s, "power_limit_w": e.power_limit_w}
    if e.energy_j is None:
        status = CANNOT if "NotSupported" in e.errors.get("energy", "") else FAIL
        return Check("energy_power", status, f"energy counter unreadable: {e.errors.get('energy')}", figures)
    if e.energy_j <= 0:
        return Check("energy_power", FAIL, f"energy counter did not advance over {e.wall_s:.2f} s of bf16 matmuls",
                     figures)  # fmt: skip
    power = figures["avg_power_w"] = e.energy_j / e.wall_s
    text = f"{e.energy_j:.1f} J over {e.wall_s:.2f} s: {power:.0f} W"
    if power < rules.IDLE_FLOOR_W:
        return Check("energy_power", FAIL, f"{text}, below any working GPU's {rules.IDLE_FLOOR_W:g} W", figures)
    if e.power_limit_w is None:
        return Check("energy_power", CANNOT, f"{text}; enforced power limit unreadable: "
                     f"{e.errors.get('power_limit')}", figures)  # fmt: skip
    tol = rules.POWER_OVERSHOOT + rules.COUNTER_UPDATE_S / e.wall_s
    if power > e.power_limit_w * (1 + tol):
        return Check("energy_power", FAIL, f"{text}, above the enforced limit {e.power_limit_w:.0f} W by more "
                     f"than {tol:.0%}", figures)  # fmt: skip
    return Check("energy_power", PASS, f"{text}, under the enforced limit {e.power_limit_w:.0f} W", figures)


def _throttled(m: Machine) -> Check:
    bits = m.energy.event_bits if m.energy else None
    if bits is None:
        why = m.energy.errors.get("clocks") if m.energy else "the energy probe did not run"
        return Check("clocks_not_throttled", CANNOT, f"clocks-event reasons unread: {why}")
    named = {name: getattr(m.nvml, f"nvmlClocksEventReason{suffix}", bit) for name, suffix, bit in EVENT_BITS}
    seen = [name for name, bit in named.items() if bits & bit]
    # A GPU at its power cap under the heaviest load there is (large bf16 matmuls) works as designed;
    # thermal, hardware and power-brake slowdowns mean cooling, power delivery or an external signal.
    slow = [name for name in seen if name in THROTTLE_BITS and name != "sw_power_cap"]
    figures = {"event_bits": bits, "reasons": seen}
    if slow:
        return Check("clocks_not_throttled", FAIL, f"under a bf16 load the clocks are held down: {', '.join(slow)}; "
                     "records will be flagged throttled", figures)  # fmt: skip
    if "sw_power_cap" in seen:
        limit = f" of {m.energy.power_limit_w:.0f} W" if m.energy.power_limit_w else ""
        text = (f"no thermal or hardware slowdown; at the power cap{limit} under max-power matmuls (normal; "
                "a training window that hits it is flagged throttled)")  # fmt: skip
        return Check("clocks_not_throttled", PASS, text, figures)
    return Check("clocks_not_throttled", PASS, f"no power or thermal slowdown under load ({bits:#x})", figures)


def _tensor_cores(m: Machine) -> Check:
    gpm = nvml_lib.GpmTensorUtil(m.nvml, m.handle)
    if gpm.supported:
        got = probes.gpm_probe(m.cuda, m.nvml, m.handle, m.durations.gpm_s)
        low, high, source = got["fp32"].tensor_core_util, got["bf16"].tensor_core_util, "GPM"
        why = got["bf16"].reason or got["fp32"].reason
    else:
        iters = 20
        shares = {d: m.cuda.profiler_share(d, probes.MATMUL_N // 2, iters) for d in ("bf16", "fp32")}
        low, high, source = shares["fp32"].share, shares["bf16"].share, "profiler (GPM not supported)"
        why = shares["bf16"].reason or shares["fp32"].reason
    figures = {"source": source, "bf16": high, "fp32": low}
    if high is None or low is None:
        return Check("tensor_core_util", FAIL if source == "GPM" else CANNOT, f"{source}: {why}", figures)
    text = f"{source}: bf16 matmuls {high:.0%}, strict fp32 {low:.0%}"
    if not high > low + GPM_MARGIN:
        return Check("tensor_core_util", FAIL, f"{text}: bf16 should use tensor cores far more", figures)
    return Check("tensor_core_util", PASS, text, figures)


def _memory(m: Machine) -> Check:
    p = probes.memory_probe(m.cuda, m.nvml, m.handle, m.pid, m.durations.memory_mib)
    figures = asdict(p)
    if p.before_mb is None or p.after_mb is None:
        return Check("nvml_process_memory", CANNOT, f"this process not found in NVML's list: {p.how}", figures)
    if p.reserved_growth_mb < m.durations.memory_mib / 2:
        return Check("nvml_process_memory", CANNOT, f"the allocator reserved only {p.reserved_growth_mb:,.0f} MiB "
                     f"for a {m.durations.memory_mib} MiB block: nothing to compare", figures)  # fmt: skip
    grew = p.after_mb - p.before_mb
    tol = max(MEM_TOLERANCE_MB, MEM_TOLERANCE_REL * p.reserved_growth_mb)
    text = f"NVML ({p.how}) grew {grew:,.0f} MiB for {p.reserved_growth_mb:,.0f} MiB the allocator reserved"
    if abs(grew - p.reserved_growth_mb) > tol:
        return Check("nvml_process_memory", FAIL, f"{text} (tolerance {tol:.0f} MiB)", figures)
    return Check("nvml_process_memory", PASS, text, figures)


def _peak_row(m: Machine) -> Check:
    row = peaks.peak_row(m.cuda.name(), memory_mb=m.cuda.memory_mb())
    if row is None:
        return Check("peak_table_row", FAIL, f"no row for {m.cuda.name()!r} in suite/metrics/peaks.py: mfu will be "
                     "null (add the datasheet's dense figures)")  # fmt: skip
    return Check("peak_table_row", PASS, f"{row['gpu']}: bf16 {row['bf16']} TFLOP/s ({row['source']})", row)


def _share(m: Machine) -> Check:
    peak, why = peaks.peak_flops(m.cuda.name(), "bf16", memory_mb=m.cuda.memory_mb())
    if peak is None:
        return Check("matmul_share_of_peak", CANNOT, why or "no bf16 peak")
    t = probes.loop_for(m.cuda, "bf16", m.durations.share_s)
    share = t.flops_per_s / peak
    figures = {"flops_per_s": t.flops_per_s, "peak_flops": peak, "share": share}
    text = f"bf16 {t.n}^3 matmuls reach {t.flops_per_s / 1e12:.0f} of {peak / 1e12:.0f} TFLOP/s ({share:.0%})"
    lo, hi = SHARE_RANGE
    if not lo <= share <= hi:
        return Check("matmul_share_of_peak", FAIL, f"{text}: outside {lo:.0%}-{hi:.0%}, the row or the timing is "
                     "wrong", figures)  # fmt: skip
    return Check("matmul_share_of_peak", PASS, text, figures)


def _others(m: Machine) -> Check:
    ours, others, how = probes.own_process_mib(m.nvml, m.handle, m.pid)
    figures = {"others": [[pid, mib] for pid, mib in others], "ours_mb": ours}
    todo = ("; they share its SMs, memory bandwidth and energy counter with a run: wait for them to end "
            "(nvidia-smi) or pick a free GPU (CUDA_VISIBLE_DEVICES)")  # fmt: skip
    if others and ours is None:  # our PID is not NVML's, several are listed: all but one are others
        return Check("no_other_process", FAIL, f"{how}: at least {len(others) - 1} other process(es) use this GPU"
                     f"{todo}", figures)  # fmt: skip
    if others:
        listed = ", ".join(f"pid {pid} ({'?' if mib is None else f'{mib:,.0f}'} MiB)" for pid, mib in others)
        return Check("no_other_process", FAIL, f"other processes use this GPU: {listed}{todo}", figures)
    return Check("no_other_process", PASS, f"only this process ({how}) uses the GPU", figures)


GPU_CHECKS: tuple[tuple[str, Callable[[Machine], Check], bool], ...] = (
    ("event_vs_wall", _event_vs_wall, False),
    ("energy_power", _energy, True),
    ("clocks_not_throttled", _throttled, True),
    ("tensor_core_util", _tensor_cores, True),
    ("nvml_process_memory", _memory, True),
    ("peak_table_row", _peak_row, False),
    ("matmul_share_of_peak", _share, False),
    ("no_other_process", _others, True),
)  # fmt: skip  (name, check, needs NVML)
