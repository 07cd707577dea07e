"""Files that commands read and write: broken records, empty files, outputs that are inputs, odd paths.

Each is refused with one line naming the file (and line and field) and exit code 2, and no
file that was read is replaced.
"""

import json
import os
import sys

import pytest

from suite.cli.main import main
from suite.records import store
from tests.helpers import error_line


def _good(path, mode="fp32"):
    case = dict(model="tiny", mode=mode, batch_size=2, seq_len=16, steps=2, warmup=1, seed=0, cpu="test cpu")
    figures = dict(
        step_time_ms=10.0, step_time_p10_ms=9.9, step_time_p90_ms=10.1, final_loss=3.0, loss_curve=[4.0, 3.0]
    )
    store.append(path, store.make_record(status="ok", **case, **figures))


BROKEN = {
    "no mode": (lambda r: r.pop("mode"), "r.jsonl:2: field 'mode' is missing"),
    "no status": (lambda r: r.pop("status"), "r.jsonl:2: field 'status' is missing"),
    "fast": (lambda r: r.update(step_time_ms="fast"), "r.jsonl:2: field 'step_time_ms' is 'fast', not a number"),
    "curve": (lambda r: r.update(loss_curve=[3.0, "low"]), "r.jsonl:2: field 'loss_curve' holds 'low'"),
}
COMMANDS = {
    "check": lambda f, tmp: ["check", f],
    "report": lambda f, tmp: ["report", f, "--out", str(tmp / "rep")],
    "baseline": lambda f, tmp: ["baseline", f, "--out", str(tmp / "b.json")],
    "compare": lambda f, tmp: ["compare", f, f],
    "resume": lambda f, tmp: ["run", "--device", "cpu", "--model", "tiny", "--steps", "2", "--modes", "fp32",
                              "--resume", f],
}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("defect", [*BROKEN, "binary"])
def test_a_broken_record_is_one_line_naming_file_line_and_field(tmp_path, capsys, command, defect):
    path = tmp_path / "r.jsonl"
    if defect == "binary":
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\xd1\xff\n\x00\x00")
        match = "r.jsonl:1: not text (byte 0xd1 is not UTF-8)"
    else:
        _good(path)
        record = store.read(path)[0]
        change, match = BROKEN[defect]
        change(record)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    before = path.read_bytes()
    assert main(COMMANDS[command](str(path), tmp_path)) == 2
    assert match in error_line(capsys)
    assert path.read_bytes() == before


def test_baseline_of_an_empty_file_says_it_has_no_records(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert main(["baseline", str(empty), "--out", str(tmp_path / "b.json")]) == 2
    assert "empty.jsonl hold(s) no records" in error_line(capsys)


@pytest.mark.parametrize(
    "command",
    [
        lambda rec, tmp: ["baseline", rec, "--out", rec],
        lambda rec, tmp: ["calibrate", "--device", "cpu", "--out", rec],
        lambda rec, tmp: ["report", rec, "--out", rec],
        lambda rec, tmp: ["report", rec, "--out", os.path.dirname(rec)],  # rec is the folder's summary.csv
    ],
    ids=["baseline", "calibrate", "report-file", "report-folder"],
)
def test_an_output_is_never_one_of_the_inputs(tmp_path, capsys, command):
    rec = tmp_path / "summary.csv"
    _good(rec)
    before = rec.read_bytes()
    assert main(command(str(rec), tmp_path)) == 2
    assert "summary.csv" in error_line(capsys)
    assert rec.read_bytes() == before


def test_baseline_refuses_to_replace_a_file_of_another_kind(tmp_path, capsys):
    rec, notes = tmp_path / "r.jsonl", tmp_path / "notes.txt"
    _good(rec)
    notes.write_text("my notes\n")
    assert main(["baseline", str(rec), "--out", str(notes)]) == 2
    assert "is not a baseline file" in error_line(capsys) and notes.read_text() == "my notes\n"
    assert main(["baseline", str(rec), "--out", str(tmp_path / "b.json")]) == 0
    assert main(["baseline", str(rec), "--out", str(tmp_path / "b.json")]) == 0  # a baseline is replaced


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_report_into_a_folder_it_cannot_write_is_one_line(tmp_path, capsys):
    rec = tmp_path / "r.jsonl"
    _good(rec)
    assert main(["report", str(rec), "--out", "/proc/mpbench-report"]) == 2  # read-only even for root
    assert "out='/proc/mpbench-report': cannot write there" in error_line(capsys)


def test_report_of_a_file_whose_name_is_not_utf8(tmp_path, capsys):
    rec = os.path.join(os.fsencode(tmp_path), b"r\xd1.jsonl")
    _good(os.fsdecode(rec))
    out = tmp_path / "rep"
    assert main(["report", os.fsdecode(rec), "--out", str(out)]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "r\\xd1.jsonl" in page and "r\\xd1.jsonl" in (out / "summary.csv").read_text(encoding="utf-8")
