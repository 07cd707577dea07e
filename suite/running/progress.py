"""Progress of a run as small structured events, from wherever a case trains to whoever shows them.

A case trains in a spawned worker (events travel over its result pipe), in a torchrun rank
(rank 0 writes them on stderr as marked JSON lines, which the parent picks out) or in this
process. The parent hands every event to one sink: `PlainLines` prints the lines mpbench has
always printed (CI logs, pipes); the command line draws live bars on a terminal instead.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """One thing a run reports as it goes (picklable, and JSON-able for torchrun ranks)."""

    kind: str  # "matrix" (a run starts), "case" (a case begins), "start" (it trains), "step", "done", "note"
    label: str = ""  # the case, e.g. "[1/2] fp32        tiny b8x128"
    done: int = 0  # steps done (for "matrix": cases to run, in `total`)
    total: int = 0  # steps of the case, or cases of the run
    loss: float | None = None  # training loss of the last step done
    step_ms: float | None = None  # wall time per step since the previous event: progress only, not a measurement
    text: str = ""  # start: the device; step: a suffix; done: the outcome; note: the whole line
    status: str = ""  # done: the record's status


Sink = Callable[[Event], None]
Progress = Callable[[int, int, float], None]  # the train loop's callback: (steps done, steps, last loss)


def ignore(event: Event) -> None:
    """A sink that shows nothing (a quiet run, the ranks that do not lead)."""


class PlainLines:
    """Each event as the one line mpbench prints for it; a step's time, the matrix size and a
    case's beginning (before its worker or ranks start) are not printed."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def __call__(self, e: Event) -> None:
        if e.kind == "start":
            self.log(f"{e.label}: training {e.total} steps on {e.text}")
        elif e.kind == "step":
            self.log(f"{e.label}: step {e.done}/{e.total} loss {e.loss:.4f}{e.text}")
        elif e.kind == "done":
            self.log(f"{e.label}: {e.text}")
        elif e.kind == "note":
            self.log(e.text)


def step_events(label: str, emit: Sink, suffix: str = "") -> Progress:
    """The train loop's progress callback, emitting "step" events with the wall time per step
    since the previous one (the first interval includes building the model and warm-up)."""
    last = [time.perf_counter(), 0]

    def report(done: int, steps: int, loss: float) -> None:
        now = time.perf_counter()
        ms = (now - last[0]) * 1000 / max(1, done - last[1])
        last[:] = [now, done]
        emit(Event("step", label, done, steps, loss, ms, suffix))

    return report


MARK = "\x1empbench-event "  # starts a line that carries an event (ASCII record separator: never in a log line)


def to_line(event: Event) -> str:
    """An event as one marked line of text, for a process whose only channel is its stderr."""
    return MARK + json.dumps(dataclasses.asdict(event)) + "\n"


def from_line(line: str) -> Event | None:
    """The event a marked line carries, or None for any other line (or a marked one cut short)."""
    at = line.find(MARK)
    if at < 0:
        return None
    try:
        return Event(**json.loads(line[at + len(MARK) :]))
    except (ValueError, TypeError):
        return None
