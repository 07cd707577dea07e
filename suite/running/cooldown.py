"""The energy protocol's wait for an idle GPU: the idle baseline, then before each case a guarded poll of NVML
temperature and power until both are back near it, or a time limit (suite.running.energy_protocol)."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from suite.running.energy_protocol import ProtocolSettings

Note = Callable[[str], None]
NOTE_EVERY_S = 10.0  # one progress line per this many seconds of waiting


class NvmlUnavailable(Exception):
    """A temperature or power reading failed or stalled; the message says which and how."""


class Cooldown:
    """Waits before each case until one GPU's temperature and power are back near the idle baseline.

    Each NVML call runs in a daemon thread and is abandoned after `call_timeout_s`: a stalled driver (GPU reset,
    Xid) can hold only that thread. After a stall NVML is not called again in this run."""

    def __init__(
        self, nvml: Any, handle: Any, settings: ProtocolSettings, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:  # fmt: skip
        self.nvml, self.handle, self.s = nvml, handle, settings
        self.clock, self.sleep = clock, sleep
        self.stalled: str | None = None
        self.idle_c: float | None = None
        self.idle_w: float | None = None
        self.idle_reason: str | None = None

    def _call(self, name: str, *args: Any) -> Any:
        if self.stalled:
            raise NvmlUnavailable(f"NVML stalled earlier in this run ({self.stalled}); not called again")
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = getattr(self.nvml, name)(self.handle, *args)
            except Exception as exc:  # NotSupported, GpuIsLost, ...: the wait ends, the run goes on
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"cooldown-{name}", daemon=True)
        thread.start()
        thread.join(self.s.call_timeout_s)
        if thread.is_alive():
            self.stalled = f"{name} did not answer within {self.s.call_timeout_s:g} s"
            raise NvmlUnavailable(self.stalled)
        if "error" in box:
            raise NvmlUnavailable(f"{name} failed: {box['error']} ({type(box['error']).__name__})")
        return box["value"]

    def read(self) -> tuple[float, float]:
        """(temperature in C, power in W) now."""
        temp = float(self._call("nvmlDeviceGetTemperature", self.nvml.NVML_TEMPERATURE_GPU))
        return temp, self._call("nvmlDeviceGetPowerUsage") / 1e3  # mW -> W

    def measure_idle(self) -> None:
        """The idle baseline: medians of `idle_reads` readings, `poll_s` apart, before any case runs."""
        temps, watts = [], []
        try:
            for i in range(self.s.idle_reads):
                if i:
                    self.sleep(self.s.poll_s)
                t, w = self.read()
                temps.append(t)
                watts.append(w)
        except NvmlUnavailable as exc:
            self.idle_reason = f"idle baseline unreadable: {exc}"
            return
        self.idle_c, self.idle_w = statistics.median(temps), statistics.median(watts)

    def limits(self) -> tuple[float, float]:
        """(highest settled temperature, highest settled power)."""
        assert self.idle_c is not None and self.idle_w is not None
        temp = max(self.idle_c + self.s.temp_tolerance_c, self.s.temp_floor_c)
        return temp, self.idle_w + max(self.idle_w * self.s.power_tolerance, self.s.power_tolerance_w)

    def wait(self, note: Note) -> dict[str, Any]:
        """Block until settled or `max_wait_s`; the record's cooldown fields. Never raises for NVML's sake."""
        if self.idle_c is None:
            return no_wait(self.idle_reason or "no idle baseline")
        t_max, w_max = self.limits()
        t0 = self.clock()
        last_note = -math.inf
        temp = watts = None
        while True:
            elapsed = self.clock() - t0
            try:
                temp, watts = self.read()
            except NvmlUnavailable as exc:
                return self._fields(elapsed, False, temp, watts, f"stopped waiting: {exc}")
            if temp <= t_max and watts <= w_max:
                return self._fields(elapsed, True, temp, watts, None)
            if elapsed >= self.s.max_wait_s:
                why = (f"not back to idle within {self.s.max_wait_s:g} s: {temp:g} C (settled at <= {t_max:g} C), "
                       f"{watts:.0f} W (settled at <= {w_max:.0f} W); the case ran anyway")  # fmt: skip
                return self._fields(elapsed, False, temp, watts, why)
            if elapsed - last_note >= NOTE_EVERY_S:
                last_note = elapsed
                note(f"waiting for the GPU to cool: {temp:g} C -> idle {self.idle_c:g} C, {watts:.0f} W -> idle "
                     f"{self.idle_w:.0f} W, {elapsed:.0f} s of {self.s.max_wait_s:g} s")  # fmt: skip
            self.sleep(min(self.s.poll_s, self.s.max_wait_s - elapsed))

    @staticmethod
    def _fields(elapsed: float, settled: bool, temp: float | None, watts: float | None, why: str | None) -> dict:
        return {"cooldown_s": round(elapsed, 3), "cooldown_settled": settled, "start_temperature_c": temp,
                "start_power_w": watts, "cooldown_reason": why}  # fmt: skip


def no_wait(reason: str) -> dict[str, Any]:
    """The cooldown fields of a case that did not wait: nothing measured, and why."""
    return {"cooldown_s": None, "cooldown_settled": None, "start_temperature_c": None, "start_power_w": None,
            "cooldown_reason": reason}  # fmt: skip
