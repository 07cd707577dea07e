"""NVML readings over a window, polled in a background thread: memory, energy, power, clocks, throttling.

Every NVML call happens in the sampler's own thread and never under a lock, so a call that stalls (a
GPU reset, an Xid, a busy driver) can stall only that thread: the training thread waits at most
`stall_timeout_s` for the sampler at the window's edges, carries on, and the window's result says the
sampler stalled. Every call is guarded on its own: one that raises `NVMLError` (e.g. NotSupported on a
consumer GPU) nulls that one metric with a reason.

The window can be paused (held-out evaluation between timed steps): energy is read at every edge and
only the active segments count, and no sample is taken while paused.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from suite.metrics.nvml_readings import EVENT_BITS, MIB, POLLED, NvmlWindow, Readings, proc_list, summarize

# Errors that will not go away on the next poll: stop calling that function, which keeps samples cheap.
_PERMANENT_ERRORS = ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_FunctionNotFound")
# Clock-event reasons: the name since driver R535, then the deprecated one older drivers export (same bits).
_EVENT_FUNCTIONS = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")


class NvmlSampler:
    """Context manager that polls one device from a daemon thread; `pause()`/`resume()` between segments."""

    def __init__(
        self, nvml: Any, handle: Any, pid: int | None = None, interval_s: float = 0.05, stall_timeout_s: float = 1.0
    ) -> None:
        self.nvml, self.handle, self.interval_s = nvml, handle, interval_s
        self.stall_timeout_s = stall_timeout_s
        self.pid = os.getpid() if pid is None else pid
        self._lock = threading.Lock()  # guards `_r` while the thread appends; never held during an NVML call
        self._r = Readings()
        self._errors: dict[str, str] = {}  # metric -> first error
        self._disabled: set[str] = set()
        self._commands: queue.Queue[tuple[str, threading.Event]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stalled: str | None = None  # what the training thread was waiting for when NVML stalled
        self._active = False
        self._bits = [(name, getattr(nvml, f"nvmlClocksEventReason{suffix}", bit)) for name, suffix, bit in EVENT_BITS]
        # look functions and constants up once, which keeps samples cheap; a missing function nulls its metric
        self._polls = [
            (name, getattr(nvml, fn, None), () if const is None else (getattr(nvml, const, None),), scale)
            for name, (fn, const, scale, _) in POLLED.items()
        ]
        self._procs_fn = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses", None)
        self._energy_fn = getattr(nvml, "nvmlDeviceGetTotalEnergyConsumption", None)
        self._events_fns = [f for f in (getattr(nvml, n, None) for n in _EVENT_FUNCTIONS) if f is not None]
        self._mem_v2 = getattr(nvml, "nvmlMemory_v2", None)  # v2 struct separates driver-reserved memory

    # -- NVML calls (sampler thread only) ---------------------------------------------------------

    def _call(self, metric: str, fn: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> Any:
        """fn(*args), or None with the error recorded against `metric`."""
        if metric in self._disabled:
            return None
        if fn is None:
            self._disabled.add(metric)
            self._errors.setdefault(metric, "NVML function missing from this pynvml")
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # NVMLError mostly; anything else is a bug that would repeat on every call
            self._errors.setdefault(metric, f"{getattr(fn, '__name__', metric)}: {exc} ({type(exc).__name__})")
            if type(exc).__name__ in _PERMANENT_ERRORS or not isinstance(exc, self.nvml.NVMLError):
                self._disabled.add(metric)
            return None

    def _event_reasons(self) -> int | None:
        """Clocks-event bits; a driver older than R535 lacks the new name: fall back to the old one."""
        while self._events_fns:
            try:
                return int(self._events_fns[0](self.handle))
            except self.nvml.NVMLError as exc:
                if type(exc).__name__ == "NVMLError_FunctionNotFound" and len(self._events_fns) > 1:
                    self._events_fns.pop(0)
                    continue
                self._errors.setdefault("throttled", f"{self._events_fns[0].__name__}: {exc} ({type(exc).__name__})")
                if type(exc).__name__ in _PERMANENT_ERRORS:
                    self._events_fns = []
                return None
            except Exception as exc:
                self._errors.setdefault("throttled", f"clocks-event reasons: {exc!r}")
                self._events_fns = []
                return None
        self._errors.setdefault("throttled", "no clocks-event function in this pynvml")
        return None

    def _device_used_mib(self) -> tuple[float | None, int]:
        """(device-wide used MiB, struct version): v2 where the driver has it, since v1's `used`
        includes driver-reserved memory; v1 only once v2 failed for good (old driver or pynvml)."""
        fn = getattr(self.nvml, "nvmlDeviceGetMemoryInfo", None)
        if self._mem_v2 is not None and "mem_v2" not in self._disabled:
            info = self._call("mem_v2", fn, self.handle, version=self._mem_v2)
            if info is not None or "mem_v2" not in self._disabled:  # a transient error: no reading this time
                return (None if info is None else info.used / MIB), 2
        info = self._call("peak_mem_device_mb", fn, self.handle)
        return (None if info is None else info.used / MIB), 1

    def _sample(self) -> None:
        """Take one reading of every polled metric; NVML first, then a short append under the lock."""
        raw = self._call("peak_mem_mb", self._procs_fn, self.handle)
        procs = None if raw is None else self._call("peak_mem_mb", proc_list, raw)
        device, version = self._device_used_mib()
        polled = [(name, self._call(name, fn, self.handle, *args), scale) for name, fn, args, scale in self._polls]
        bits = self._event_reasons()
        with self._lock:
            r = self._r
            r.samples += 1
            if procs is not None:
                r.proc_lists.append(procs)
            if device is not None:
                r.device_mb.append(device)
                r.device_v1 = r.device_v1 or version == 1
            for name, value, scale in polled:
                if value is not None:
                    r.values[name].append(float(value) * scale)
            if bits is not None:
                r.event_bits = (r.event_bits or 0) | bits

    def _edge(self, opening: bool) -> None:
        """Open or close an energy segment: the counter (mJ since driver load) and the time of the reading."""
        energy = self._call("energy_j", self._energy_fn, self.handle)
        now = time.perf_counter()
        with self._lock:
            if opening:
                self._r.segments.append([now, energy, None, None])
            elif self._r.segments:
                self._r.segments[-1][2:] = [now, energy]

    def _run(self) -> None:
        """Thread body: obey commands, sample every interval while active; a failing sample stops sampling."""
        active, sampling = False, True
        while True:
            try:
                command, done = self._commands.get(timeout=self.interval_s)
            except queue.Empty:
                if active and sampling:
                    sampling = self._safe(self._sample)
                continue
            if command == "start":
                limit = self._call("power_limit_w", getattr(self.nvml, "nvmlDeviceGetEnforcedPowerLimit", None),
                                   self.handle)  # fmt: skip
                with self._lock:
                    self._r.power_limit_w = None if limit is None else limit / 1000  # mW -> W
            if command in ("start", "resume"):
                self._edge(opening=True)
                sampling = sampling and self._safe(self._sample)  # a short segment still gets samples at its edges
                active = True
            elif command in ("pause", "stop") and active:
                sampling = sampling and self._safe(self._sample)
                self._edge(opening=False)
                active = False
            done.set()
            if command == "stop":
                return

    def _safe(self, fn: Callable[[], None]) -> bool:
        """fn(), turning any unexpected error into a reason; False if it failed."""
        try:
            fn()
            return True
        except Exception as exc:  # a bug or an odd pynvml must not reach training
            self._errors.setdefault("sampler", f"sampling failed: {exc!r}")
            return False

    # -- the training thread's side -----------------------------------------------------------------

    def _command(self, name: str) -> None:
        """Ask the thread to act and wait for it, at most `stall_timeout_s`; after a stall, never wait again."""
        if self._stalled is not None:
            return
        done = threading.Event()
        self._commands.put((name, done))
        if not done.wait(self.stall_timeout_s):
            self._stalled = name

    def __enter__(self) -> NvmlSampler:
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        self._command("start")
        return self

    def pause(self) -> None:
        """Close the current segment (energy read, last sample); nothing is sampled until `resume`."""
        self._command("pause")

    def resume(self) -> None:
        """Open a new segment."""
        self._command("resume")

    def __exit__(self, *exc_info: object) -> None:
        self._command("stop")
        if self._thread is not None and self._stalled is None:
            self._thread.join(timeout=self.stall_timeout_s)

    def result(self) -> NvmlWindow:
        """Summarize the window (call after the `with` block); never blocks longer than the stall timeout."""
        stalled = self._stalled is not None or (self._thread is not None and self._thread.is_alive())
        if not self._lock.acquire(timeout=self.stall_timeout_s):
            stalled = True
            r, errors = Readings(), {}
        else:
            try:
                r, errors = self._r, dict(self._errors)
            finally:
                self._lock.release()
        return summarize(r, errors, self.pid, self._bits, stalled, self._stalled, self.stall_timeout_s)
