"""Run A against run B: the verdicts follow the baseline noise rules, both ways."""

import pytest

from suite.cli.main import main
from suite.records import store
from suite.records.store import make_record
from suite.reporting.compare import compare_runs, exit_code, format_comparison

CASE = dict(model="gpt2-small", batch_size=16, seq_len=1024, steps=60, warmup=10, seed=0, compile=False)


def _record(mode="bf16", step=100.0, spread=0.01, **kw):
    """A record whose p10-p90 spread is `spread` of its median step time."""
    values = dict(mode=mode, status="ok", gpu_name="NVIDIA H100 80GB HBM3", step_time_ms=step,
                  step_time_p10_ms=step * (1 - spread / 2), step_time_p90_ms=step * (1 + spread / 2),
                  tokens_per_s=16384 / step * 1000, mfu=0.4, peak_mem_allocated_mb=20_000.0, peak_mem_mb=20_600.0,
                  final_loss=3.0, energy_j_per_step=50.0)  # fmt: skip
    return make_record(**(CASE | values | kw))


def _run(**kw):
    return [_record("fp32", step=200.0, **kw), _record("bf16", **kw)]


def _verdicts(rows, metric):
    return {r.mode: r.verdict for r in rows if r.metric == metric}


def test_the_same_records_are_the_same():
    rows = compare_runs(_run(), _run())
    assert {r.verdict for r in rows} == {"same", "info"}
    assert {r.metric for r in rows if r.verdict == "info"} == {"tokens_per_s", "mfu"}
    assert all(r.ratio == 1.0 for r in rows)
    assert exit_code(rows) == 0
    assert "0 regressed" in format_comparison(rows)


def test_slower_beyond_the_spread_regresses_naming_metric_mode_and_values():
    a = [_record(step=100.0)]
    rows = compare_runs(a, [_record(step=112.0)])
    bad = [r for r in rows if r.verdict == "regressed"]
    assert [r.metric for r in bad] == ["step_time_ms"]
    # allowed = 100 + 100 * (2% floor + 1% spread, the larger of the two runs')
    assert bad[0].message == "gpt2-small/bf16 step_time_ms: 100 -> 112 (x1.12), allowed up to 103: regressed"
    assert bad[0].ratio == pytest.approx(1.12) and bad[0].allowed == pytest.approx(103.0)
    assert exit_code(rows) == 1
    text = format_comparison(rows)
    assert "regressed" in text and bad[0].message in text


def test_slower_within_the_measured_spread_is_not_a_regression():
    rows = compare_runs([_record(step=100.0, spread=0.06)], [_record(step=107.0, spread=0.06)])
    assert _verdicts(rows, "step_time_ms") == {"bf16": "same"}
    assert exit_code(rows) == 0


def test_better_by_more_than_the_allowance_is_an_improvement():
    rows = compare_runs([_record(step=100.0)], [_record(step=90.0, final_loss=2.9, peak_mem_allocated_mb=10_000.0)])
    assert _verdicts(rows, "step_time_ms") == {"bf16": "improved"}
    assert _verdicts(rows, "final_loss") == {"bf16": "improved"}
    assert _verdicts(rows, "peak_mem_allocated_mb") == {"bf16": "improved"}
    assert _verdicts(rows, "energy_j_per_step") == {"bf16": "same"}
    assert exit_code(rows) == 0
    # a little better is still the same: the allowance is symmetric
    assert _verdicts(compare_runs([_record(step=100.0)], [_record(step=98.0)]), "step_time_ms") == {"bf16": "same"}


def test_unmatched_and_failed_cases_are_listed():
    a = [_record("fp32", step=200.0), _record("bf16")]
    b = [_record("fp32", step=200.0, seed=1), _record("bf16", status="oom", reason="CUDA out of memory")]
    rows = compare_runs(a, b)
    unmatched = [r for r in rows if r.verdict == "unmatched"]
    assert len(unmatched) == 2 and all(r.metric == "-" for r in unmatched)
    assert any("only in A" in r.message for r in unmatched) and any("only in B" in r.message for r in unmatched)
    failed = [r for r in rows if r.metric == "status"]
    assert failed[0].verdict == "regressed" and "CUDA out of memory" in failed[0].message
    assert exit_code(rows) == 1


def test_missing_metrics_are_not_compared():
    rows = compare_runs([_record(energy_j_per_step=None, mfu=None)], [_record()])
    assert not {"energy_j_per_step", "mfu"} & {r.metric for r in rows}


@pytest.mark.parametrize(
    "setting, value",
    [("lr", 3e-5), ("weight_decay", 0.0), ("data", "other.txt"), ("world_size", 2), ("parallel", "fsdp"),
     ("grad_comm", "bf16"), ("warmup", 5), ("compile", True)],
)  # fmt: skip
def test_cases_that_differ_in_any_setting_are_not_compared(setting, value):
    a = [_record(lr=3e-4, final_loss=3.0)]
    rows = compare_runs(a, [_record(lr=3e-4, final_loss=3.5) | {setting: value}])  # worse loss: another case
    assert {r.verdict for r in rows} == {"unmatched"} and exit_code(rows) == 1
    only_a = next(r for r in rows if "only in A" in r.message)
    assert f"B has it with other settings (A vs B: {setting} " in only_a.message and f"vs {value}" in only_a.message


def test_a_data_file_is_matched_by_its_content():
    a = _record(data="/home/a/d.txt", data_sha256="ab12")
    assert exit_code(compare_runs([a], [a | {"data": "/ci/d.txt"}])) == 0  # the same bytes elsewhere
    rows = compare_runs([a], [a | {"data_sha256": "cd34"}])
    assert "data /home/a/d.txt with other content (sha256 ab12 vs cd34)" in rows[0].message


@pytest.mark.parametrize(
    "a, b, why",
    [
        ([], _run(), "A has no records"),
        (_run(), [], "B has no records"),
        (_run(), _run(seed=1), "no case of A matches a case of B in every setting"),
        (_run(), [r | {"model": "tiny"} for r in _run()], "A holds model(s) gpt2-small and B tiny: none in common"),
        ([_record(status="skipped", reason="needs sm80")], [_record(status="skipped", reason="needs sm80")],
         "every case in both A and B is skipped or failed on both sides"),
    ],
)  # fmt: skip
def test_nothing_compared_fails_and_says_why(tmp_path, capsys, a, b, why):
    paths = []
    for name, records in (("a", a), ("b", b)):
        path = tmp_path / f"{name}.jsonl"
        path.touch()
        for r in records:
            store.append(path, r)
        paths.append(str(path))
    assert main(["compare", *paths]) == 1
    out = capsys.readouterr().out
    assert f"nothing was compared: {why}" in out and "0 regression(s)" not in out


def _noisy(step=100.0, p10=90.0, p90=490.0, **kw):
    """A record whose step time's p10-p90 spread is (p90 - p10) / step: 400% with the defaults."""
    return _record(step=step, **kw) | {"step_time_p10_ms": p10, "step_time_p90_ms": p90}


def test_a_slower_step_within_a_5x_noise_allowance_is_inconclusive_not_same():
    # issue 22: 1.47x slower, and A's own spread (400%) let B be up to 5.02x slower: "same" was no verdict
    rows = compare_runs([_noisy()], [_record(step=147.0)])
    step = next(r for r in rows if r.metric == "step_time_ms")
    assert step.verdict == "inconclusive" and step.allowed == pytest.approx(502.0)
    assert step.message == (
        "gpt2-small/bf16 step_time_ms: 100 -> 147 (x1.47), allowed up to 502: inconclusive: noise too large to "
        "judge (step-time p10-p90 spread A 400%, B 1%; bound 20%); rerun on a quiet machine (mpbench doctor)"
    )
    # energy per step is allowed the same spread; memory and loss have fixed bounds and are still judged
    assert _verdicts(rows, "energy_j_per_step") == {"bf16": "inconclusive"}
    assert _verdicts(rows, "peak_mem_allocated_mb") == _verdicts(rows, "final_loss") == {"bf16": "same"}
    assert exit_code(rows) == 3
    text = format_comparison(rows)
    assert "0 regressed, 0 improved, 3 same, 2 inconclusive," in text and step.message in text


def test_a_noisy_b_is_inconclusive_too():
    rows = compare_runs([_record(step=100.0)], [_noisy(step=100.0, p10=80.0, p90=130.0)])  # B spread 50%
    assert _verdicts(rows, "step_time_ms") == {"bf16": "inconclusive"}
    assert "spread A 1%, B 50%" in next(r.message for r in rows if r.metric == "step_time_ms")


@pytest.mark.parametrize(
    "b_step, verdict, code",
    [(110.0, "same", 0), (125.0, "regressed", 1), (75.0, "improved", 0)],
)
def test_a_pair_just_under_the_noise_bound_is_still_judged(b_step, verdict, code):
    # A's spread 19%, under the 20% bound: allowed up to 100 x (1 + 2% + 19%) = 121, better than 79
    a = _noisy(step=100.0, p10=91.0, p90=110.0)
    rows = compare_runs([a], [_record(step=b_step)])
    assert _verdicts(rows, "step_time_ms") == {"bf16": verdict}
    assert "inconclusive" not in {r.verdict for r in rows} and exit_code(rows) == code


@pytest.mark.parametrize(
    "p10, p90, b_step, verdict",
    [(90.0, 490.0, 600.0, "regressed"), (85.0, 115.0, 140.0, "regressed"), (85.0, 115.0, 60.0, "improved")],
)
def test_a_difference_beyond_even_a_wide_allowance_is_still_judged(p10, p90, b_step, verdict):
    # past the allowance (A's spread 400%: up to 502; 30%: 68 to 132) the median beat the noise it was measured with
    rows = compare_runs([_noisy(p10=p10, p90=p90)], [_record(step=b_step)])
    assert _verdicts(rows, "step_time_ms") == {"bf16": verdict}


def test_exit_codes_regressed_outranks_inconclusive_outranks_pass():
    quiet, noisy = _run(), [_noisy(mode="fp32", step=200.0, p10=180.0, p90=980.0), _record("bf16")]
    assert exit_code(compare_runs(quiet, quiet)) == 0
    assert exit_code(compare_runs(noisy, _run())) == 3  # fp32 too noisy, bf16 the same
    slower_bf16 = [_record("fp32", step=200.0), _record("bf16", step=150.0)]
    assert exit_code(compare_runs(noisy, slower_bf16)) == 1  # fp32 too noisy, bf16 regressed


def test_a_suspect_noisy_figure_stays_suspect_and_says_it_would_be_inconclusive():
    b = _record(step=147.0, suspect=[{"rule": "not_throttled", "fields": ["step_time_ms"], "note": "throttled"}])
    rows = compare_runs([_noisy()], [b])
    step = next(r for r in rows if r.metric == "step_time_ms")
    assert step.verdict == "suspect" and "(would be inconclusive: noise too large to judge" in step.message


def test_the_command_exits_3_and_counts_inconclusive_in_its_last_line(tmp_path, capsys):
    paths = []
    for name, records in (("a", [_noisy()]), ("b", [_record(step=147.0)])):
        path = tmp_path / f"{name}.jsonl"
        for r in records:
            store.append(path, r)
        paths.append(str(path))
    assert main(["compare", *paths]) == 3
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == "0 regression(s), 2 inconclusive (too noisy to judge)"
    assert "step_time_ms: 100 -> 147 (x1.47), allowed up to 502: inconclusive: noise too large" in out
