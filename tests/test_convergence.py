import json

import pytest
import torch

from suite import run_cases
from suite.cli.main import main
from suite.hardware import DeviceInfo
from suite.modes import MODES
from suite.modes.amp_fp16 import AmpFP16
from suite.modes.pure_fp16 import DynamicLossScaler, PureFP16
from suite.records.store import append, make_record
from suite.reporting import convergence
from suite.reporting.convergence import TOLERANCES, check, parse_tolerances
from tests.helpers import small_case


def test_parse_tolerances_overrides_only_what_is_given():
    table = parse_tolerances("bf16=0.05, amp-fp16=0")
    assert table["bf16"].max_delta == 0.05 and table["amp-fp16"].max_delta == 0.0
    assert table["int8-weight"] == TOLERANCES["int8-weight"]
    assert table["pure-fp16"].expected_to_lag  # flags survive an override
    assert parse_tolerances(None) == TOLERANCES


@pytest.mark.parametrize(
    "text, match",
    [("bf16", "expected MODE=NATS"), ("fp7=0.1", "mode 'fp7' has no tolerance"), ("bf16=lots", "'lots' is not"),
     ("bf16=-1", "zero or positive")],
)  # fmt: skip
def test_malformed_tolerances_name_the_item(text, match):
    with pytest.raises(ValueError, match=match):
        parse_tolerances(text)


def _record(mode, final, status="ok", delta=None, **kw):
    return make_record(mode=mode, model="tiny", status=status, final_loss=final, loss_delta_vs_fp32=delta, **kw)


def test_gate_verdicts():
    records = [
        _record("fp32", 2.0, delta=0.0),
        _record("bf16", 2.01, delta=0.01),
        _record("amp-fp16", 2.05, delta=0.05),
        _record("pure-fp16", 2.4, delta=0.4),
        _record("int8-weight", None, status="diverged", reason="loss became NaN/inf at step 3"),
        _record("tf32", None, status="skipped", reason="needs CUDA"),
    ]
    outcome = {v.mode: v.outcome for v in check(records, TOLERANCES)}
    assert outcome == {
        "fp32": "reference", "bf16": "pass", "amp-fp16": "FAIL", "pure-fp16": "lags (expected)",
        "int8-weight": "lags (expected)", "tf32": "not checked",
    }  # fmt: skip
    diverged = _record("bf16", None, status="diverged", reason="NaN")
    assert check([diverged], TOLERANCES)[0].outcome == "FAIL"


def test_delta_fields():
    ref = {"final_loss": 2.0, "loss_floor": 1.5, "status": "ok"}
    rec = {"final_loss": 2.25, "loss_floor": 1.5, "status": "ok"}
    fields = convergence.delta_fields(rec, ref)
    assert fields["excess_loss"] == 0.75 and fields["loss_delta_vs_fp32"] == 0.25
    assert fields["excess_fraction"] == pytest.approx(0.75 / 0.5)  # excess over the floor, as a fraction of fp32's
    assert "no target loss" in fields["curve_reason"]  # these records have no loss curves to pair
    alone = convergence.delta_fields(rec, None)
    assert "not in this run" in alone["loss_delta_reason"]
    assert alone["curve_reason"] == alone["seconds_to_target_reason"] == alone["loss_delta_reason"]
    failed_ref = {"final_loss": None, "status": "error", "reason": "boom"}
    assert "ended as error: boom" in convergence.delta_fields(rec, failed_ref)["loss_delta_reason"]


# fp32's curve over 8 steps: the smoothing window is 2 steps (a quarter of the run, at most 5), so its smoothed
# start is (4 + 3.5) / 2 = 3.75 and its smoothed end 2.0: the target lies 90% of the way, at 2.175.
REF_CURVE = [4.0, 3.5, 3.0, 2.5, 2.0, 2.0, 2.0, 2.0]
SLOWER = [4.0, 3.6, 3.2, 2.8, 2.4, 2.2, 2.1, 2.0]  # trailing means of 2: ... 2.3 (step 6), 2.15 (step 7)


def _curved(curve, final, **kw):
    return {"status": "ok", "final_loss": final, "loss_floor": 1.5, "loss_curve": curve, "step_time_ms": 100.0} | kw


def test_paired_curve_fields_by_hand():
    ref = _curved(REF_CURVE, 2.0)
    f = convergence.delta_fields(_curved(SLOWER, 2.25), ref)
    assert f["target_loss"] == pytest.approx(2.175)
    assert f["steps_to_target"] == 7 and f["seconds_to_target"] == pytest.approx(0.7)  # 7 steps x 100 ms
    assert f["loss_delta_last_quarter"] == pytest.approx((0.1 + 0.0) / 2)  # last 2 of 8 steps, paired
    assert f["excess_fraction"] == pytest.approx(1.5)
    own = convergence.delta_fields(ref, ref)  # fp32 against itself: reaches its own target, no delta
    assert own["loss_delta_last_quarter"] == 0.0 and own["excess_fraction"] == 1.0 and own["steps_to_target"] <= 8
    assert convergence.target_loss(REF_CURVE) == f["target_loss"]


def test_paired_curve_fields_that_cannot_be_measured_say_why():
    ref = _curved(REF_CURVE, 2.0)
    emulated = convergence.delta_fields(_curved(SLOWER, 2.25, emulated=True, emulated_reason="no fp8 here"), ref)
    assert emulated["steps_to_target"] == 7 and "seconds_to_target" not in emulated
    assert emulated["seconds_to_target_reason"] == "emulated kernels, not a speed: no fp8 here"
    flat = convergence.delta_fields(_curved([4.0] * 8, 4.0), ref)
    assert "steps_to_target" not in flat and "target loss 2.1750 not reached in 8 steps" in flat["curve_reason"]
    assert "not reached" in flat["seconds_to_target_reason"]
    short = convergence.delta_fields(_curved(SLOWER[:6], 2.25), ref)
    assert "loss_delta_last_quarter" not in short and "6 and fp32's 8 steps cannot be paired" in short["curve_reason"]
    nan = convergence.delta_fields(_curved([*SLOWER[:7], float("nan")], 2.25), ref)
    assert "NaN or infinite loss in the last quarter" in nan["curve_reason"]
    at_floor = convergence.delta_fields(_curved(SLOWER, 2.25), _curved(REF_CURVE, 1.5))
    assert "excess_fraction" not in at_floor and "no excess to divide by" in at_floor["excess_fraction_reason"]
    no_floor = convergence.delta_fields(_curved(SLOWER, 2.25, loss_floor=None), ref)
    assert "no known loss floor" in no_floor["excess_fraction_reason"]


def _write(tmp_path, records):
    path = tmp_path / "r.jsonl"
    for r in records:
        append(path, r)
    return str(path)


def test_check_exit_codes(tmp_path, capsys):
    good = _write(tmp_path, [_record("fp32", 2.0, delta=0.0), _record("bf16", 2.01, delta=0.01)])
    assert main(["check", good]) == 0
    assert main(["check", good, "--tolerance", "bf16=0.001"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["check", good, "--tolerance", "bf16"]) == 2
    assert main(["check", str(tmp_path / "missing.jsonl")]) == 2
    nothing = tmp_path / "n.jsonl"
    append(nothing, _record("bf16", 2.0))  # no fp32 in the run: no delta
    assert main(["check", str(nothing)]) == 1
    assert "nothing was checked" in capsys.readouterr().out


def test_run_orders_fp32_first_and_records_deltas():
    records = run_cases([small_case(mode="bf16"), small_case(mode="fp32")], log=None, isolate=False)
    assert [r["mode"] for r in records] == ["fp32", "bf16"]
    fp32, bf16 = records
    assert fp32["loss_delta_vs_fp32"] == 0.0
    assert bf16["loss_delta_vs_fp32"] == pytest.approx(bf16["final_loss"] - fp32["final_loss"])
    assert bf16["excess_loss"] == pytest.approx(bf16["final_loss"] - bf16["loss_floor"])
    assert bf16["eval_curve"] == [[3, bf16["final_loss"]]]
    assert fp32["seeds"] == bf16["seeds"] == 1 and fp32["target_loss"] == bf16["target_loss"] is not None
    assert fp32["loss_delta_last_quarter"] == 0.0 and fp32["excess_fraction"] == 1.0
    assert bf16["steps_to_target"] is not None or "not reached" in bf16["curve_reason"]
    alone = run_cases([small_case(mode="bf16")], log=None, isolate=False)[0]
    assert alone["loss_delta_vs_fp32"] is None and "fp32 is not in this run" in alone["loss_delta_reason"]
    assert alone["target_loss"] is None and alone["curve_reason"] == alone["loss_delta_reason"]


def test_eval_every_gives_an_eval_curve():
    r = run_cases([small_case(mode="fp32", steps=6, eval_every=2)], log=None, isolate=False)[0]
    assert [step for step, _ in r["eval_curve"]] == [2, 4, 6]
    assert r["eval_curve"][-1][1] == r["final_loss"]


class OverflowingAmp(AmpFP16):
    """amp-fp16 whose first scale is far too large: fp16 gradients overflow at once."""

    name = "test-amp-overflow"

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**60)
        self._scale = self.scaler.get_scale()


class OverflowingPureFP16(PureFP16):
    name = "test-pure-overflow"

    def __init__(self, device: DeviceInfo) -> None:
        super().__init__(device)
        self.scaler = DynamicLossScaler(init_scale=2.0**60)


@pytest.mark.parametrize("mode", [OverflowingAmp, OverflowingPureFP16])
def test_overflow_is_counted_and_the_scale_backs_off(mode, monkeypatch):
    monkeypatch.setitem(MODES, mode.name, mode)
    r = run_cases([small_case(mode=mode.name, steps=4)], log=None, isolate=False)[0]
    assert r["status"] == "ok"
    assert r["overflow_steps"] >= 1
    scales = r["loss_scale_curve"]
    assert len(scales) == 4 and scales[0] < 2.0**60 and scales == sorted(scales, reverse=True)


def test_records_survive_json_with_curves(tmp_path):
    out = tmp_path / "r.jsonl"
    run_cases([small_case(mode="amp-fp16", steps=2, warmup=1)], out=out, log=None, isolate=False)
    r = json.loads(out.read_text())
    assert r["loss_scale_curve"] == [65536.0, 65536.0] and r["overflow_steps"] == 0


def test_paired_fields_of_a_case_without_a_final_loss_or_a_step_time():
    failed = convergence.delta_fields({"final_loss": None, "status": "diverged"}, _curved(REF_CURVE, 2.0))
    assert failed["loss_delta_reason"] == "this case has no final_loss (status diverged)" == failed["curve_reason"]
    untimed = convergence.delta_fields(_curved(SLOWER, 2.25, step_time_ms=None), _curved(REF_CURVE, 2.0))
    assert untimed["steps_to_target"] == 7 and untimed["seconds_to_target_reason"] == "no step time was measured"
