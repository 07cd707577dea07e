"""`mpbench sensitivity`'s edge branches on planted records and fakes (no training): an interrupted or unwritable
sweep, a chart path that cannot be made, a sweep without none, a policy with no finished seed, a policy that gets
all the way back to fp32, and seeds on which every candidate recovers the same."""

from __future__ import annotations

import signal

from suite.cli import sensitivity as cli
from suite.cli.main import main
from suite.records import store
from suite.reporting import sensitivity_section
from suite.reporting.sensitivity import NO_FIGURE, NO_GAP, RECOVERS, analyse, conclusion, gap_words
from suite.running.runner import RecordNotWritten, RunInterrupted
from tests.helpers import error_line
from tests.test_sensitivity import FP32, GAP, MODE, _rec, _sweep

ARGS = ["sensitivity", MODE, "--model", "tiny", "--seeds", "0", "--steps", "2", "--batch-size", "2", "--seq-len",
        "16", "--device", "cpu"]  # fmt: skip


def _split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    return [r for r in records if r["mode"] == "fp32"], [r for r in records if r["mode"] == MODE]


def _stopping(exc: Exception):
    def run_cases(*_, **__):
        raise exc

    return run_cases


def test_an_interrupted_sweep_says_how_to_finish_and_exits_128_plus_the_signal(tmp_path, capsys, monkeypatch):
    ignored = []
    monkeypatch.setattr(cli, "ignore_interrupts", lambda: ignored.append(True))  # not this process's handlers
    monkeypatch.setattr(cli, "run_cases", _stopping(RunInterrupted(signal.SIGTERM, [{"a": 1}, {"b": 2}], ["c"])))
    out = tmp_path / "s.jsonl"
    assert main([*ARGS, "--out", str(out)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert ignored == [True]
    assert "interrupted by SIGTERM; 2 record(s) kept in" in err and "rerun the same command with --resume" in err
    assert "layer sensitivity" not in capsys.readouterr().out  # no table from a part of the sweep


def test_a_record_that_cannot_be_written_stops_with_exit_74_and_names_it(tmp_path, capsys, monkeypatch):
    lost = RecordNotWritten("disk full", [{"a": 1}], "fp8-tensorwise keep lm_head seed 0", [])
    monkeypatch.setattr(cli, "run_cases", _stopping(lost))
    out = tmp_path / "s.jsonl"
    assert main([*ARGS, "--out", str(out)]) == store.EXIT_NOT_WRITTEN == 74
    captured = capsys.readouterr()
    assert "stopped: the record of fp8-tensorwise keep lm_head seed 0 could not be written: disk full" in captured.err
    assert "then rerun with --resume" in captured.err and "layer sensitivity" not in captured.out


def test_a_chart_under_a_file_is_bad_input_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_cases", _stopping(AssertionError("ran despite a bad --chart")))
    (tmp_path / "f").write_text("a file, not a folder")
    chart = tmp_path / "f" / "x.png"
    assert main([*ARGS, "--out", str(tmp_path / "s.jsonl"), "--chart", str(chart)]) == 2
    line = error_line(capsys)
    assert line.startswith("mpbench sensitivity: error: ") and f"chart={str(chart)!r}: cannot write there" in line
    out = tmp_path / "s.jsonl"
    assert "choose another --chart" in line and (not out.exists() or not out.read_text())  # nothing recorded


def test_a_sweep_without_none_has_no_gap_and_says_so(tmp_path, monkeypatch):
    # none was never recorded; block:1 failed on both seeds, lm_head finished on both
    records = [r for r in _sweep(FP32[:2], GAP[:2], {"lm_head": [0.03, 0.02]}) if r.get("keep_high") != "none"]
    records += [_rec(MODE, s, None, "block:1", status="oom") for s in (0, 1)]
    s = analyse(MODE, *_split(records))
    assert "no record of policy none: the gap cannot be measured" in s.notes
    assert s.gap_verdict == NO_GAP and s.gap_by_seed == {}
    assert conclusion(s).startswith("no line: no seed has both fp32 and none (every layer converted) finished")
    assert gap_words(s) == "Gap: not measured (no seed has both fp32 and none finished)."
    assert {r.policy: r.verdict for r in s.rows} == {"lm_head": NO_FIGURE, "block:1": NO_FIGURE, "none": "reference"}
    assert s.rows[0].detail == "no seed has this policy, none and fp32 all finished"
    figures = []
    real_save = sensitivity_section.save
    monkeypatch.setattr(sensitivity_section, "save", lambda fig, path: figures.append(fig) or real_save(fig, path))
    png = sensitivity_section.chart(s, tmp_path / "c.png")
    assert png.stat().st_size > 0
    marks = [(t.get_text(), t.get_position()[0]) for t in figures[0].axes[0].texts]
    assert marks == [("no figure", 0), ("no figure", 1)]  # one per candidate slot, no point drawn


def test_a_policy_that_recovers_the_whole_gap_is_said_to_end_at_fp32():
    records = _sweep(FP32, GAP, {"block:1": [0.100, 0.097, 0.104], "lm_head": [0.030, 0.031, 0.028]})
    s = analyse(MODE, *_split(records))
    top, head = s.rows[0], s.rows[1]
    assert top.policy == "block:1" and top.verdict == RECOVERS
    assert top.detail == "recovers loss beyond the seeds' noise; ends at fp32's loss within the noise"
    assert head.verdict == RECOVERS and "ends at fp32" not in head.detail  # 0.07 nats short of fp32: not all back


def test_seeds_on_which_every_candidate_recovers_the_same_give_no_rank_correlation():
    same0 = {"block:0": [0.05, 0.01], "block:1": [0.05, 0.08], "lm_head": [0.05, 0.03]}
    s = analyse(MODE, *_split(_sweep(FP32[:2], GAP[:2], same0)))
    assert s.rank_corr is None
    assert s.rank_note == "on some seed every candidate recovers the same: no order to correlate"
    assert s.top_by_seed == {0: "block:1 = lm_head = block:0", 1: "block:1"}  # a tie, in rank order
