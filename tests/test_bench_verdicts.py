"""`pytest benchmarks/` judges convergence through seeds.judge: FAIL fails, inconclusive is said, never hidden."""

import pytest

from benchmarks import test_matrix as matrix
from suite.records.store import make_record
from suite.reporting import seeds
from tests.seed_fakes import CASE, verdict


def test_a_fail_fails_the_benchmark_with_the_verdict_and_its_detail():
    said = r"tiny/amp-fp16 loss drifted from fp32: FAIL \(single seed\): amp-fp16: FAIL"
    with pytest.raises(pytest.fail.Exception, match=said):
        matrix.act_on(verdict("amp-fp16", [0.05], "FAIL", tol=0.02))


def test_lagging_as_expected_is_an_xfail():
    with pytest.raises(pytest.xfail.Exception, match="lags fp32 as expected"):
        matrix.act_on(verdict("pure-bf16", [0.2], "lags (expected)", tol=0.1))


def test_inconclusive_warns_and_prints_and_does_not_pass_silently(capsys):
    v = verdict("bf16", [0.01, 0.05, 0.03], "inconclusive", seeds_needed=9)
    with pytest.warns(matrix.ConvergenceWarning, match=r"bf16 convergence inconclusive \(about 9 seeds"):
        matrix.act_on(v)
    assert "mpbench: tiny/bf16 convergence inconclusive (about 9 seeds would settle it" in capsys.readouterr().out


def test_better_than_fp32_warns_and_a_plain_pass_says_nothing(recwarn, capsys):
    with pytest.warns(matrix.ConvergenceWarning, match="better than fp32 beyond noise: flagged for a look"):
        matrix.act_on(verdict("int8-mixed", [-0.05, -0.04, -0.06], "pass", better=True))
    capsys.readouterr()
    matrix.act_on(verdict("bf16", [0.001], "pass"))
    assert not [w for w in recwarn if issubclass(w.category, matrix.ConvergenceWarning)][1:]  # only the flag's
    assert capsys.readouterr().out == ""


class _Cases:
    """The two records the gate reads, as the session's case cache hands them out."""

    def __init__(self, records):
        self.records = {(r["model"], r["mode"]): r for r in records}

    def get(self, model, mode):
        return self.records[model, mode]


def test_the_gate_asks_seeds_judge_with_fp32_the_records_deltas_and_the_tolerances(monkeypatch):
    fp32 = make_record(**CASE, mode="fp32", seed=0, status="ok", final_loss=4.0, loss_delta_vs_fp32=0.0)
    bf16 = make_record(**CASE, mode="bf16", seed=0, status="ok", final_loss=4.07)
    asked = []

    def judge(records, tolerances):
        asked.append((list(records), tolerances))
        return [verdict("fp32", [], "reference", tol=None), verdict("bf16", [0.07], "FAIL")]

    monkeypatch.setattr(seeds, "judge", judge)
    v = matrix.judged(_Cases([fp32, bf16]), "tiny", "bf16")
    assert v.mode == "bf16" and v.outcome == "FAIL"
    ((records, tolerances),) = asked
    assert [r["mode"] for r in records] == ["fp32", "bf16"] and tolerances is matrix.convergence.TOLERANCES
    assert records[1]["loss_delta_vs_fp32"] == pytest.approx(0.07)  # paired against fp32 before judging
