"""The report over seeds: the interval chart, the banded loss curves, the section's words, the glance verdicts.

Renderers are tested on verdict objects built by hand (tests/seed_fakes.py). A whole report of a
multi-seed run needs seeds.judge: those tests use `fake_judge` where marked, and the last ones run the
real judge and skip until it exists (issue 23's verdict23 part).
"""

import io

import pandas
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from suite.reporting import charts, glance, report, seed_charts, seed_groups, seeds, seeds_section
from tests import seed_fakes
from tests.helpers import keep_saved_figures
from tests.seed_fakes import fake_floors, fake_judge, records, verdict

JUDGE = seed_fakes.judge_missing()


def test_the_error_bars_span_exactly_each_modes_interval_in_its_colour(tmp_path, monkeypatch):
    drawn = keep_saved_figures(monkeypatch, seed_charts)
    verdicts = [verdict("fp32", [], "reference", tol=None), verdict("bf16", [0.004, -0.002, 0.010, 0.001], "pass"),
                verdict("pure-bf16", [0.09, 0.07, 0.12], "lags (expected)", tol=0.10),
                verdict("int8-mixed", [0.01], "pass")]  # fmt: skip
    seed_charts.interval_chart(tmp_path / "d.png", "delta", verdicts, set())
    ax = drawn["d.png"].axes[0]
    bars = {c.get_label(): c for c in ax.containers}
    for v in verdicts[1:3]:
        (segment,) = bars[f"interval:{v.mode}"].lines[2][0].get_segments()
        assert segment[:, 1].tolist() == pytest.approx([v.delta.ci_low, v.delta.ci_high], abs=1e-12)
        assert bars[f"interval:{v.mode}"].lines[0].get_ydata()[0] == pytest.approx(v.delta.mean)
        assert to_hex(bars[f"interval:{v.mode}"].lines[0].get_color()) == charts.mode_colour(v.mode)
    lines = {line.get_gid(): line for line in ax.lines}
    assert lines["tolerance:pure-bf16"].get_ydata()[0] == 0.10 and lines["tolerance:bf16"].get_ydata()[0] == 0.03
    assert "interval:int8-mixed" not in bars and lines["interval:int8-mixed"].get_ydata()[0] == 0.01  # one seed
    assert any(list(line.get_ydata()) == [0, 0] for line in ax.lines)  # the zero line: fp32
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["bf16: pass", "pure-bf16: lags (expected)", "int8-mixed: pass"]  # fp32 has no bar


def test_the_band_covers_every_seeds_curve_and_the_line_is_their_mean(tmp_path, monkeypatch):
    drawn = keep_saved_figures(monkeypatch, seed_charts)
    rs = records({"bf16": [0.01, -0.02, 0.03], "pure-bf16": [0.08, 0.05, 0.11]})
    seed_charts.loss_band_chart(tmp_path / "l.png", "loss", rs)
    top, diff = drawn["l.png"].axes
    for mode in ("fp32", "bf16", "pure-bf16"):
        curves = [r["loss_curve"] for r in rs if r["mode"] == mode]
        band = next(c for c in top.collections if c.get_gid() == f"band:{mode}").get_paths()[0].vertices
        mean = next(line for line in top.lines if line.get_gid() == f"mean:{mode}").get_ydata()
        for step in range(40):
            ys = band[abs(band[:, 0] - (step + 1)) < 1e-9][:, 1]
            values = [c[step] for c in curves]
            assert ys.min() <= min(values) + 1e-12 and ys.max() >= max(values) - 1e-12, (mode, step)
            assert ys.min() == pytest.approx(min(values)) and ys.max() == pytest.approx(max(values))
            assert mean[step] == pytest.approx(sum(values) / 3)
    assert {c.get_gid() for c in diff.collections} == {"band:bf16", "band:pure-bf16"}  # fp32 - fp32 is no curve
    assert "band min..max over 3 seeds" in top.get_ylabel()


def test_verdicts_in_words():
    v = verdict("bf16", [0.01, 0.04, 0.02], "inconclusive", seeds_needed=12)
    assert seed_groups.verdict_text(v) == "inconclusive (about 12 seeds would settle it at this spread)"
    assert "over 1000" in seed_groups.verdict_text(verdict("bf16", [0.0, 0.1], "inconclusive", seeds_needed=1000))
    assert "no number of seeds" in seed_groups.verdict_text(verdict("bf16", [0.03, 0.03], "inconclusive"))
    better = verdict("int8-mixed", [-0.05, -0.04, -0.06], "pass", better=True)
    assert seed_groups.verdict_text(better) == "pass; better than fp32 beyond noise: flagged for a look"
    assert seed_groups.verdict_text(verdict("bf16", [0.01], "pass")) == "pass (single seed)"


def test_the_noise_floor_in_words():
    floor = seeds.NoiseFloor("tiny", (0, 1, 2), seed_fakes.seed_stats([4.20, 4.21, 4.23]), 0.002)
    words = seed_groups.noise_words(floor)
    assert "fp32's own final held-out loss has sd 0.0153 nats" in words
    assert "A delta of 0.005 nats is 2.5 sd of seed noise here." in words
    assert "not measured" in seed_groups.noise_words(None)


def test_a_single_seed_report_has_no_seeds_section_and_says_single_seed(tmp_path):
    one = [r for r in records({"bf16": [0.01, 0.02, 0.03]}) if r["seed"] == 0]
    files = report.build_report(pandas.DataFrame(one), tmp_path / "out")  # judge is never called for one seed
    page = files["index.html"].read_text()
    assert seeds_section.TITLE not in page and not any(name.startswith("seeds") for name in files)
    assert glance.SINGLE_SEED.split(":")[0] in page and "-loss.png" in " ".join(files)  # its own loss chart stays


def _multi(tmp_path, monkeypatch, shifts, **kw):
    monkeypatch.setattr(seeds, "judge", fake_judge)
    monkeypatch.setattr(seeds, "noise_floors", fake_floors)
    return report.build_report(pandas.DataFrame(records(shifts, **kw)), tmp_path / "out")


def test_a_multi_seed_report_judges_each_mode_over_its_seeds(tmp_path, monkeypatch):
    """(fake_judge) One seeds section with both charts; each seed's own loss chart gives way to the band."""
    shifts = {"bf16": [0.001, -0.002, 0.003], "amp-fp16": [0.05, 0.06, 0.055], "pure-bf16": [0.05, 0.06, 0.055]}
    files = _multi(tmp_path, monkeypatch, shifts, emulated=("pure-bf16",))
    page, md = files["index.html"].read_text(), files["summary.md"].read_text()
    assert page.index("At a glance") < page.index(seeds_section.TITLE) < page.index("<h2>CPU: Intel Xeon</h2>")
    assert {"seeds1-tiny-delta.png", "seeds1-tiny-loss.png"} <= set(files)
    assert not any(n.endswith("-loss.png") and n.startswith("m1-") for n in files)  # per-seed curves: banded above
    assert "A delta of 0.005 nats is" in page and "seeds 0, 1, 2 (3)" in md
    section = md[md.index(f"## {seeds_section.TITLE}") : md.index("\n## CPU: Intel Xeon")]
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if " | 3 | " in line}  # part 1: seeds
    assert "| FAIL" in rows["| amp-fp16"] and "| pass" in rows["| bf16"]  # the planted +0.055 nats fails
    assert "| pass" in rows["| pure-bf16 (emulated)"]  # within its 0.10 tolerance
    assert "median over seeds" in md and "2.00 (3 seeds)" in md  # fp32 20 ms / 10 ms on every seed
    assert glance.SINGLE_SEED.split(":")[0] not in page  # every group here is judged over seeds
    for name in ("seeds1-tiny-delta.png", "seeds1-tiny-loss.png"):
        image = Image.open(io.BytesIO(files[name].read_bytes()))
        assert float(image.text[charts.FONT_KEY]) >= charts.MIN_FONT_PT and image.width <= charts.MAX_WIDTH_PX
        assert image.text[charts.CUT_KEY] == "", name


def test_the_glance_row_over_seeds_takes_the_verdict_and_the_median_speed_up(monkeypatch):
    monkeypatch.setattr(seeds, "judge", fake_judge)
    monkeypatch.setattr(seeds, "noise_floors", fake_floors)
    rs = records({"bf16": [0.001, -0.002, 0.003]})
    rs[4]["step_time_ms"] = 5.0  # bf16 on seed 1 twice as fast again: the median (2.00) is not moved by it
    (s,) = seed_groups.judged(rs)
    texts = [[c.text for c in row] for row in glance.seed_rows(s)]
    assert texts[0][:3] == ["fp32", "1.00 (3 seeds)", "0 (the reference)"]
    assert texts[1][1] == "2.00 (3 seeds)" and texts[1][2].endswith(": pass") and texts[1][3] == "302 MiB (rss)"


@pytest.mark.skipif(JUDGE is not None, reason=str(JUDGE))
def test_a_planted_shift_fails_in_the_report_with_the_real_judge(tmp_path):
    """(after the merge) +0.05 nats on every seed: FAIL; bf16 within noise of 0: pass."""
    rs = records({"bf16": [0.001, -0.002, 0.003, 0.0, 0.001], "amp-fp16": [0.05, 0.052, 0.049, 0.051, 0.05]}, 5)
    page = report.build_report(pandas.DataFrame(rs), tmp_path / "out")["summary.md"].read_text()
    row = next(line for line in page.splitlines() if line.startswith("| amp-fp16 |") and "[" in line)
    assert "FAIL" in row


def test_a_seed_set_needs_a_mode_on_two_seeds_not_two_single_seed_runs_side_by_side():
    rs = records({"bf16": [0.001, 0.002]}, seeds=2)
    assert len(seed_groups.seed_groups(rs)) == 1
    apart = [r for r in rs if (r["mode"], r["seed"]) in {("fp32", 1), ("bf16", 0)}]
    assert seed_groups.seed_groups(apart) == {}  # judge is never asked about it


def test_the_seed_charts_of_every_mode_stay_legible(tmp_path, monkeypatch):
    """(fake_judge) All 12 modes on 5 seeds, fp8 ones emulated, long verdicts: no text under 8 pt, none cut off."""
    monkeypatch.setattr(seeds, "noise_floors", fake_floors)
    monkeypatch.setattr(seeds, "judge", lambda rs, tol: [v if v.outcome == "reference" else
                        v.__class__(**(v.__dict__ | {"outcome": "inconclusive", "better": True}))
                        for v in fake_judge(rs, tol)])  # fmt: skip
    modes = [m for m in charts.MODE_COLOURS if m != "fp32"]
    shifts = {m: [0.01 * (i % 4) + 0.002 * s for s in range(5)] for i, m in enumerate(modes)}
    emulated = tuple(m for m in modes if m.startswith(("fp8", "mxfp8")))
    files = report.build_report(pandas.DataFrame(records(shifts, seeds=5, emulated=emulated)), tmp_path / "out")
    for name in ("seeds1-tiny-delta.png", "seeds1-tiny-loss.png"):
        image = Image.open(io.BytesIO(files[name].read_bytes()))
        assert float(image.text[charts.FONT_KEY]) >= charts.MIN_FONT_PT and image.width <= charts.MAX_WIDTH_PX
        assert image.text[charts.CUT_KEY] == "", f"{name}: {image.text[charts.CUT_KEY]!r}"
