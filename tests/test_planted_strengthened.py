"""Issue 27: three planted bugs that only one test caught, by accident. Here each is caught on purpose, with
inputs under which the right and the wrong figure differ: step times whose mean is not their median, held-out
batches that must share no sequence with the training ones, a mode's tensor whose norm is not the reference's."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from suite.metrics import timing as timing_mod
from suite.metrics.fidelity import Comparison
from suite.metrics.timing import TimingStats
from suite.running.runner import run_cases
from suite.training import train as train_mod
from suite.training.data import FileCorpus, make_corpus
from tests.helpers import small_case

# -- tokens/s and the step time from the median of the timed steps, never their mean ----------------------

STEP_MS = [12.0, 10.0, 70.0, 11.0, 10.5]  # one slow step (a GC pause, a clock dip): median 11, mean 22.7


def test_median_percentiles_and_cv_of_uneven_step_times():
    t = TimingStats.from_times(STEP_MS)
    assert t.median_ms == 11.0 and t.times_ms == STEP_MS  # in step order, as recorded
    assert (t.p10_ms, t.p90_ms) == pytest.approx((10.2, 46.8))  # numpy's linear interpolation
    mean = sum(STEP_MS) / 5
    assert t.cv == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in STEP_MS) / 4) / mean)


def test_a_record_gives_tokens_per_s_and_flops_from_the_median_step(monkeypatch):
    """The step timer's clock is scripted (CPU steps read perf_counter before and after), so the record's
    step times are exactly STEP_MS and every speed figure must come from their median, 11 ms."""
    edges = iter([x for i, ms in enumerate(STEP_MS) for x in (i * 1.0, i * 1.0 + ms / 1e3)])
    monkeypatch.setattr(timing_mod, "time", SimpleNamespace(perf_counter=lambda: next(edges)))
    case = small_case(steps=len(STEP_MS) + 1, warmup=1)
    [r] = run_cases([case], log=None, isolate=False)
    assert r["status"] == "ok", r.get("reason")
    assert r["step_times_ms"] == pytest.approx(STEP_MS) and r["step_time_ms"] == pytest.approx(11.0)
    assert r["tokens_per_s"] == pytest.approx(case.tokens_per_step / 0.011)
    assert r["achieved_flops"] == pytest.approx(r["flops_per_step"] / 0.011)


# -- held-out evaluation on the held-out split ---------------------------------------------------------------


def _rows(batches: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row.tolist()) for row in batches.flatten(0, -2)}


def test_every_evaluation_sees_the_held_out_batches_and_no_training_sequence(monkeypatch):
    seen: list[torch.Tensor] = []
    real = train_mod.evaluate
    monkeypatch.setattr(
        train_mod, "evaluate", lambda model, batches, dev: seen.append(batches) or real(model, batches, dev)
    )
    # as many held-out batches as train ones: one random stream for both would make them the same batches
    case = small_case(steps=4, warmup=1, eval_every=2, eval_batches=4)
    [r] = run_cases([case], log=None, isolate=False)
    assert r["status"] == "ok" and [step for step, _ in r["eval_curve"]] == [2, 4]
    corpus = make_corpus(None, case.model_config.vocab_size)
    heldout = corpus.batches(case.eval_batches, case.batch_size, case.seq_len, case.seed, "heldout")
    train = corpus.batches(case.steps, case.batch_size, case.seq_len, case.seed, "train")
    assert len(seen) == 2  # at step 2 and at the end
    assert all(torch.equal(b, heldout) for b in seen), "an evaluation saw other batches than the held-out ones"
    assert not _rows(heldout) & _rows(train)  # a different stream: no sequence trained on is evaluated
    assert r["final_loss"] == r["eval_curve"][-1][1]


def test_a_data_files_held_out_windows_come_from_its_last_tenth_only(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"a" * 900 + b"z" * 100)  # train bytes are all 'a', held-out bytes all 'z'
    corpus = FileCorpus(path)
    heldout = corpus.batches(4, 2, 16, seed=0, split="heldout")
    train = corpus.batches(4, 2, 16, seed=0, split="train")
    assert set(heldout.flatten().tolist()) == {ord("z")} and set(train.flatten().tolist()) == {ord("a")}


# -- the fidelity error is relative to the float64 reference's norm --------------------------------------------


def test_relative_error_divides_by_the_references_norm_not_the_modes():
    """mode = 2 x reference: |a - b| / |b| = 1, where |a - b| / |a| would be 0.5."""
    c = Comparison()
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    d = c.add(2 * ref, ref)
    assert d.rel_err == pytest.approx(1.0) and d.max_abs_err == pytest.approx(4.0) and d.cos == pytest.approx(1.0)
    d = c.add(torch.zeros(2), torch.tensor([0.0, 2.0], dtype=torch.float64))  # all lost: error 1, not inf
    assert d.rel_err == pytest.approx(1.0) and d.cos is None
    total = c.total()  # as one vector: sqrt((25 + 4) / (25 + 4))
    assert total.rel_err == pytest.approx(1.0) and total.max_abs_err == pytest.approx(4.0)
    c = Comparison()
    c.add(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0], dtype=torch.float64))  # half the reference
    c.add(torch.tensor([0.0]), torch.tensor([0.0], dtype=torch.float64))
    assert c.total().rel_err == pytest.approx(0.5)  # |a - b| / |b| = sqrt(2) / sqrt(8); over |a| it would be 1
