"""The edges of what shows a verdict over seeds: a mode with no delta, one seed, no spread, and no noise
floor, in words, in the glance table and in the delta chart; the tolerance command run as a module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from suite.reporting import glance, seed_charts, seed_groups
from suite.reporting.seeds import NoiseFloor
from suite.training.case import Case
from tests.helpers import keep_saved_figures
from tests.seed_fakes import NONE, records, seed_stats, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_an_interval_and_a_spread_in_words_at_their_edges():
    assert seed_groups.interval(NONE) == "" and seed_groups.spread(NONE) == ""
    one = seed_stats([0.0123])
    assert seed_groups.interval(one) == "+0.0123 (1 seed)" and seed_groups.spread(one, ".4f") == "0.0123 (1 seed)"
    three = seed_stats([10.0, 14.0, 12.0])
    assert seed_groups.spread(three) == "12 +- 2 (10-14)"
    assert seed_groups.interval(three, ".1f").startswith("12.0 [") and seed_groups.interval(three).count(",") == 1


def test_the_noise_floor_in_words_when_a_figure_is_missing_or_zero():
    assert "not measured" in seed_groups.noise_words(None)
    flat = seed_stats([3.0, 3.0])
    zero = NoiseFloor("tiny", (0, 1), flat, 0.0)
    assert "sd 0.0000" in seed_groups.noise_words(zero) and "any delta is beyond seed noise" in seed_groups.noise_words(
        zero
    )
    unknown = NoiseFloor("tiny", (0, 1), seed_stats([3.0]), None)
    words = seed_groups.noise_words(unknown)
    assert "has no spread to measure" in words and "paired deltas' sd is not measured" in words


def test_a_mode_without_a_delta_is_named_not_drawn_at_zero(tmp_path, monkeypatch):
    drawn = keep_saved_figures(monkeypatch, seed_charts)
    missing = verdict("tf32", [], "not checked", detail="tf32 needs a CUDA GPU")
    seed_charts.interval_chart(tmp_path / "d.png", "t", [verdict("bf16", [0.001, 0.002], "pass"), missing], set())
    texts = [t.get_text() for t in drawn["d.png"].axes[0].texts]
    assert "no delta" in texts
    rs = records({"bf16": [0.001, -0.002, 0.003]})
    skipped = [r | {"mode": "tf32", "status": "skipped", "reason": "tf32 needs a CUDA GPU", "final_loss": None,
                    "step_time_ms": None, "peak_mem_mb": None} for r in rs if r["mode"] == "fp32"]  # fmt: skip
    (s,) = seed_groups.judged(rs + skipped)
    row = [c.text for c in glance.seed_rows(s)[-1]]
    assert row[0] == "tf32" and row[2].startswith("not measured: not checked"), row


def test_the_tolerance_command_runs_as_a_module():
    measured = ROOT / "results" / "tolerances" / "tiny-cpu-8x64.jsonl"
    out = subprocess.run([sys.executable, "-m", "suite.reporting.tolerances", str(measured)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "| `bf16` | tiny, cpu, 40, cosine | 10 |" in out.stdout, out.stderr


def test_a_warm_up_that_is_not_a_whole_number_of_steps_is_refused():
    with pytest.raises(ValueError, match=r"lr_warmup=2\.5: must be an integer number of steps"):
        Case(device="cpu", steps=10, lr_warmup=2.5)
