"""`mpbench compare` over seeds: a mode's mean delta vs fp32 with its interval in A against B's.

The rule is tested on verdicts built by hand; whole comparisons stand seeds.judge in with
tests/seed_fakes.fake_judge (the real one is issue 23's verdict23 part), except the last test, which
runs the real judge and skips until it exists.
"""

import pytest

from suite.cli.main import main
from suite.records import store
from suite.reporting import seeds
from suite.reporting.compare import SEEDS_METRIC, compare_runs, exit_code, format_comparison
from suite.reporting.compare_seeds import judge_pair
from tests import seed_fakes
from tests.seed_fakes import fake_floors, fake_judge, records, verdict

JUDGE = seed_fakes.judge_missing()


def test_disjoint_intervals_beyond_the_noise_regress_and_overlapping_ones_do_not():
    a = verdict("bf16", [0.001, 0.002, 0.0015, 0.0012], "pass")
    assert judge_pair(a, verdict("bf16", [0.012, 0.013, 0.0125, 0.0121], "pass"))[0] == "regressed"
    assert judge_pair(verdict("bf16", [0.012, 0.013, 0.0125, 0.0121], "pass"), a)[0] == "improved"
    overlapping = verdict("bf16", [0.004, -0.001, 0.006, 0.000], "pass")  # interval straddles A's
    assert judge_pair(a, overlapping)[0] == "same"


def test_overlapping_intervals_with_a_worse_verdict_are_inconclusive_not_same():
    a = verdict("bf16", [0.010, 0.020, 0.015], "pass", tol=0.03)
    b = verdict("bf16", [0.005, 0.030, 0.020], "inconclusive", tol=0.03)
    assert judge_pair(a, b)[0] == "inconclusive"
    assert judge_pair(b, a)[0] == "same"  # a better verdict within the noise is no improvement


def test_disjoint_but_within_the_seed_noise_is_the_same():
    """30 seeds: the intervals are narrow (+-0.37 sd) and part, yet the means differ by less than one sd."""
    spread = [(-1) ** i * 0.01 * (1 + i % 3) / 2 for i in range(30)]  # sd ~0.009
    a = verdict("bf16", spread, "pass")
    b = verdict("bf16", [x + 0.0092 for x in spread], "pass")
    assert b.delta.ci_low > a.delta.ci_high and b.delta.mean - a.delta.mean < a.delta.sd
    assert judge_pair(a, b)[0] == "same"


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(seeds, "judge", fake_judge)
    monkeypatch.setattr(seeds, "noise_floors", fake_floors)


def test_a_shift_the_per_seed_rule_lets_through_regresses_over_seeds(fake):
    """(fake_judge) +0.011 nats on every seed is under final_loss's per-seed allowance (0.02), but the
    intervals over seeds part: the seeds' row regresses, says what it compared, and the exit code is 1."""
    a = records({"bf16": [0.001, 0.002, 0.0015]})
    b = records({"bf16": [0.012, 0.013, 0.0125]})
    rows = compare_runs(a, b)
    assert {r.verdict for r in rows if r.metric == "final_loss"} == {"same"}
    (row,) = [r for r in rows if r.metric == SEEDS_METRIC]
    assert row.mode == "bf16" and row.verdict == "regressed" and row.b == pytest.approx(0.0125)
    assert "A +0.0015 [" in row.message and "over 3 seeds (pass)" in row.message
    assert exit_code(rows) == 1
    assert row.message in format_comparison(rows)


def test_overlapping_seeds_are_the_same_and_single_seed_runs_get_no_seed_row(fake):
    rows = compare_runs(records({"bf16": [0.001, 0.002, 0.0015]}), records({"bf16": [0.002, -0.001, 0.004]}))
    assert [r.verdict for r in rows if r.metric == SEEDS_METRIC] == ["same"] and exit_code(rows) == 0
    one = [r for r in records({"bf16": [0.001, 0.002, 0.003]}) if r["seed"] == 0]
    assert not [r for r in compare_runs(one, one) if r.metric == SEEDS_METRIC]
    two_vs_one = compare_runs(records({"bf16": [0.001, 0.002]}, seeds=2), one)  # B has one seed: per seed only
    assert not [r for r in two_vs_one if r.metric == SEEDS_METRIC]


def test_the_command_counts_the_modes_compared_over_seeds(tmp_path, capsys, fake):
    paths = []
    for name, shift in (("a", [0.001, 0.002, 0.0015]), ("b", [0.012, 0.013, 0.0125])):
        path = tmp_path / f"{name}.jsonl"
        for r in records({"bf16": shift}):
            store.append(path, r)
        paths.append(str(path))
    assert main(["compare", *paths]) == 1
    out = capsys.readouterr().out
    assert "1 mode(s) compared over seeds (mean delta vs fp32, 95% interval)" in out
    assert "bf16 mean final-loss delta vs fp32 over seeds" in out


@pytest.mark.skipif(JUDGE is not None, reason=str(JUDGE))
def test_the_real_judge_flags_a_disjoint_regression_and_not_an_overlapping_one():
    """(after the merge) the same two comparisons through seeds.judge."""
    a = records({"bf16": [0.001, 0.002, 0.0015, 0.001, 0.002]}, seeds=5)
    worse = records({"bf16": [0.012, 0.013, 0.0125, 0.012, 0.013]}, seeds=5)
    alike = records({"bf16": [0.002, -0.001, 0.004, 0.0, 0.003]}, seeds=5)
    assert [r.verdict for r in compare_runs(a, worse) if r.metric == SEEDS_METRIC] == ["regressed"]
    assert [r.verdict for r in compare_runs(a, alike) if r.metric == SEEDS_METRIC] == ["same"]


def test_fp32_against_itself_is_no_row(monkeypatch):
    """A judge may give fp32 its zero deltas over seeds: the reference is never compared with itself."""
    monkeypatch.setattr(seeds, "noise_floors", fake_floors)
    monkeypatch.setattr(seeds, "judge", lambda rs, tol: [verdict("fp32", [0.0, 0.0, 0.0], "reference", tol=None),
                                                         *fake_judge(rs, tol)[1:]])  # fmt: skip
    rows = compare_runs(records({"bf16": [0.001, 0.002, 0.0015]}), records({"bf16": [0.001, 0.002, 0.0015]}))
    assert [(r.mode, r.verdict) for r in rows if r.metric == SEEDS_METRIC] == [("bf16", "same")]
