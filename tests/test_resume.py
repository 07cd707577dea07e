"""A resumed run is the same run: one run id, its speed-ups, its failures said and retried on demand,
one resume at a time, and a data file is one case under any spelling of its path."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import pytest

from suite.cli import run as cli_run
from suite.cli.main import main
from suite.records import store
from suite.records.cases import case_key, locked
from suite.reporting.report import build_report
from suite.running import runner
from suite.running.execute import case_fields
from suite.running.runner import run_cases
from tests.helpers import small_case

RUN = ["run", "--device", "cpu", "--model", "tiny", "--modes", "fp32,bf16", "--batch-size", "2", "--seq-len", "32",
       "--steps", "3", "--warmup", "1", "--quiet"]  # fmt: skip


@pytest.fixture
def in_process(monkeypatch):
    """`mpbench run` with its cases trained in this process (seconds, not a worker per case)."""
    monkeypatch.setattr(cli_run, "run_cases", functools.partial(run_cases, isolate=False))


def _failing(monkeypatch, mode: str, how: str) -> None:
    """The case of `mode` ends as `how`: "interrupt" (Ctrl-C as it starts) or "error" (an error record)."""
    real = runner._run_one

    def run_one(case, *args, **kwargs):
        if case.mode != mode:
            return real(case, *args, **kwargs)
        if how == "interrupt":
            raise KeyboardInterrupt
        return real(case, *args, **kwargs) | {"status": "error", "reason": "RuntimeError: injected"}

    monkeypatch.setattr(runner, "_run_one", run_one)


def test_a_resumed_run_keeps_its_run_id_and_its_speedups(tmp_path, monkeypatch, capsys, in_process):
    monkeypatch.chdir(tmp_path)  # the default --out: results/runs/RUN_ID.jsonl
    with monkeypatch.context() as m:
        _failing(m, "bf16", "interrupt")
        assert main(RUN) == 130
    [out] = Path("results/runs").glob("*.jsonl")
    assert [r["mode"] for r in store.read(out)] == ["fp32"]
    capsys.readouterr()
    assert main([*RUN, "--resume", str(out)]) == 0
    records = store.read(out)
    assert [r["mode"] for r in records] == ["fp32", "bf16"]
    assert {r["run_id"] for r in records} == {out.stem}  # the file's name and the records agree
    # the summary after the resume is the whole run's: bf16's speed-up over the fp32 recorded before
    rows = {
        line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line[:4] in ("fp32", "bf16")
    }
    speedup = records[0]["step_time_ms"] / records[1]["step_time_ms"]
    assert rows["bf16"][6].rstrip("~") == f"{speedup:.2f}", rows  # `~`: marked noisy on a busy machine
    # and the report shows one group with that speed-up
    build_report(store.load(out), tmp_path / "report")
    with open(tmp_path / "report" / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["mode"] for r in table] == ["fp32", "bf16"] and len({r["run_id"] for r in table}) == 1
    assert float(table[1]["speedup_vs_fp32"]) == pytest.approx(speedup)


def test_a_resume_says_it_kept_a_failed_case_and_retry_failed_reruns_it(tmp_path, monkeypatch, capsys, in_process):
    out = tmp_path / "r.jsonl"
    with monkeypatch.context() as m:
        _failing(m, "bf16", "error")
        assert main([*RUN, "--out", str(out)]) == 1
    capsys.readouterr()
    # nothing left to run, but the run is not clean: exit 1, and say how to finish it
    assert main([*RUN[:-1], "--resume", str(out)]) == 1  # not --quiet: the resume's notes too
    err = capsys.readouterr().err
    assert "1 failed before (tiny/bf16 error): not run again (--retry-failed reruns them)" in err
    assert f"were not run again (tiny/bf16 error); rerun them with --resume {out} --retry-failed" in err
    assert main([*RUN, "--resume", str(out), "--retry-failed"]) == 0
    records = store.read(out)  # the failed record stays readable; the retry comes after it
    assert [(r["mode"], r["status"]) for r in records] == [("fp32", "ok"), ("bf16", "error"), ("bf16", "ok")]
    assert len({r["run_id"] for r in records}) == 1
    assert main(["check", str(out)]) == 0  # the latest record of each case counts
    build_report(store.load(out), tmp_path / "report")
    with open(tmp_path / "report" / "summary.csv", newline="") as f:
        assert [(r["mode"], r["status"]) for r in csv.DictReader(f)] == [("fp32", "ok"), ("bf16", "ok")]


def test_retry_failed_needs_resume(capsys):
    assert main([*RUN, "--retry-failed"]) == 2
    assert "give it with --resume FILE" in capsys.readouterr().err


@pytest.mark.parametrize("held_by", ["run", "resume"])
def test_a_file_another_run_writes_to_is_not_resumed(tmp_path, capsys, in_process, held_by):
    out = tmp_path / "r.jsonl"
    out.touch()
    with locked(out, exclusive=held_by == "resume"):  # another `mpbench run` (or resume) of this file
        assert main([*RUN, "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another mpbench run is writing to this file" in err[0], err
    assert store.read(out) == []  # nothing ran twice


def test_plain_runs_may_share_a_file_but_not_with_a_resume(tmp_path):
    out = tmp_path / "r.jsonl"
    out.touch()
    with locked(out, exclusive=False), locked(out, exclusive=False):
        pass
    with locked(out, exclusive=True), pytest.raises(ValueError, match="out=.*choose another --out"):
        with locked(out, exclusive=False):
            pass


def test_a_data_file_is_one_case_under_any_spelling_of_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    device = runner.resolve_device("cpu")
    spellings = ["d.txt", "./d.txt", str(tmp_path / "d.txt")]
    fields = [case_fields(small_case(data=d), device) for d in spellings]
    assert {f["data"] for f in fields} == {str(tmp_path / "d.txt")}
    assert len({case_key(f) for f in fields}) == 1
    out = tmp_path / "r.jsonl"
    assert len(run_cases([small_case(data="d.txt")], out=out, log=None, isolate=False)) == 1
    for d in spellings[1:]:
        assert run_cases([small_case(data=d)], out=out, log=None, isolate=False, resume=True) == []
    Path("d.txt").write_text("other words entirely, so other batches. " * 40)  # an edited file: another case
    assert case_key(case_fields(small_case(data="d.txt"), device)) != case_key(fields[0])
