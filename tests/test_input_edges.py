"""Refusals and edge paths of the run's inputs that no other test reached: config files, Case fields,
the records reader, compare's status rows, the runner outside the main thread, fidelity's failure."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from suite.cli import fidelity as cli_fidelity
from suite.cli.config import load_config
from suite.cli.main import main
from suite.cli.run import print_summary
from suite.hardware import resolve_device
from suite.records import store
from suite.records.outputs import check_records_out, check_replaced
from suite.records.store import STATUSES, make_record
from suite.records.validate import problem
from suite.reporting.baseline import make_baseline
from suite.reporting.compare import compare_runs
from suite.running import execute
from suite.running.runner import _interrupts, validate
from suite.text import shown
from suite.training.case import Case
from suite.training.data import file_sha256
from tests.helpers import error_line


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "no such file"),
        ('modes = ["fp32", 3]\n', "modes=['fp32', 3] must be a list of names"),
    ],
)
def test_config_refusals_name_the_file_key_and_value(tmp_path, text, match):
    path = tmp_path / "c.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_config_model_singular_is_one_model(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "tiny"\nmodes = ["fp32", "bf16"]\n')
    assert load_config(path) == {"models": ["tiny"], "modes": "fp32,bf16"}


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("steps", 2.5, "steps=2.5: must be an integer"),
        ("batch_size", True, "batch_size=True: must be an integer"),
        ("grad_comm", "zip", "grad_comm='zip' is unknown"),
        ("eval_every", -1, "eval_every=-1: must be 0"),
        ("weight_decay", -0.1, "weight_decay=-0.1: must be zero or a positive"),
    ],
)
def test_case_refuses_a_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        Case(model="tiny", mode="fp32", device="cpu", **{field: value})


def test_no_cases_is_refused():
    with pytest.raises(ValueError, match="no cases to run"):
        validate([])


def test_reader_skips_blank_lines_and_refuses_foreign_json(tmp_path):
    path = tmp_path / "r.jsonl"
    store.append(path, make_record(model="tiny", mode="fp32", status="ok"))
    with path.open("a") as f:
        f.write("\n")
    assert [r["mode"] for r in store.read(path)] == ["fp32"]
    with path.open("a") as f:
        f.write('{"mode": "fp32", "status": "ok"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:3: not an mpbench record"):
        store.read(path)
    with pytest.raises(ValueError, match="no file or glob given"):
        store.read_all([])


def _case_record(**kw):
    return make_record(model="tiny", mode="bf16", device="cpu", batch_size=2, seq_len=32, steps=4, warmup=1, seed=0,
                       compile=False, **kw)  # fmt: skip


def test_compare_a_case_that_now_runs_improved_and_two_failures_are_unmatched():
    ok = _case_record(status="ok", step_time_ms=10.0, final_loss=3.0)
    error = _case_record(status="error", reason="RuntimeError: boom")
    oom = _case_record(status="oom", reason="out of memory")
    [row] = [r for r in compare_runs([error], [ok]) if r.metric == "status"]
    assert row.verdict == "improved" and "A error: RuntimeError: boom" in row.message
    [row] = [r for r in compare_runs([error], [oom]) if r.metric == "status"]
    assert row.verdict == "unmatched" and "B oom: out of memory" in row.message


def test_interrupt_handlers_are_left_alone_outside_the_main_thread():
    seen: list[str] = []

    def body() -> None:
        with _interrupts():
            seen.append("ran")

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert seen == ["ran"]


def test_a_failing_fidelity_comparison_becomes_its_reason(monkeypatch):
    case = Case(model="tiny", mode="fp32", device="cpu", batch_size=2, seq_len=16, steps=2, warmup=1, fidelity=True)

    def broken(*args, **kwargs):
        raise RuntimeError("reference exploded")

    monkeypatch.setattr(execute.fidelity, "measure", broken)
    fields = execute.fidelity_values(case, resolve_device("cpu"), torch.zeros(1, 2, 17, dtype=torch.long), print, "x")
    assert list(fields) == ["fidelity_reason"]  # the case stays ok; its traceback's tail follows the message
    assert fields["fidelity_reason"].startswith("the float64 comparison failed: RuntimeError: reference exploded")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(status="fine"), "field 'status' is 'fine'; one of"),
        (dict(gpu_name=3), "field 'gpu_name' is 3, not text"),
        (dict(compile="yes"), "field 'compile' is 'yes', not true or false"),
        (dict(suspect="many"), "field 'suspect' is 'many', not a list"),
        (dict(suspect=[{"rule": "x"}]), "field 'suspect' is not a list of {rule, note} entries"),
    ],
)
def test_the_reader_names_a_mistyped_field(change, match):
    record = make_record(model="tiny", mode="fp32", status="ok") | change
    assert match in (problem(record, STATUSES) or "")


def test_a_baseline_needs_an_ok_record():
    with pytest.raises(ValueError, match="no record is ok"):
        make_baseline([_case_record(status="error", reason="boom")])


def test_a_name_that_no_byte_stands_for_is_shown_escaped():
    assert shown("r\ud800.jsonl") == "r\\ud800.jsonl"  # a JSON \ud800 escape: no byte to give back


def test_without_a_memory_size_the_batches_are_not_checked(monkeypatch):
    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    Case(model="tiny", mode="fp32", device="cpu", steps=10**12).check_batches_fit()  # not refused: nothing to compare


def test_an_unreadable_data_file_has_no_digest(tmp_path):
    assert file_sha256(tmp_path / "gone.txt") is None


def test_records_out_accepts_a_device_and_refuses_json_of_another_kind(tmp_path):
    assert check_records_out("/dev/null") == Path("/dev/null")
    other = tmp_path / "other.json"
    other.write_text('{"answer": 42}')  # one complete JSON line, no newline: not a record cut short
    with pytest.raises(ValueError, match="--out appends records only to a records file"):
        check_records_out(other)
    with pytest.raises(ValueError, match="is a folder"):
        check_replaced(tmp_path, "baseline", ("machine", "entries"))


def test_under_torchrun_the_world_size_is_the_process_count(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["run", "--device", "cpu", "--nproc", "3", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "nproc/scaling: under torchrun the world size (2) is the process count" in error_line(capsys)


def test_an_empty_summary_says_there_was_nothing_to_run(capsys):
    print_summary([])
    assert capsys.readouterr().out == "nothing to run: every case already has a record\n"


def test_fidelity_stops_when_its_record_cannot_be_written(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli_fidelity, "_one", lambda case, device, batches: {"status": "ok"})

    def full(path, record):
        raise store.NotWritten(f"{path}: No space left on device")

    monkeypatch.setattr(store, "append", full)
    out = tmp_path / "f.jsonl"
    code = main(["fidelity", "--device", "cpu", "--model", "tiny", "--modes", "fp32,bf16", "--out", str(out)])
    assert code == store.EXIT_NOT_WRITTEN
    err = capsys.readouterr().err
    assert "the record of fp32 could not be written" in err and "No space left on device" in err
    assert "bf16: ok" not in err  # stopped at the first record it could not write
