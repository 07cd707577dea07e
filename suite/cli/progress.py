"""Live progress bars on a terminal (rich): one for the case that trains, one for the matrix.

A sink for the run's events (`suite.running.progress`), drawn on stderr. A finished case
leaves its one outcome line above the bars; lines that other code or a worker writes to
stderr meanwhile also print above them. On exit, normal or not (an interrupt, a dead
worker's error), the bars are taken down and the cursor is given back.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from suite.records.store import FAILED
from suite.running.progress import Event

STYLE = {"ok": "green", "skipped": "yellow", **dict.fromkeys(FAILED, "bold red")}


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Info(ProgressColumn):
    """A bar's words, drawn at each refresh so the ETAs count down between events."""

    def __init__(self, bars: LiveBars) -> None:
        super().__init__()
        self.live = bars

    def render(self, task: Task) -> Text:
        if task.id == self.live.matrix:
            return Text(self.live.matrix_info())
        words, due = task.fields.get("info", ""), task.fields.get("due")
        return Text(words + (f"  ETA {_clock(max(0.0, due - time.monotonic()))}" if due is not None else ""))


class LiveBars:
    """Draws the run's events as bars on a terminal; use as a context manager around the run."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            TextColumn("{task.completed:>4.0f}/{task.total:<4.0f}"),
            TimeElapsedColumn(),
            _Info(self),
            console=self.console,
            transient=True,  # the bars go when the run ends; the outcome lines and the table stay
            refresh_per_second=4,
        )
        self.cases: dict[str, TaskID] = {}
        self.matrix: TaskID | None = None
        self.started = time.monotonic()
        self.finished = self.total = 0

    @staticmethod
    def available(console: Console | None = None) -> bool:
        """True when stderr is a terminal that can redraw lines (not a pipe, a file, or TERM=dumb)."""
        c = console or Console(stderr=True)
        return c.is_terminal and not c.is_dumb_terminal

    def __enter__(self) -> LiveBars:
        self.bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.bars.stop()  # restores the cursor, also when an exception ends the run

    def __call__(self, e: Event) -> None:
        if e.kind == "matrix":
            self.started, self.finished, self.total = time.monotonic(), 0, e.total
            self.matrix = self.bars.add_task("cases", total=max(1, e.total))
        elif e.kind in ("case", "start", "step"):
            task = self._case(e)
            info, due = "starting", None
            if e.loss is not None and e.step_ms is not None:
                info = f"loss {e.loss:.4f}  {e.step_ms:,.0f} ms/step"
                due = time.monotonic() + (e.total - e.done) * e.step_ms / 1000  # at the last interval's pace
            self.bars.update(task, completed=e.done, total=max(1, e.total), info=info, due=due)
        elif e.kind == "done":
            task = self.cases.pop(e.label, None)
            if task is not None:
                self.bars.remove_task(task)
            self.finished += 1
            self.console.print(Text(f"{e.label}: ") + Text(e.text, style=STYLE.get(e.status, "")))
            if self.matrix is not None:
                self.bars.update(self.matrix, completed=self.finished)
        elif e.kind == "note":
            self.console.print(Text(e.text))

    def _case(self, e: Event) -> TaskID:
        if e.label not in self.cases:  # first event of a case: its bar goes under the matrix's
            for other in self.cases.values():  # cases run one at a time: an earlier bar (a max-batch try) is over
                self.bars.remove_task(other)
            self.cases = {e.label: self.bars.add_task(e.label, total=max(1, e.total), info="starting", due=None)}
        return self.cases[e.label]

    def matrix_info(self) -> str:
        """Cases done and, once one has finished, the time left at the mean time per case so far."""
        left = self.total - self.finished
        if not self.finished or not left:
            return f"{self.finished} of {self.total} cases done"
        eta = (time.monotonic() - self.started) / self.finished * left
        return f"{self.finished} of {self.total} cases done  ETA {_clock(eta)}"
