"""The energy protocol: the wait for an idle GPU (fake NVML, fake clock), the order, the window rule, the pooled
figures and their spread, the procurement table's wording, and runs end to end on the CPU."""

from __future__ import annotations

import json
import math
from collections import Counter

import pandas
import pytest

from suite.cli.main import main
from suite.hardware import DeviceInfo
from suite.records.store import make_record
from suite.reporting import energy
from suite.reporting.procurement import procurement_table
from suite.running import energy_protocol as ep
from suite.running.cooldown import Cooldown, no_wait
from suite.running.energy_protocol import Protocol, ProtocolSettings
from suite.running.runner import run_cases
from tests.fake_nvml import FakeClock, FakeHandle, NVMLError_GpuIsLost, make_fake, settling
from tests.helpers import small_case

CPU = DeviceInfo("cpu", "test CPU")
CUDA = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))


def _cooldown(settings: ProtocolSettings | None = None, **device) -> tuple[Cooldown, object, FakeClock]:
    """A cooldown on a fake GPU idling at 35 C and 60 W (its baseline read), on a fake clock."""
    fake, devices = make_fake(1, **(dict(temperature_c=[35], power_mw=[60_000]) | device))
    clock = FakeClock()
    cool = Cooldown(fake, FakeHandle(0), settings or ProtocolSettings(), clock, clock.sleep)
    cool.measure_idle()
    return cool, devices[0], clock


def test_the_wait_ends_when_temperature_and_power_are_back_near_idle():
    cool, gpu, clock = _cooldown()
    assert (cool.idle_c, cool.idle_w) == (35, 60) and clock.now == 1002  # 3 idle readings, 1 s apart
    assert cool.limits() == (40, 70)  # 35 + 3 C is under the 40 C floor; 60 W + max(6 W, 10 W)
    gpu.curves = {"temperature_c": settling(clock, 70, 35, 10), "power_mw": settling(clock, 300_000, 60_000, 10)}
    notes: list[str] = []
    fields = cool.wait(notes.append)
    # power is the slower one: 60 + 240 exp(-t/10) <= 70 W from t = 10 ln 24 = 31.8 s, read at the 32 s poll
    assert fields["cooldown_settled"] is True and fields["cooldown_reason"] is None
    assert fields["cooldown_s"] == 32 and sum(clock.slept[2:]) == 32  # measured on the fake clock: no real sleep
    assert fields["start_temperature_c"] <= 40 and fields["start_power_w"] <= 70
    assert notes[0] == "waiting for the GPU to cool: 70 C -> idle 35 C, 300 W -> idle 60 W, 0 s of 120 s"
    assert len(notes) == 4  # one line per 10 s of waiting: 0, 10, 20, 30 s


def test_a_gpu_that_never_cools_is_waited_on_until_the_limit_and_the_case_runs_anyway():
    cool, gpu, clock = _cooldown(ProtocolSettings(max_wait_s=30))
    gpu.curves = {"temperature_c": settling(clock, 70, 35, math.inf)}  # stays at 70 C; power idles
    fields = cool.wait(lambda line: None)
    assert fields["cooldown_settled"] is False and fields["cooldown_s"] == 30
    assert fields["start_temperature_c"] == 70
    assert "not back to idle within 30 s: 70 C (settled at <= 40 C)" in fields["cooldown_reason"]
    assert "the case ran anyway" in fields["cooldown_reason"]


def test_a_failing_nvml_call_ends_the_wait_with_its_reason():
    cool, _, _ = _cooldown(temperature_c=[35, 35, 35, 80, NVMLError_GpuIsLost])
    fields = cool.wait(lambda line: None)
    assert fields["cooldown_settled"] is False and fields["start_temperature_c"] == 80  # the last good reading
    assert (
        "stopped waiting: nvmlDeviceGetTemperature failed: GPU is lost (NVMLError_GpuIsLost)"
        in (fields["cooldown_reason"])
    )
    broken, _, _ = _cooldown(unsupported={"nvmlDeviceGetPowerUsage"})  # no baseline: every case says so
    assert broken.idle_c is None and "idle baseline unreadable" in broken.idle_reason
    assert broken.wait(lambda line: None) == no_wait(broken.idle_reason)


def test_a_stalled_nvml_call_is_abandoned_and_never_made_again():
    settings = ProtocolSettings(call_timeout_s=0.05)
    cool, _, _ = _cooldown(settings, stalls={"nvmlDeviceGetTemperature": 4}, stall_s=2.0)
    fields = cool.wait(lambda line: None)
    assert fields["cooldown_settled"] is False
    assert "nvmlDeviceGetTemperature did not answer within 0.05 s" in fields["cooldown_reason"]
    calls = cool.nvml.calls["nvmlDeviceGetTemperature"]
    again = cool.wait(lambda line: None)  # the next case: no call, no wait, the reason
    assert cool.nvml.calls["nvmlDeviceGetTemperature"] == calls
    assert "stalled earlier in this run" in again["cooldown_reason"]


def test_every_mode_is_repeated_in_a_seeded_order_with_each_repeats_fp32_first():
    modes = ["bf16", "tf32", "amp-fp16", "fp32", "pure-fp16"]
    cases = [small_case(mode=m, seed=s) for s in (0, 1) for m in modes]
    ordered = ep.order(cases, 3, seed=11)
    assert ordered == ep.order(cases, 3, seed=11)  # reproducible from the recorded seed
    assert Counter((c.mode, c.seed) for c in ordered) == Counter({(m, s): 3 for m in modes for s in (0, 1)})
    assert [c.repeat for c in ordered] == [1] * 10 + [2] * 10 + [3] * 10  # round by round
    for i, c in enumerate(ordered):  # each repeat's fp32 runs before the modes compared with it
        ref = next(j for j, x in enumerate(ordered) if (x.mode, x.seed, x.repeat) == ("fp32", c.seed, c.repeat))
        assert ref <= i
    rounds = {tuple(c.mode for c in ep.order(cases, 1, seed)) for seed in range(10)}
    assert len(rounds) > 1  # shuffled, not the matrix's order


def test_the_window_rule_sizes_one_step_count_for_the_whole_group():
    s = ProtocolSettings()
    assert s.window_s == 5.0  # 60 samples x 0.05 s = 3 s < 5 s
    assert ProtocolSettings(min_power_samples=200).window_s == 10.0  # now the samples rule
    assert ep.timed_steps_needed(20.0, s) == 275  # 5 s x 1.1 / 20 ms
    case = small_case(steps=40, warmup=5)
    # the fastest mode needs the most steps; the GPU keeps its profiler steps after the window
    assert ep.sized_steps(case, {"fp32": 50.0, "bf16": 20.0}, CUDA, s) == 5 + 275 + 3
    assert ep.sized_steps(case, {"fp32": 50.0}, CPU, s) == 5 + 110
    assert ep.sized_steps(small_case(steps=1000, warmup=5), {"fp32": 20.0}, CPU, s) == 1000  # long enough
    assert ep.sized_steps(case, {}, CPU, s) == 40  # no mode could be timed: unchanged
    sizing = ep.sizing_case(small_case(steps=40, warmup=5, eval_every=10, lr_warmup=20), s, CUDA)
    assert (sizing.steps, sizing.eval_every, sizing.lr_warmup, sizing.repeat) == (18, 0, None, 0)


def test_plan_extends_every_mode_and_repeat_alike_and_says_why(monkeypatch):
    monkeypatch.setattr(ep, "windows_apply", lambda device: None)  # as on a GPU with NVML
    s = ProtocolSettings(repeats=2, order_seed=3)
    protocol = Protocol(s, {"cpu": CPU})
    sized: list = []

    def measure(case):
        sized.append(case)
        return {"fp32": 50.0, "bf16": 25.0}[case.mode]

    notes: list[str] = []
    cases = protocol.plan([small_case(mode="fp32", steps=3), small_case(mode="bf16", steps=3)], {"cpu": CPU},
                          measure, notes.append)  # fmt: skip
    assert [c.steps for c in sized] == [1 + 10] * 2  # warm-up + sizing_steps, unrecorded
    assert {c.steps for c in cases} == {1 + 220} and len(cases) == 4  # 5 s x 1.1 / 25 ms
    assert any("steps 3 -> 221 for every mode and repeat" in n and "25.0 ms/step" in n for n in notes)
    info = protocol.settings_dict(cases[0])
    assert (
        info["asked_steps"] == 3 and info["extended"] is True and info["sizing_step_ms"] == {"fp32": 50.0, "bf16": 25.0}
    )
    assert info["order_seed"] == 3 and info["repeats"] == 2 and info["idle_reason"].startswith("CPU")


def _protocol_record(tpj: float, repeat: int, start_c: float = 35.0, **kw) -> dict:
    values = dict(mode="bf16", model="gpt2-small", device="cuda:0", batch_size=16, seq_len=1024, steps=100, warmup=10,
                  seed=0, status="ok", gpu_name="NVIDIA H100 80GB HBM3", tokens_per_s=100_000.0, step_time_ms=160.0,
                  tokens_per_joule=tpj, repeat=repeat, start_temperature_c=start_c, cooldown_settled=True,
                  energy_protocol={"spread_bound": 0.05, "repeats": 3})  # fmt: skip
    return make_record(**(values | kw))


def test_a_spread_above_the_bound_marks_the_figure_suspect():
    tight = energy.figure([_protocol_record(t, i + 1) for i, t in enumerate((400.0, 404.0, 398.0))])
    assert tight.j_per_token == pytest.approx(1 / 400) and tight.spread == pytest.approx((1 / 398 - 1 / 404) * 400)
    assert tight.suspect is None
    loose = energy.figure([_protocol_record(t, i + 1) for i, t in enumerate((400.0, 440.0, 380.0))])
    assert loose.spread > 0.05 and "spread 14.4% over 3 repeats exceeds 5%" in loose.suspect
    hot = energy.figure([_protocol_record(400.0, 1), _protocol_record(400.0, 2, cooldown_settled=False)])
    assert "1 repeat(s) started before the GPU was back to idle" in hot.suspect
    none = energy.figure([_protocol_record(None, 1, energy_reason="CPU: no energy counter")])
    assert none.j_per_token is None and none.reason == "CPU: no energy counter" and none.suspect is None


def test_procurement_uses_the_protocols_median_and_says_when_a_figure_is_not_under_it():
    repeats = [_protocol_record(t, i + 1, start_c=34 + i) for i, t in enumerate((400.0, 440.0, 380.0))]
    plain = make_record(**{k: v for k, v in repeats[0].items() if k in ("mode", "model", "device", "status",
                           "gpu_name", "tokens_per_s", "step_time_ms", "batch_size", "seq_len", "steps", "warmup",
                           "seed")} | {"mode": "fp32", "tokens_per_joule": 300.0})  # fmt: skip
    rows = procurement_table(pandas.DataFrame([plain, *repeats]), {}, None).to_dict(orient="records")
    assert len(rows) == 2  # the three repeats pool into one row
    fp32, bf16 = rows
    assert fp32["tokens_per_kj"] == pytest.approx(300_000) and fp32["energy_protocol"] == "no"
    assert "tokens per kJ not measured under the energy protocol" in fp32["notes"]
    assert bf16["tokens_per_kj"] == pytest.approx(400_000)  # the median repeat
    assert bf16["energy_spread"] == pytest.approx((1 / 380 - 1 / 440) * 400)
    assert bf16["start_temperature_c"] == "34-36"
    assert bf16["energy_protocol"].startswith("energy protocol: median of 3 repeats, spread 14.4%")
    assert (
        bf16["notes"].startswith("SUSPECT: energy per token spread 14.4%")
        and "not measured under" not in (bf16["notes"])
    )


def test_a_cpu_run_under_the_protocol_orders_repeats_and_skips_the_wait(tmp_path):
    out = tmp_path / "r.jsonl"
    s = ProtocolSettings(repeats=2, order_seed=5)
    records = run_cases([small_case(mode="bf16"), small_case(mode="fp32")], out=out, log=None, isolate=False,
                        energy_protocol=s)  # fmt: skip
    assert [(r["mode"], r["repeat"]) for r in records] == [("fp32", 1), ("bf16", 1), ("fp32", 2), ("bf16", 2)]
    for r in records:
        assert r["status"] == "ok" and r["steps"] == 3  # a CPU has no power samples: nothing to extend
        assert r["cooldown_settled"] is None and r["cooldown_reason"].startswith("CPU: no NVML temperature")
        assert (
            r["energy_protocol"]["order_seed"] == 5
            and "windows are not extended" in (r["energy_protocol"]["window_reason"])
        )
        assert r["tokens_per_joule"] is None and r["energy_reason"].startswith("CPU")
    assert all(r["loss_delta_vs_fp32"] is not None for r in records)  # each against its repeat's fp32
    again = run_cases([small_case(mode="bf16"), small_case(mode="fp32")], out=out, log=None, isolate=False,
                      energy_protocol=s, resume=True)  # fmt: skip
    assert again == []  # the repeats are distinct cases: all four are on record


def test_the_runner_waits_and_sizes_through_nvml(monkeypatch, tmp_path):
    """The runner's wiring on the CPU, with a fake NVML standing in for the GPU's and windows sized as on one."""
    fake, _ = make_fake(1, temperature_c=[35], power_mw=[60_000])
    monkeypatch.setattr(ep, "nvml_for", lambda device: (fake, FakeHandle(0), None))
    monkeypatch.setattr(ep, "windows_apply", lambda device: None)
    # the rule itself is tested above; here a fixed answer, so a loaded machine's step times cannot change it
    monkeypatch.setattr(ep, "timed_steps_needed", lambda step_ms, settings: 4)
    s = ProtocolSettings(repeats=2, poll_s=0.001, sizing_steps=2)
    lines: list[str] = []
    records = run_cases([small_case(mode="fp32"), small_case(mode="bf16")], log=lines.append, isolate=False,
                        energy_protocol=s)  # fmt: skip
    assert len(records) == 4 and {r["steps"] for r in records} == {1 + 4}  # warm-up + the window's steps
    assert any("(not recorded)" in line and line.startswith("sizing") for line in lines)
    for r in records:
        assert r["cooldown_settled"] is True and r["start_temperature_c"] == 35 and r["start_power_w"] == 60
        info = r["energy_protocol"]
        assert info["idle_temperature_c"] == 35 and info["idle_power_w"] == 60 and info["extended"] is True


def test_mpbench_run_energy_protocol_repeats_and_prints_the_pooled_figures(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    code = main(["run", "--device", "cpu", "--model", "tiny", "--modes", "fp32", "--steps", "3", "--warmup", "1",
                 "--batch-size", "2", "--seq-len", "32", "--energy-protocol", "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["repeat"] for r in records] == [1, 2, 3]  # the default 3 repeats, each its own case
    printed = capsys.readouterr()
    assert "x 3 repeats (energy protocol" in printed.err
    assert "energy per token under the energy protocol" in printed.out and "energy n/a" in printed.out


def test_a_resumed_run_keeps_the_steps_its_sizing_gave(monkeypatch, tmp_path):
    """Sizing again could give other steps, hence other cases: a resume reuses the recorded ones, and only the
    cases without a record run."""
    monkeypatch.setattr(ep, "windows_apply", lambda device: None)
    s = ProtocolSettings(repeats=2, order_seed=1, min_window_s=0.0, min_power_samples=1, sizing_steps=1)
    out = tmp_path / "r.jsonl"
    cases = [small_case(mode="fp32")]
    first = run_cases(cases, out=out, log=None, isolate=False, energy_protocol=s)
    assert [r["repeat"] for r in first] == [1, 2] and first[0]["energy_protocol"]["sizing_step_ms"]
    out.write_text(out.read_text().splitlines()[0] + "\n")  # the last case's record lost: an interrupted run
    measured: list = []
    monkeypatch.setattr(ep, "sized_steps", lambda *a: measured.append(a) or 99)  # a resized run would differ
    again = run_cases(cases, out=out, log=None, isolate=False, energy_protocol=s, resume=True)
    assert not measured and [(r["mode"], r["repeat"], r["steps"]) for r in again] == [("fp32", 2, first[0]["steps"])]
    assert again[0]["energy_protocol"]["sizing_reason"] == "steps as sized by the run this one resumes"


def test_the_protocol_is_refused_under_the_users_torchrun(monkeypatch):
    from suite.cli import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="energy_protocol: not available under torchrun"):
        run._run_as_rank({"energy_protocol": True})


def test_an_interrupt_while_sizing_stops_the_run_with_nothing_written(monkeypatch, tmp_path):
    import signal

    from suite.running.runner import RunInterrupted
    from suite.running.worker import Interrupted

    def interrupted(*args):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(ep, "windows_apply", lambda device: None)
    monkeypatch.setattr(ep, "sizing_case", interrupted)
    out = tmp_path / "r.jsonl"
    with pytest.raises(RunInterrupted) as stop:
        run_cases([small_case(mode="fp32")], out=out, log=None, isolate=False, energy_protocol=ProtocolSettings())
    assert stop.value.signum == signal.SIGTERM and stop.value.done == [] and len(stop.value.not_run) == 1
    assert not out.exists() or out.read_text() == ""
