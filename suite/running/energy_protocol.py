"""The energy protocol of `mpbench run --energy-protocol`: idle GPU before each case, shuffled repeats, long windows.

Energy per token depends on the protocol as much as on the GPU: a mode run right after another starts on a
hotter GPU (more leakage, lower clocks), and NVML's power samples cover only part of the runtime on A100/H100
(Yang et al., SC24) while its energy counter updates every 20-100 ms, so a short window is mostly edges.
Here: an idle baseline read once before any case; before each case a wait until temperature and power are
back near it (with a time limit, recorded); every mode `repeats` times in a seeded shuffled order; and each
group's steps extended so that every window holds enough power samples and seconds.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from suite.hardware import DeviceInfo
from suite.metrics.window import PROFILED_STEPS, nvml_device
from suite.records.cases import case_key
from suite.reporting.convergence import REFERENCE
from suite.running.cooldown import Cooldown, no_wait
from suite.training.case import Case

Note = Callable[[str], None]


@dataclass(frozen=True)
class ProtocolSettings:
    """What the protocol waits for, repeats and measures; every field lands in each record's `energy_protocol`."""

    repeats: int = 3  # each mode this many times (Case.repeat 1..repeats)
    min_window_s: float = 5.0  # each measured window at least this long ...
    min_power_samples: int = 60  # ... and holding at least this many NVML power samples
    sample_interval_s: float = 0.05  # the NVML sampler's interval (suite.metrics.nvml_sampler)
    temp_tolerance_c: float = 3.0  # settled: within this of the idle temperature ...
    temp_floor_c: float = 40.0  # ... or at or below this, whatever the idle reading
    power_tolerance: float = 0.10  # settled: within this fraction of the idle power ...
    power_tolerance_w: float = 10.0  # ... or this many watts of it, whichever is larger
    max_wait_s: float = 120.0  # give up waiting after this; the case runs, cooldown_settled false
    poll_s: float = 1.0  # seconds between readings while waiting
    call_timeout_s: float = 2.0  # an NVML call that has not answered by then counts as stalled
    idle_reads: int = 3  # readings (poll_s apart) whose medians make the idle baseline
    spread_bound: float = 0.05  # (max - min) / median of a mode's repeats above this: the figure is suspect
    sizing_steps: int = 10  # timed steps of the unrecorded run that sizes each mode's window
    margin: float = 1.1  # timed steps sized for this much more than the window, against a slower repeat
    order_seed: int | None = None  # None: drawn at the start of the run (and recorded)

    def __post_init__(self) -> None:
        for name in ("repeats", "min_power_samples", "idle_reads", "sizing_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"energy_protocol.{name}={getattr(self, name)}: must be at least 1")
        for name in ("min_window_s", "temp_tolerance_c", "power_tolerance", "power_tolerance_w", "max_wait_s",
                     "spread_bound"):  # fmt: skip
            if not getattr(self, name) >= 0:
                raise ValueError(f"energy_protocol.{name}={getattr(self, name)}: must be 0 or more")
        for name in ("sample_interval_s", "poll_s", "call_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"energy_protocol.{name}={getattr(self, name)}: must be positive")
        if not self.margin >= 1:
            raise ValueError(f"energy_protocol.margin={self.margin}: must be 1 or more")

    @property
    def window_s(self) -> float:
        """The shortest window the protocol accepts: its seconds, or its power samples at the sampler's rate."""
        return max(self.min_window_s, self.min_power_samples * self.sample_interval_s)


def order(cases: Sequence[Case], repeats: int, seed: int) -> list[Case]:
    """Every case `repeats` times (repeat 1..N), round by round, each round shuffled by `seed`.

    Round-major, so that slow drift (room temperature, a neighbour's load) touches every mode alike. Within a
    round, each group's fp32 is moved just before the first of its modes: their loss deltas are computed against
    the fp32 of the same repeat when their records are written. The cooldown before every case, not the order,
    removes the heat one case leaves for the next."""
    rng = random.Random(seed)
    out: list[Case] = []
    for r in range(1, repeats + 1):
        round_ = [replace(c, repeat=r) for c in cases]
        rng.shuffle(round_)
        present, placed = set(round_), set()
        for c in round_:
            ref = replace(c, mode=REFERENCE)
            for x in (ref, c) if ref in present else (c,):
                if x not in placed:
                    placed.add(x)
                    out.append(x)
    return out


def timed_steps_needed(step_ms: float, settings: ProtocolSettings) -> int:
    """Timed steps whose window lasts `settings.window_s` at `step_ms` per step, with the margin."""
    return max(1, math.ceil(settings.window_s * settings.margin / (step_ms / 1e3)))


def reserved_steps(case: Case, device: DeviceInfo) -> int:
    """Steps trained after the window (the GPU's profiler steps): not in the window, so added on top."""
    return PROFILED_STEPS if device.type == "cuda" else 0


def sized_steps(case: Case, step_ms: dict[str, float], device: DeviceInfo, settings: ProtocolSettings) -> int:
    """A group's steps: its own, or more so that the slowest-to-fill window (the fastest mode) is long enough.

    One figure for the whole group (every mode, every repeat): the modes stay comparable, and each keeps its fp32."""
    if not step_ms:
        return case.steps
    timed = timed_steps_needed(min(step_ms.values()), settings)
    return max(case.steps, case.warmup + timed + reserved_steps(case, device))


def sizing_case(case: Case, settings: ProtocolSettings, device: DeviceInfo) -> Case:
    """The short unrecorded run that measures a mode's step time: the case's warm-up, then `sizing_steps` timed."""
    steps = case.warmup + settings.sizing_steps + reserved_steps(case, device)
    return replace(case, steps=steps, lr_warmup=None, eval_every=0, numerics_every=0, fidelity=False, repeat=0)


def windows_apply(device: DeviceInfo) -> str | None:
    """None where windows hold NVML power samples (a CUDA GPU NVML can read), else why extending them is moot."""
    if device.type != "cuda":
        return f"{device.type.upper()}: no NVML power samples or energy counter, so windows are not extended"
    _, _, why = nvml_device(device.index)
    return f"NVML unavailable ({why}): no power samples, so windows are not extended" if why else None


def nvml_for(device: DeviceInfo) -> tuple[Any, Any, str | None]:
    """(nvml, handle, reason) to read the device's temperature and power; tests put a fake NVML here."""
    if device.type != "cuda":
        return None, None, f"{device.type.upper()}: no NVML temperature or power to wait on; the wait is skipped"
    nvml, handle, why = nvml_device(device.index)
    return (nvml, handle, None) if nvml is not None else (None, None, f"NVML unavailable ({why}); no wait")


class Protocol:
    """One run under the protocol: its seed, each GPU's cooldown (idle baseline read on creation), the plan."""

    def __init__(
        self, settings: ProtocolSettings, devices: dict[str, DeviceInfo], existing: Sequence[dict[str, Any]] = (),
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    ) -> None:  # fmt: skip
        self.s, self.existing = settings, [r for r in existing if r.get("energy_protocol")]
        # a resumed run keeps the order it started with
        earlier = [r["energy_protocol"].get("order_seed") for r in existing if r.get("energy_protocol")]
        seed = settings.order_seed if settings.order_seed is not None else next(iter(earlier), None)
        self.seed = seed if seed is not None else secrets.randbelow(2**31)
        self.cooldowns: dict[str, Cooldown | str] = {}  # device -> its cooldown, or why there is none
        for name, device in devices.items():
            nvml, handle, why = nvml_for(device)
            if why:
                self.cooldowns[name] = why
                continue
            cool = Cooldown(nvml, handle, settings, clock, sleep)
            cool.measure_idle()  # before any case (and before the sizing runs): the GPU as the run found it
            self.cooldowns[name] = cool
        self.sizing: dict[Case, dict[str, Any]] = {}  # group (its fp32 case) -> what sizing found

    def plan(
        self, cases: Sequence[Case], devices: dict[str, DeviceInfo], measure: Callable[[Case], float | None],
        note: Note,
    ) -> list[Case]:  # fmt: skip
        """Size each group's window (unrecorded runs through `measure`: step ms or None), then order the repeats."""
        groups: dict[Case, list[Case]] = {}
        for c in cases:
            groups.setdefault(replace(c, mode=REFERENCE), []).append(c)
        steps_of: dict[Case, int] = {}
        for group, members in groups.items():
            device = devices[group.device]
            why = windows_apply(device)
            info: dict[str, Any] = {"asked_steps": group.steps}
            if why:
                info["window_reason"] = why
                steps_of[group] = group.steps
            elif earlier := self._earlier(group, device):  # a resumed run keeps its steps: the same cases
                steps_of[group] = earlier["steps"]
                info["sizing_step_ms"] = earlier["energy_protocol"].get("sizing_step_ms")
                info["sizing_reason"] = "steps as sized by the run this one resumes"
                note(f"energy protocol: {group.model}: steps {group.steps} -> {earlier['steps']}, as sized before "
                     "the resume")  # fmt: skip
            else:
                note(f"energy protocol: sizing {group.model} b{group.batch_size}x{group.seq_len}'s windows "
                     f"({self.s.sizing_steps} unrecorded timed steps per mode)")  # fmt: skip
                times = {c.mode: measure(sizing_case(c, self.s, device)) for c in members}
                step_ms = {m: t for m, t in times.items() if t}
                steps_of[group] = sized_steps(group, step_ms, device, self.s)
                info["sizing_step_ms"] = step_ms
                if not step_ms:
                    note(f"energy protocol: {group.model}: no mode could be timed, so steps stay {group.steps}")
                elif steps_of[group] > group.steps:
                    note(f"energy protocol: {group.model}: steps {group.steps} -> {steps_of[group]} for every mode "
                         f"and repeat, so the fastest mode's window ({min(step_ms.values()):.1f} ms/step) lasts "
                         f">= {self.s.window_s:g} s (>= {self.s.min_power_samples} power samples)")  # fmt: skip
                else:
                    note(f"energy protocol: {group.model}: its {group.steps} steps already fill >= "
                         f"{self.s.window_s:g} s windows; not extended")  # fmt: skip
            info["extended"] = steps_of[group] > group.steps
            self.sizing[group] = info
        sized = [replace(c, steps=steps_of[replace(c, mode=REFERENCE)]) for c in cases]
        self.sizing |= {replace(c, mode=REFERENCE): self.sizing[replace(o, mode=REFERENCE)]
                        for c, o in zip(sized, cases, strict=True)}  # fmt: skip
        return order(sized, self.s.repeats, self.seed)

    def _earlier(self, group: Case, device: DeviceInfo) -> dict[str, Any] | None:
        """An earlier record of this group under the protocol (a resumed run): its steps are the group's."""
        from suite.running.execute import case_fields  # torch and the model: only when resuming

        for r in self.existing:
            if r["energy_protocol"].get("asked_steps") != group.steps or r.get("steps") is None:
                continue
            try:
                twin = replace(group, steps=r["steps"], mode=r["mode"], repeat=r.get("repeat") or 0)
            except ValueError:  # a mode this version no longer has: not this group
                continue
            if case_key(case_fields(twin, device)) == case_key(r):
                return r
        return None

    def settings_dict(self, case: Case) -> dict[str, Any]:
        """The record's `energy_protocol`: the settings, the seed, its GPU's idle baseline and its group's sizing."""
        out = asdict(self.s) | {"order_seed": self.seed, "window_s": self.s.window_s}
        cool = self.cooldowns.get(case.device)
        if isinstance(cool, Cooldown):
            out |= {"idle_temperature_c": cool.idle_c, "idle_power_w": cool.idle_w, "idle_reason": cool.idle_reason}
        else:
            out |= {"idle_temperature_c": None, "idle_power_w": None, "idle_reason": cool}
        return out | self.sizing.get(replace(case, mode=REFERENCE, repeat=0), {})

    def before(self, case: Case, note: Note) -> dict[str, Any]:
        """Wait for the case's GPU to idle; its cooldown fields."""
        cool = self.cooldowns.get(case.device)
        return cool.wait(note) if isinstance(cool, Cooldown) else no_wait(cool or "no GPU to wait on")
