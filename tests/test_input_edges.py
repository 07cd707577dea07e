"""Refusals and edge paths of the run's inputs that no other test reached: config files, Case fields,
the records reader, compare's status rows, the runner outside the main thread, fidelity's failure."""

from __future__ import annotations

import threading

import pytest
import torch

from suite.cli.config import load_config
from suite.hardware import resolve_device
from suite.records import store
from suite.records.store import make_record
from suite.reporting.compare import compare_runs
from suite.running import execute
from suite.running.runner import _interrupts, validate
from suite.training.case import Case


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
