import json
import math

import pandas as pd
import pytest

from suite.records import store
from suite.running.runner import run_cases
from tests.helpers import small_case


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "records.jsonl"
    cases = [small_case(mode="fp32"), small_case(mode="tf32"), small_case(mode="bf16")]
    return out, run_cases(cases, out=out, log=None)


def test_every_record_has_every_schema_field(run_file):
    out, records = run_file
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    for line, record in zip(lines, records, strict=True):
        parsed = json.loads(line)
        assert parsed == record  # the file holds exactly what run_cases returned
        assert list(parsed) == list(store.FIELDS)
        assert parsed["schema"] == store.SCHEMA
        assert parsed["run_id"] == records[0]["run_id"]
        assert parsed["status"] in store.STATUSES


def test_ok_record_fields(run_file):
    r = next(r for r in run_file[1] if r["mode"] == "fp32")
    case = small_case()
    assert r["status"] == "ok" and r["reason"] is None
    assert (r["model"], r["batch_size"], r["seq_len"], r["steps"], r["warmup"]) == ("tiny", 2, 32, 3, 1)
    assert r["params"] == 478_720
    assert r["flops_per_step"] == r["flops_per_token"] * case.tokens_per_step
    assert len(r["loss_curve"]) == 3 and len(r["step_times_ms"]) == 2  # warm-up not timed
    assert r["step_time_p10_ms"] <= r["step_time_ms"] <= r["step_time_p90_ms"]
    assert r["tokens_per_s"] == pytest.approx(case.tokens_per_step / (r["step_time_ms"] / 1e3))
    assert r["final_loss"] > r["loss_floor"] > 0
    for key in ("torch", "python", "cpu", "hostname", "timestamp", "device"):
        assert r[key], key
    assert r["gpu_name"] is None and r["device"] == "cpu"


def test_skipped_record_has_reason_and_no_figures(run_file):
    r = next(r for r in run_file[1] if r["mode"] == "tf32")
    assert r["status"] == "skipped" and "CUDA" in r["reason"]
    assert r["step_time_ms"] is None and r["loss_curve"] is None


def test_pandas_reads_records_directly(run_file):
    df = pd.read_json(run_file[0], lines=True)
    assert list(df["mode"]) == ["fp32", "tf32", "bf16"]
    assert df.loc[df["mode"] == "bf16", "step_time_ms"].item() > 0


def test_append_never_touches_earlier_lines(tmp_path):
    out = tmp_path / "r.jsonl"
    first = store.make_record(status="ok", model="tiny", mode="fp32")
    store.append(out, first)
    before = out.read_bytes()
    store.append(out, store.make_record(status="error", model="tiny", mode="bf16", reason="x"))
    assert out.read_bytes().startswith(before)
    assert [r["mode"] for r in store.read(out)] == ["fp32", "bf16"]


def test_non_finite_values_are_written_as_strings_and_read_back_as_floats(tmp_path):
    out = tmp_path / "r.jsonl"
    curve = [2.0, float("nan"), float("inf"), -float("inf")]
    store.append(out, store.make_record(status="diverged", model="tiny", mode="bf16", loss_curve=curve,
                                        initial_loss=float("nan"), hostname="nan", data="inf"))  # fmt: skip
    on_disk = json.loads(out.read_text())  # strict JSON: the strings JSON forces them into
    assert on_disk["loss_curve"] == [2.0, "nan", "inf", "-inf"] and on_disk["initial_loss"] == "nan"
    for record in (store.read(out)[0], store.read_all(out)[0], store.load(out).iloc[0].to_dict()):
        loss = record["loss_curve"]
        assert loss[0] == 2.0 and math.isnan(loss[1]) and loss[2] == math.inf and loss[3] == -math.inf
        assert math.isnan(record["initial_loss"])
        assert record["hostname"] == "nan" and record["data"] == "inf"  # words stay words


def test_make_record_refuses_unknown_fields_and_statuses():
    with pytest.raises(KeyError, match="flux"):
        store.make_record(status="ok", flux=1)
    with pytest.raises(ValueError, match="status"):
        store.make_record(status="fine")


def test_reader_names_file_and_line_of_a_broken_record(tmp_path):
    out = tmp_path / "r.jsonl"
    store.append(out, store.make_record(status="ok", model="tiny", mode="fp32"))
    with open(out, "a") as f:
        f.write('{"truncated": \n')
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not a JSON record"):
        store.read(out)
