"""Issue 25, dark code: the edges of the energy protocol, of `mpbench run` and `mpbench calibrate` that no test
ran. Each test asserts what the edge does (its message, its figure, what it leaves alone), fake NVML and fake
clocks where a GPU would be, and trains only where the edge is a run's (tiny model, few steps, in process)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pandas
import pytest

from suite.cli import run as cli_run
from suite.cli.main import main
from suite.metrics import calibration
from suite.records.store import make_record
from suite.reporting import energy, procurement
from suite.running import energy_protocol as ep
from suite.running.energy_protocol import Protocol, ProtocolSettings
from suite.running.runner import run_cases
from suite.training import fidelity
from tests.fake_nvml import FakeHandle, make_fake
from tests.helpers import error_line, small_case
from tests.test_energy_protocol import CPU, CUDA, _protocol_record

# ---------------------------------------------------------------- ProtocolSettings and Case: the scripting API's


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("repeats", 0, "must be at least 1"),
        ("sizing_steps", -1, "must be at least 1"),
        ("max_wait_s", -1.0, "must be 0 or more"),
        ("spread_bound", math.nan, "must be 0 or more"),  # NaN compares false: refused, not let through
        ("poll_s", 0.0, "must be positive"),
        ("call_timeout_s", math.nan, "must be positive"),
        ("margin", 0.9, "must be 1 or more"),
    ],
)
def test_protocol_settings_refuse_a_bad_field_naming_it(field, value, rule):
    with pytest.raises(ValueError, match=rf"^energy_protocol\.{field}={value}: {rule}$"):
        ProtocolSettings(**{field: value})


def test_a_negative_repeat_is_refused():
    with pytest.raises(ValueError, match=r"^repeat=-1: must be 0 \(not an energy-protocol repeat\) or 1, 2, \.\.\.$"):
        small_case(repeat=-1)
    assert small_case(repeat=0).repeat == 0 and small_case(repeat=2).repeat == 2


# ---------------------------------------------------------------- NVML on a CUDA device: the protocol's two doors


def test_a_cuda_device_without_nvml_gets_no_wait_and_no_longer_windows(monkeypatch):
    asked: list[int] = []

    def no_nvml(index):
        asked.append(index)
        return None, None, "NVML Shared Library Not Found"

    monkeypatch.setattr(ep, "nvml_device", no_nvml)
    gpu = dataclasses.replace(CUDA, index=1)
    assert ep.windows_apply(gpu) == (
        "NVML unavailable (NVML Shared Library Not Found): no power samples, so windows are not extended"
    )
    assert ep.nvml_for(gpu) == (None, None, "NVML unavailable (NVML Shared Library Not Found); no wait")
    assert asked == [1, 1]  # the device's own index, not the first GPU's
    fake, handle = make_fake(1)[0], FakeHandle(1)
    monkeypatch.setattr(ep, "nvml_device", lambda index: (fake, handle, None))
    assert ep.windows_apply(gpu) is None  # NVML reads it: windows are sized
    assert ep.nvml_for(gpu) == (fake, handle, None)


# ---------------------------------------------------------------- Protocol.plan: the sizing's other outcomes


def _plan(monkeypatch, step_ms, existing=()):
    """Plan fp32 + bf16 (3 steps, 1 warm-up) as on a GPU with NVML; what `measure` saw and the notes."""
    monkeypatch.setattr(ep, "windows_apply", lambda device: None)
    protocol = Protocol(ProtocolSettings(repeats=1, order_seed=0), {"cpu": CPU}, existing)
    measured: list = []
    notes: list[str] = []
    cases = [small_case(mode="fp32"), small_case(mode="bf16")]
    planned = protocol.plan(cases, {"cpu": CPU}, lambda c: measured.append(c) or step_ms, notes.append)
    return protocol, planned, measured, notes


def test_a_group_no_mode_could_time_keeps_its_steps_and_says_so(monkeypatch):
    protocol, planned, measured, notes = _plan(monkeypatch, None)
    assert len(measured) == 2 and {c.steps for c in planned} == {3}
    assert notes[-1] == "energy protocol: tiny: no mode could be timed, so steps stay 3"
    info = protocol.settings_dict(planned[0])
    assert info["sizing_step_ms"] == {} and info["extended"] is False


def test_a_group_whose_steps_already_fill_the_window_is_not_extended(monkeypatch):
    # 10 s a step: 1 timed step makes the 5 s window (x 1.1), and the case's 3 steps already hold it
    protocol, planned, _, notes = _plan(monkeypatch, 10_000.0)
    assert {c.steps for c in planned} == {3}
    assert notes[-1] == "energy protocol: tiny: its 3 steps already fill >= 5 s windows; not extended"
    assert protocol.settings_dict(planned[0])["extended"] is False


def _earlier_record(**kw) -> dict:
    """A protocol record of the fp32 group (3 steps asked, sized to 40) as a resumed run finds it."""
    from suite.running.execute import case_fields

    fields = case_fields(small_case(mode="fp32", steps=40, repeat=1), CPU)
    ep_info = {"asked_steps": 3, "order_seed": 0, "sizing_step_ms": {"fp32": 1.0}}
    return make_record(**(fields | {"status": "ok", "energy_protocol": ep_info} | kw))


def test_a_resume_takes_its_steps_only_from_its_own_groups_record(monkeypatch):
    """Records of another group (other steps asked), without steps (a case that never trained) or of a mode this
    version no longer has are passed over, not matched and not raised on; the group's own record gives the steps."""
    others = [
        _earlier_record(energy_protocol={"asked_steps": 8, "order_seed": 0}),
        _earlier_record(steps=None),
        _earlier_record(mode="fp4-retired"),
    ]
    _, planned, measured, notes = _plan(monkeypatch, 20.0, others)
    assert len(measured) == 2 and "sizing tiny" in notes[0]  # nothing matched: sized afresh
    assert {c.steps for c in planned} == {1 + 275}  # 5 s x 1.1 / 20 ms
    _, planned, measured, notes = _plan(monkeypatch, 20.0, [*others, _earlier_record()])
    assert measured == [] and {c.steps for c in planned} == {40}
    assert notes == ["energy protocol: tiny: steps 3 -> 40, as sized before the resume"]


# ---------------------------------------------------------------- the runner: a wait's lines, a skipped mode


def test_the_wait_is_told_under_the_cases_label_and_a_skipped_mode_waits_for_nothing(monkeypatch):
    # idle baseline 35 C (3 reads), then 70 C at the first case's first read, back at 35 C on the next
    fake, _ = make_fake(1, temperature_c=[35, 35, 35, 70, 35], power_mw=[60_000])
    monkeypatch.setattr(ep, "nvml_for", lambda device: (fake, FakeHandle(0), None))
    s = ProtocolSettings(repeats=1, order_seed=0, poll_s=0.001)
    lines: list[str] = []
    records = run_cases([small_case(mode="fp32"), small_case(mode="tf32")], log=lines.append, isolate=False,
                        energy_protocol=s)  # fmt: skip
    fp32, tf32 = sorted(records, key=lambda r: r["mode"])
    waited = [line for line in lines if "waiting for the GPU to cool" in line]
    assert len(waited) == 1 and waited[0].startswith("[1/2] fp32 ")  # the case's label, as its other lines
    assert "tiny b2x32: waiting for the GPU to cool: 70 C -> idle 35 C" in waited[0]
    assert fp32["cooldown_settled"] is True and fp32["start_temperature_c"] == 35
    assert tf32["status"] == "skipped"  # a CPU has no TF32
    assert tf32["cooldown_settled"] is None
    assert tf32["cooldown_reason"] == "the mode does not run here (skipped): no wait"
    assert fake.calls["nvmlDeviceGetTemperature"] == 3 + 2  # the baseline and fp32's wait; none for tf32


# ---------------------------------------------------------------- pooled figures and their table


def test_one_repeat_with_a_figure_has_a_median_but_no_spread():
    one = energy.figure([_protocol_record(400.0, 1), _protocol_record(None, 2, energy_reason="counter lost")])
    assert one.j_per_token == pytest.approx(1 / 400) and one.spread is None and one.suspect is None
    assert one.reason == "1 repeat with a figure: a spread needs 2 or more"
    assert "no spread (1 repeat with a figure" in one.describe()


def test_the_procurement_section_shows_the_energy_spread_as_a_percentage():
    repeats = [_protocol_record(t, i + 1) for i, t in enumerate((400.0, 440.0, 380.0))]
    _, md = procurement.section(pandas.DataFrame(repeats), None, None)
    row = md.splitlines()[-1].split(" | ")
    heads = md.splitlines()[-3].split(" | ")
    assert row[heads.index("energy spread")] == "14.4%"  # (1/380 - 1/440) / (1/400)
    assert procurement._fmt(0.05, "energy_spread") == "5.0%"


# ---------------------------------------------------------------- the CLI


def test_calibrate_says_why_the_bandwidth_was_not_measured(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibration, "unavailable", lambda device, name: "no such kernel here")  # no matmul timed

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(calibration, "time_call", out_of_memory)
    path = tmp_path / "c.json"
    assert main(["calibrate", "--device", "cpu", "--dtypes", "fp32", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("memory bandwidth"))
    assert line.startswith("memory bandwidth: not measured: the ") and "MiB copy failed: RuntimeError: out of" in line
    saved = json.loads(path.read_text())["bandwidth"]
    assert saved["bytes_per_s"] is None and saved["reason"] in line


def test_run_fidelity_refuses_a_model_that_cannot_fit_twice_before_training(capsys, monkeypatch):
    monkeypatch.setattr(fidelity, "available_bytes", lambda device: (10 * 2**20, "available RAM"))
    monkeypatch.setattr(cli_run, "run_cases", lambda *a, **kw: pytest.fail("trained a case it cannot check"))
    assert main(["run", "--device", "cpu", "--model", "tiny", "--modes", "fp32", "--fidelity"]) == 2
    line = error_line(capsys)
    assert "model='tiny', seq_len=" in line and "use a smaller --model or --seq-len" in line


def test_a_resumed_protocol_run_tables_every_repeat_of_its_run_and_plots_them(tmp_path, capsys, monkeypatch):
    """After a resume, the table and the energy lines are the whole protocol run's: the repeats recorded before
    the interruption too (`cases` has no repeats to match them), but no other run's records in the same file."""
    monkeypatch.setattr(cli_run, "run_cases", functools.partial(run_cases, isolate=False))  # seconds, not tens
    out = tmp_path / "r.jsonl"
    argv = ["run", "--device", "cpu", "--model", "tiny", "--modes", "fp32", "--steps", "3", "--warmup", "1",
            "--batch-size", "2", "--seq-len", "32", "--energy-protocol", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(out)]) == 0
    first = out.read_text().splitlines()
    other_run = json.loads(first[0]) | {"run_id": "another-run", "steps": 5}  # another run's case, same file
    out.write_text("\n".join([json.dumps(other_run), *first[:2]]) + "\n")  # repeat 3 lost: an interrupted run
    capsys.readouterr()
    assert main([*argv, "--resume", str(out), "--plot"]) == 0
    printed = capsys.readouterr().out
    assert "(1 written)" in printed
    energy_lines = printed.split("median over the repeats):\n")[1].split("\n\n")[0].splitlines()
    assert len(energy_lines) == 1 and "energy protocol, 3 repeat(s)" in energy_lines[0]
    plot = out.with_suffix(".png")
    assert f"loss curves: {plot}" in printed and plot.stat().st_size > 0
