"""The convergence tolerances come from the committed multi-seed measurement, and they still catch a
regression: the table re-derives from results/tolerances/, a planted +0.05 nats fails, the honest run passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from suite.records import store
from suite.reporting import tolerances
from suite.reporting.convergence import HAND_SET, MEASURED, TOLERANCES, parse_tolerances, tolerance_of
from suite.reporting.seeds import judge

CPU_DEFAULT = ("tiny", "cpu", 40, "cosine")  # what the bounds were measured at: convergence.measured_as
MEASUREMENTS = Path(__file__).resolve().parents[1] / "results" / "tolerances"
RECORDS = [MEASUREMENTS / "tiny-cpu-8x64.jsonl", MEASUREMENTS / "tiny-cpu-8x128.jsonl"]


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    return store.read_all([str(p) for p in RECORDS])


def test_the_measured_table_is_what_the_committed_records_give(measured):
    derived = {d.mode: d for d in tolerances.derive(measured)}
    assert {d.config for d in derived.values()} == {CPU_DEFAULT} and set(MEASURED) == {CPU_DEFAULT}
    assert set(derived) == set(MEASURED[CPU_DEFAULT])  # every mode that ran on the CPU, nothing else
    for mode, tol in MEASURED[CPU_DEFAULT].items():
        d = derived[mode]
        assert d.n == 10 and tol.max_delta == pytest.approx(d.bound), mode
        assert f"{d.mean:+.4f}" in tol.why, f"{mode}: the why should quote the measured mean {d.mean:+.4f}"
        assert d.ci_high <= tol.max_delta  # the machine that measured it passes it, interval and all


def _verdicts(records: list[dict]) -> dict:
    out = {}
    for size in {(r["batch_size"], r["seq_len"]) for r in records}:
        group = [r for r in records if (r["batch_size"], r["seq_len"]) == size]
        out |= {(v.mode, size): v for v in judge(group, TOLERANCES)}
    return out


def test_the_measured_runs_pass_and_a_planted_005_nat_shift_fails(measured):
    honest = _verdicts(measured)
    assert {size for _, size in honest} == {(8, 64), (8, 128)}
    assert {v.outcome for (m, _), v in honest.items() if m in MEASURED[CPU_DEFAULT]} == {"pass"}
    for mode, tol in MEASURED[CPU_DEFAULT].items():
        shifted = _verdicts([r | {"final_loss": r["final_loss"] + 0.05} if r["mode"] == mode else r for r in measured])
        for size in ((8, 64), (8, 128)):
            v = shifted[(mode, size)]
            if tol.expected_to_lag:  # never a FAIL: +0.05 on the size whose lag set the bound is past it
                assert v.outcome in ("pass", "lags (expected)"), (mode, size, v.detail)
            else:
                assert v.outcome == "FAIL" and v.delta.ci_low > tol.max_delta, (mode, size, v.detail)
        if tol.expected_to_lag:
            assert "lags (expected)" in {shifted[(mode, size)].outcome for size in ((8, 64), (8, 128))}, mode


def test_pure_fp16_and_pure_bf16_are_told_apart_from_fp32_and_bf16_is_within_its_bound(measured):
    for (mode, size), v in _verdicts(measured).items():
        if mode in ("pure-fp16", "pure-bf16"):
            assert v.delta.ci_low > 0.04, (mode, size, v.delta)  # far from fp32, beyond the seed noise
        if mode in ("bf16", "amp-fp16"):
            assert v.outcome == "pass" and v.delta.ci_high < v.tolerance.max_delta, (mode, size)


def test_a_measured_bound_holds_only_for_what_was_measured():
    tiny = {"model": "tiny", "device": "cpu", "steps": 40, "lr_schedule": "cosine"}
    assert tolerance_of(TOLERANCES, tiny, "bf16") is MEASURED[CPU_DEFAULT]["bf16"]
    for other in ({"model": "gpt2-small"}, {"device": "cuda:0"}, {"steps": 200}, {"lr_schedule": "constant"},
                  {"lr_schedule": None}):  # fmt: skip
        assert tolerance_of(TOLERANCES, tiny | other, "bf16") is HAND_SET["bf16"], other  # an old record too
    assert tolerance_of(TOLERANCES, tiny, "tf32") is HAND_SET["tf32"]  # tf32 never ran on the CPU
    table = parse_tolerances("bf16=0.2")
    assert (
        tolerance_of(table, tiny, "bf16").max_delta == 0.2 == tolerance_of(table, tiny | {"steps": 9}, "bf16").max_delta
    )
    assert tolerance_of(table, tiny, "pure-fp16").expected_to_lag  # what an override leaves alone stays


def test_an_old_record_is_judged_by_the_bound_it_was_judged_by_before():
    old = [{"model": "tiny", "mode": m, "seed": 0, "status": "ok", "device": "cpu", "steps": 200,
            "final_loss": 3.0 + d} for m, d in (("fp32", 0.0), ("int8-mixed", 0.015))]  # fmt: skip
    (verdict,) = [v for v in judge(old, TOLERANCES) if v.mode == "int8-mixed"]
    assert verdict.outcome == "pass" and verdict.tolerance is HAND_SET["int8-mixed"]


def test_the_derivation_command_prints_the_table_and_refuses_one_seed(measured, tmp_path, capsys):
    assert tolerances.main([str(p) for p in RECORDS]) == 0
    out = capsys.readouterr().out
    assert "| `bf16` | tiny, cpu, 40, cosine | 10 |" in out and "0.010" in out
    one = tmp_path / "one.jsonl"
    one.write_text("".join(line + "\n" for line in RECORDS[0].read_text().splitlines() if '"seed": 0,' in line))
    assert tolerances.main([str(one)]) == 1
    assert "run with --seeds 5" in capsys.readouterr().err


def test_the_bound_rule():
    rows = [
        {"model": "tiny", "mode": m, "seed": s, "status": "ok", "final_loss": 2.0 + d, "device": "cpu", "steps": 9}
        for s, shift in enumerate([0.000, 0.002, 0.004])
        for m, d in (("fp32", 0.0), ("bf16", 0.02 + shift))
    ]
    (d,) = tolerances.derive(rows)
    # mean 0.022, sd 0.002, t(0.975, 2) = 4.303: upper 0.022 + 4.303 x 0.002 / sqrt(3) = 0.02697; + 2 sd = 0.03097
    assert d.ci_high == pytest.approx(0.026969, abs=1e-5) and d.bound == pytest.approx(0.035)
