"""Progress events: the plain lines of before in logs, live bars on a terminal, one channel from workers and ranks."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from suite import run_cases
from suite.cli.main import main
from suite.cli.progress import LiveBars
from suite.cli.run import summary_table
from suite.records import store
from suite.running.distributed import _tee
from suite.running.progress import Event, PlainLines, from_line, step_events, to_line
from suite.text import render
from tests.helpers import small_case

LABEL = "[1/2] fp32        tiny b8x128"
EVENTS = [
    Event("matrix", total=2),
    Event("case", LABEL, 0, 40),
    Event("start", LABEL, 0, 40, text="cpu (AMD EPYC)"),
    Event("step", LABEL, 10, 40, 5.26381, 31.0),
    Event("step", LABEL, 20, 40, 4.1401, 30.0, " (rank 0 slice)"),
    Event("done", LABEL, text="ok, 33.0 ms/step (p10-p90 29.1-41.0), final loss 2.8617", status="ok"),
    Event("note", text="mpbench: --fail-fast: stopping"),
]
# what mpbench printed for these before events existed (worker, rank 0 and runner lines)
PLAIN = [
    f"{LABEL}: training 40 steps on cpu (AMD EPYC)",
    f"{LABEL}: step 10/40 loss 5.2638",
    f"{LABEL}: step 20/40 loss 4.1401 (rank 0 slice)",
    f"{LABEL}: ok, 33.0 ms/step (p10-p90 29.1-41.0), final loss 2.8617",
    "mpbench: --fail-fast: stopping",
]


def test_plain_lines_are_the_lines_of_before():
    lines: list[str] = []
    sink = PlainLines(lines.append)
    for e in EVENTS:
        sink(e)
    assert lines == PLAIN


def test_step_events_carry_the_wall_time_per_step_since_the_last():
    events: list[Event] = []
    report = step_events(LABEL, events.append)
    report(10, 40, 3.0)
    report(20, 40, 2.0)
    assert [(e.kind, e.done, e.total, e.loss) for e in events] == [("step", 10, 40, 3.0), ("step", 20, 40, 2.0)]
    assert all(e.step_ms is not None and e.step_ms >= 0 for e in events)


def test_rank_lines_carry_events_and_everything_else_passes(capsys):
    lines = [to_line(EVENTS[3]), "W torchrun: something\n", "[rank0]: " + to_line(EVENTS[4]), "\x1empbench-event {cut"]
    events: list[Event] = []
    keep: list[str] = []
    _tee(io.StringIO("".join(lines) + "\n"), keep, events.append)
    assert events == [EVENTS[3], EVENTS[4]]  # exact round trip, also behind a rank prefix
    assert capsys.readouterr().err == "W torchrun: something\n\x1empbench-event {cut\n"  # a cut line is not lost
    assert len(keep) == 4  # all of it kept for the failure summary
    assert from_line("plain text") is None


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=140, color_system=None), out


def test_live_bars_leave_the_outcome_lines_and_give_the_cursor_back_after_an_interrupt():
    console, out = _terminal()
    with pytest.raises(KeyboardInterrupt), LiveBars(console) as bars:
        for e in EVENTS:
            bars(e)
        assert not bars.cases  # the finished case's bar is gone
        bars(Event("step", "max-batch fp32 b16", 3, 3, 5.5, 40.0))  # a try: no "done" event of its own
        bars(Event("start", "[2/2] bf16        tiny b8x128", 0, 40, text="cpu"))
        assert list(bars.cases) == ["[2/2] bf16        tiny b8x128"]  # one case bar at a time
        bars(Event("step", "[2/2] bf16        tiny b8x128", 10, 40, 5.0, 40.0))
        bars.bars.refresh()
        raise KeyboardInterrupt
    text = out.getvalue()
    assert f"{LABEL}: ok, 33.0 ms/step" in text and "mpbench: --fail-fast: stopping" in text
    assert "loss 5.0000" in text and "40 ms/step" in text
    assert re.search(r"ETA 0:00:0[01]", text)  # 30 steps left x 40 ms, counting down
    assert "1 of 2 cases done" in text
    assert text.rfind("\x1b[?25h") > text.rfind("\x1b[?25l")  # the cursor is shown again


def test_summary_table_prints_reasons_as_they_are():
    reason = "RuntimeError: boom [x.py:3 | y] [bold]not markup[/bold]"
    r = store.make_record(status="error", mode="bf16", model="tiny", batch_size=2, seq_len=32, reason=reason)
    text = render(summary_table([r]))
    assert "[x.py:3 | y] [bold]not markup[/bold]" in text and "x fp32" in text
    assert all(line == line.rstrip() for line in text.splitlines())


@pytest.mark.slow
def test_events_travel_from_the_worker_process_in_order():
    events: list[Event] = []
    records = run_cases([small_case(mode="fp32", steps=4, warmup=1)], log=None, progress=events.append)
    assert [e.kind for e in events] == ["matrix", "case", "start", "step", "step", "step", "step", "done"]
    assert [e.done for e in events if e.kind == "step"] == [1, 2, 3, 4]
    assert events[-1].status == records[0]["status"] == "ok" and events[-1].text.startswith("ok, ")


@pytest.mark.slow
def test_quiet_prints_only_the_summary(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["run", "--device", "cpu", "--modes", "fp32", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "x fp32" in captured.out and f"records: {out}" in captured.out
