"""`mpbench sensitivity`: the candidates, the ranking over seeds on planted records, the command's bad input, a real
tiny CPU sweep, --resume, and the report's section."""

from __future__ import annotations

import functools
import json

import pandas
import pytest
from PIL import Image

from suite.cli import sensitivity as cli
from suite.cli.main import main
from suite.records import store
from suite.reporting import charts, report
from suite.reporting.sensitivity import (
    BEYOND,
    INCONCLUSIVE,
    INSIDE,
    RECOVERS,
    WORSE,
    analyse,
    candidates,
    conclusion,
    stability_words,
    sweeps,
)
from suite.running import runner
from tests.helpers import error_line

CASE = dict(model="tiny", device="cpu", batch_size=8, seq_len=64, steps=100, warmup=5, compile=False,
            cpu="planted CPU", run_id="r1")  # fmt: skip
MODE = "fp8-tensorwise"


def _rec(mode: str, seed: int, loss: float | None, keep_high: str = "", status: str = "ok", **kw) -> dict:
    return store.make_record(**(CASE | kw), mode=mode, seed=seed, keep_high=keep_high, status=status,
                             final_loss=loss if status == "ok" else None,
                             reason=None if status == "ok" else "planted failure")  # fmt: skip


def _sweep(fp32: list[float], gap: list[float], recover: dict[str, list[float]]) -> list[dict]:
    """fp32 per seed, none = fp32 + gap, each candidate = none - what it recovers on that seed."""
    records = []
    for seed, (f, g) in enumerate(zip(fp32, gap, strict=True)):
        records += [_rec("fp32", seed, f), _rec(MODE, seed, f + g, "none")]
        records += [_rec(MODE, seed, f + g - x[seed], policy) for policy, x in recover.items()]
    return records


FP32 = [3.000, 3.020, 3.010]
GAP = [0.100, 0.098, 0.103]
RECOVER = {"block:1": [0.080, 0.079, 0.082], "lm_head": [0.030, 0.031, 0.028], "block:0": [0.004, -0.006, 0.001]}


def test_candidates_are_each_layer_set_once_and_mark_the_default():
    two = candidates(MODE, 2)  # tiny: first:1 is block:0, last:1 is block:1
    assert [(c.policy, c.also) for c in two] == [("none", ()), ("block:0", ("first:1",)),
                                                ("block:1", ("last:1",)), ("lm_head", ())]  # fmt: skip
    assert [c.policy for c in two if c.default] == ["lm_head"]
    four = [c.policy for c in candidates(MODE, 4)]
    assert four == ["none", "block:0", "block:1", "block:2", "block:3", "first:2", "first:3", "last:2", "last:3",
                    "lm_head"]  # fmt: skip
    nvfp4 = candidates("nvfp4", 2)  # its default (last 15% and the head) is a layer set of its own
    assert [c.policy for c in nvfp4 if c.default] == ["last:1,lm_head"] and len(nvfp4) == 5


def test_a_known_gap_ranks_the_block_that_recovers_it_and_says_so():
    s = analyse(MODE, [r for r in _sweep(FP32, GAP, RECOVER) if r["mode"] == "fp32"],
                [r for r in _sweep(FP32, GAP, RECOVER) if r["mode"] == MODE])  # fmt: skip
    assert s.gap_verdict == BEYOND and s.gap.mean == pytest.approx(sum(GAP) / 3)
    assert [r.policy for r in s.rows] == ["block:1", "lm_head", "block:0", "none"]
    top = s.rows[0]
    assert top.verdict == RECOVERS and top.recovered.mean == pytest.approx(0.0803333, abs=1e-6)
    assert top.share == pytest.approx(0.0803333 / (sum(GAP) / 3), rel=1e-6)
    assert top.by_seed == pytest.approx({0: 0.080, 1: 0.079, 2: 0.082})
    line = conclusion(s)
    assert line.startswith("keep these blocks high: block:1 recovers 0.0803 of the 0.1003-nat gap (80%")
    assert s.top_by_seed == {0: "block:1", 1: "block:1", 2: "block:1"} and s.rank_corr == pytest.approx(1.0)
    assert "the same top on every seed: block:1" in stability_words(s)


def test_a_recovery_inside_the_noise_is_inconclusive_never_a_win():
    records = _sweep(FP32, GAP, RECOVER)
    s = analyse(MODE, [r for r in records if r["mode"] == "fp32"], [r for r in records if r["mode"] == MODE])
    block0 = next(r for r in s.rows if r.policy == "block:0")
    assert block0.recovered.ci_low < 0 < block0.recovered.ci_high
    assert block0.verdict == INCONCLUSIVE and "the same as none within the noise" in block0.detail
    # the best by mean is inside the noise too: no line names it
    noisy = {"block:1": [0.030, -0.020, 0.010], "lm_head": [-0.010, 0.015, 0.0]}
    records = _sweep(FP32, GAP, noisy)
    s = analyse(MODE, [r for r in records if r["mode"] == "fp32"], [r for r in records if r["mode"] == MODE])
    assert s.gap_verdict == BEYOND and all(r.verdict != RECOVERS for r in s.rows)
    assert conclusion(s).startswith("no line: converting every layer costs") and "keep these" not in conclusion(s)
    assert "this order is chance" in stability_words(s)


def test_a_gap_inside_the_noise_is_said_and_nothing_is_ranked():
    records = _sweep(FP32, [0.010, -0.012, 0.003], {"block:1": [0.009, -0.011, 0.002]})
    s = analyse(MODE, [r for r in records if r["mode"] == "fp32"], [r for r in records if r["mode"] == MODE])
    assert s.gap_verdict == INSIDE
    assert conclusion(s).startswith("no line: the gap itself is inside the seeds' noise")
    assert next(r for r in s.rows if r.policy == "block:1").share is None  # no share of a gap that may be 0


def test_one_seed_is_not_judged_and_a_policy_that_changed_nothing_is_named():
    one = _sweep(FP32[:1], GAP[:1], {"block:1": [0.05]})
    s = analyse(MODE, [r for r in one if r["mode"] == "fp32"], [r for r in one if r["mode"] == MODE])
    assert conclusion(s).startswith("no line: one seed (seed 0) gives no noise estimate")
    same = _sweep(FP32[:2], GAP[:2], {"block:1": [0.0, 0.0]})
    s = analyse(MODE, [r for r in same if r["mode"] == "fp32"], [r for r in same if r["mode"] == MODE])
    assert "did the mode honour the policy?" in s.rows[0].detail


def test_worse_than_none_failed_cases_and_a_seed_disagreeing_at_the_top():
    recover = {"block:1": [0.080, 0.020, 0.082], "lm_head": [0.030, 0.060, 0.028], "block:0": [-0.02, -0.021, -0.019]}
    records = _sweep(FP32, GAP, recover)
    records.append(_rec(MODE, 0, None, "block:0", status="error"))  # its retry failed: the latest record counts
    (s,) = sweeps(records)
    block0 = next(r for r in s.rows if r.policy == "block:0")
    assert block0.recovered.n == 2 and any("block:0 seed 0: no final loss (error" in n for n in s.notes)
    assert s.top_by_seed == {0: "block:1", 1: "lm_head", 2: "block:1"}
    assert "not stable: the top is block:1 on seed 0, lm_head on seed 1" in stability_words(s)
    three = _sweep(FP32, GAP, {"block:0": [-0.02, -0.021, -0.019]})
    (s,) = sweeps(three)
    assert s.rows[0].verdict == WORSE


def test_sweeps_pair_fp32_across_policies_and_keep_other_settings_apart():
    records = _sweep(FP32, GAP, RECOVER) + [_rec("fp32", 0, 3.0, steps=50), _rec(MODE, 0, 3.1, "none", steps=50)]
    found = sweeps(records)  # the 50-step pair has one keep_high value: no sweep of its own
    assert len(found) == 1 and found[0].settings["steps"] == 100 and found[0].gap.n == 3
    assert sweeps([r for r in records if r["mode"] == MODE]) == []  # no fp32: no gap


@pytest.mark.parametrize(
    ("argv", "field"),
    [(["fp32"], "mode='fp32' takes no layer policy"), (["bf17"], "mode='bf17' is unknown"),
     ([MODE, "--seeds", "0,x"], "seeds='0,x'"), ([MODE, "--seeds", "1,1"], "seeds='1,1'"),
     ([MODE, "--seeds", ","], "seeds=','"), ([MODE, "--steps", "0"], "steps=0"),
     ([MODE, "--model", "huge"], "model='huge'"), ([MODE, "--chart", "x.svg"], "chart='x.svg'")],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, argv, field):
    out = tmp_path / "s.jsonl"
    assert main(["sensitivity", *argv, "--device", "cpu", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert line.startswith("mpbench sensitivity: error: ") and field in line
    assert not out.exists() or not out.read_text()


FAST = ["--model", "tiny", "--seeds", "0", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One real tiny sweep on the CPU, 2 steps per case, trained in this process (each case alike in a worker)."""
    out = tmp_path_factory.mktemp("sweep") / "fp8.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "run_cases", functools.partial(runner.run_cases, isolate=False))
        code = main(["sensitivity", MODE, *FAST, "--out", str(out)])
    return code, out


@pytest.mark.xdist_group("sensitivity-sweep")
def test_a_real_tiny_sweep_writes_one_record_per_layer_set(swept, capsys):
    code, out = swept
    records = store.read(out)
    assert code == 0 and [r["status"] for r in records] == ["ok"] * 5
    assert [(r["mode"], r["keep_high"]) for r in records] == [
        ("fp32", ""), (MODE, "none"), (MODE, "block:0"), (MODE, "block:1"), (MODE, "lm_head")]  # fmt: skip
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.xdist_group("sensitivity-sweep")
def test_resume_runs_only_the_cases_without_a_record(swept, capsys, monkeypatch):
    _, out = swept
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")  # the last case (lm_head) lost, as in a crash
    monkeypatch.setattr(cli, "run_cases", functools.partial(runner.run_cases, isolate=False))
    capsys.readouterr()
    assert main(["sensitivity", MODE, *FAST, "--out", str(out), "--resume"]) == 0
    captured = capsys.readouterr()
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(again) == 5 and again[-1]["keep_high"] == "lm_head" and again[:-1] == [json.loads(x) for x in lines[:-1]]
    assert "[1/1] fp8-tensorwise keep lm_head seed 0" in captured.err  # progress names the policy
    assert "records: " in captured.out and "(1 written now, 5 in the sweep)" in captured.out
    assert "lm_head (mode default)" in captured.out and "one seed" in captured.out


def test_the_report_shows_a_sweep_with_its_line_and_chart(tmp_path):
    files = report.build_report(pandas.DataFrame(_sweep(FP32, GAP, RECOVER)), tmp_path / "out")
    page = files["index.html"].read_text()
    assert "Which layers to keep high" in page and "keep these blocks high: block:1 recovers 0.0803" in page
    (png,) = [path for name, path in files.items() if name.startswith("sensitivity1-fp8-tensorwise")]
    meta = Image.open(png).text  # charts.save measured the figure: nothing under 8 pt, no text cut off
    assert float(meta[charts.FONT_KEY]) >= charts.MIN_FONT_PT and meta[charts.CUT_KEY] == ""
    assert "keep these blocks high: block:1" in files["summary.md"].read_text()
