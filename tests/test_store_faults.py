"""The records store under storage faults: a full disk, a torn line, a read-only file, /dev/null.

Every complete record survives readable, a record is on disk whole or not at all, and a run that
cannot write stops as an interrupt does: what was written is kept, and it says how to resume.
"""

import errno
import os

import pytest

from suite.cli.main import main
from suite.records import outputs, store
from suite.running import runner
from suite.running.execute import Batches, train_in_process

REAL_WRITE = os.write


def _record(mode="fp32", **values):
    return store.make_record(status="ok", model="tiny", mode=mode, **values)


def _fail_record_write(monkeypatch, nth: int, how: str) -> None:
    """os.write fails on the nth record line: writes half of it (a short write) or raises ENOSPC."""
    real, seen = REAL_WRITE, []

    def write(fd, data):
        if bytes(data[:10]) == b'{"schema":':
            seen.append(1)
            if len(seen) == nth:
                if how == "short":
                    return real(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("how", ["short", "enospc"])
def test_append_writes_the_whole_line_or_nothing(tmp_path, monkeypatch, how):
    out = tmp_path / "r.jsonl"
    store.append(out, _record())
    before = out.read_bytes()
    _fail_record_write(monkeypatch, 1, how)
    with pytest.raises(store.NotWritten, match="r.jsonl"):
        store.append(out, _record("bf16", reason="x" * 5000))
    assert out.read_bytes() == before  # cut back to its last complete line
    monkeypatch.undo()
    store.append(out, _record("bf16"))
    assert [r["mode"] for r in store.read(out)] == ["fp32", "bf16"]


def test_append_refuses_to_glue_onto_a_torn_line(tmp_path):
    out = tmp_path / "r.jsonl"
    store.append(out, _record())
    torn = out.read_bytes() + out.read_bytes()[:40]
    out.write_bytes(torn)
    with pytest.raises(store.NotWritten, match="ends inside a line"):
        store.append(out, _record("bf16"))
    assert out.read_bytes() == torn


def test_append_to_a_file_it_cannot_open_or_to_dev_null(tmp_path, monkeypatch):
    store.append(os.devnull, _record())  # fsync would raise EINVAL there: nothing to sync
    real_open = os.open

    def read_only(path, flags, mode=0o777):
        if str(path).endswith("r.jsonl"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(store.NotWritten, match="Permission denied"):
        store.append(tmp_path / "r.jsonl", _record())


def test_a_torn_last_record_is_cut_off_and_a_whole_one_kept(tmp_path):
    out, notes = tmp_path / "r.jsonl", []
    store.append(out, _record())
    whole = out.read_bytes()
    out.write_bytes(whole + whole[:-30])  # a second record cut short by a write that never finished
    outputs.check_records_out(out, notes.append)
    assert out.read_bytes() == whole and "line 2 was a record cut short" in notes[0]
    out.write_bytes(whole + whole[:-1])  # a whole record without its newline: nothing is cut
    outputs.check_records_out(out, notes.append)
    assert out.read_bytes() == whole + whole and len(notes) == 1


@pytest.mark.parametrize("text", ["hello\nworld\n", "some notes", "a,b\n1,2"])
@pytest.mark.parametrize("command", ["run", "fidelity"])
def test_records_go_only_into_an_empty_or_records_file(tmp_path, capsys, command, text):
    out = tmp_path / "notes.txt"
    out.write_text(text)
    assert main([command, "--device", "cpu", "--model", "tiny", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt:1: not a JSON record" in err[0] and "choose another --out" in err[0]
    assert out.read_text() == text


def test_a_run_never_appends_to_its_own_data_file(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    before = data.read_bytes()
    cmd = ["run", "--device", "cpu", "--model", "tiny", "--steps", "2", "--modes", "fp32", "--data", str(data)]
    assert main([*cmd, "--out", str(data)]) == 2
    assert "corpus.txt:1: not a JSON record" in capsys.readouterr().err and data.read_bytes() == before


def test_a_full_disk_mid_run_keeps_every_record_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """The issue's done-when: the second record's write is short; the first survives, readable, the
    run stops there with the resume command, and --resume finishes the matrix."""

    def in_process(case, flops_per_step, label, timeout, sink):  # the worker's training, without the spawn
        return train_in_process(case, flops_per_step, label, sink, Batches())

    monkeypatch.setattr(runner, "train_isolated", in_process)
    out = tmp_path / "r.jsonl"
    cmd = ["run", "--device", "cpu", "--model", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
           "--modes", "fp32,tf32,bf16", "--out", str(out), "--quiet"]  # fmt: skip
    _fail_record_write(monkeypatch, 2, "short")
    assert main(cmd) == store.EXIT_NOT_WRITTEN
    err = capsys.readouterr().err
    assert "record of tiny/tf32" in err and "only" in err and "bytes written" in err
    assert "1 finished record(s) of this run kept" in err and "bf16" in err
    assert f"--resume {out}" in err and "Traceback" not in err
    assert [r["mode"] for r in store.read(out)] == ["fp32"]
    monkeypatch.setattr(os, "write", REAL_WRITE)  # room again
    assert main([*cmd, "--resume", str(out)]) == 0
    assert [r["mode"] for r in store.read(out)] == ["fp32", "tf32", "bf16"]
