"""The report's summary first, noisy step times marked, unmeasured families in one line, CPU memory said once."""

import csv
import html

import pytest
from matplotlib.colors import to_hex

from suite.records import noise, store
from suite.records.store import append, make_record
from suite.reporting import charts, glance, plots, report, table
from tests.helpers import keep_saved_figures

CASE = dict(model="tiny", batch_size=8, seq_len=128, steps=20, warmup=5, seed=0, compile=False, run_id="r1")
CPU = dict(device="cpu", cpu="Intel Xeon", peak_mem_source="rss",
           peak_mem_reason="CPU: device and allocator peaks are GPU-only; peak_mem_mb is this process's RSS",
           mfu_reason="no datasheet peak for CPUs", mamf_reason="not calibrated on this machine",
           tensor_core_util_reason="CPU: no tensor cores", energy_reason="CPU: no energy counter")  # fmt: skip
EMULATED = "float8 tensorwise matmuls: no cpu kernels: runs emulated"


def _cpu(mode: str, step: float, spread: float = 0.1, **kw) -> dict:
    """A finished CPU record whose step times' p10-p90 span `spread` of the median."""
    values = dict(mode=mode, status="ok", step_time_ms=step, step_time_p10_ms=step * (1 - spread / 2),
                  step_time_p90_ms=step * (1 + spread / 2), tokens_per_step=1024, tokens_per_s=1024 / step * 1000,
                  peak_mem_mb=300.0 + step / 10, loss_curve=[6.0, 5.0, 4.5, 4.2], final_loss=4.2,
                  loss_delta_vs_fp32=0.0 if mode == "fp32" else -0.001)  # fmt: skip
    return make_record(**(CASE | CPU | values | kw))


def _build(tmp_path, records, name="report"):
    path = tmp_path / f"{name}.jsonl"
    for r in records:
        append(path, r)
    return report.build_report(store.load(path), tmp_path / name)


def test_the_summary_comes_first_with_one_row_per_mode(tmp_path):
    records = [_cpu("fp32", 600.0), _cpu("bf16", 300.0, peak_mem_mb=None),
               _cpu("fp8-tensorwise", 900.0, emulated=True, emulated_reason=EMULATED)]  # fmt: skip
    written = _build(tmp_path, records)
    page, md = written["index.html"].read_text(), written["summary.md"].read_text()
    assert page.index("At a glance") < page.index("class='env'")  # before the environment table
    assert md.index("## At a glance") < md.index("| environment | |")
    rows = glance.rows(records)
    assert [[c.text for c in row] for row in rows] == [
        ["fp32", "1.00", "0 (the reference)", "360 MiB (rss)"],
        ["bf16", "2.00", "-0.0010", "not measured"],
        ["fp8-tensorwise (emulated)", "not measured", "-0.0010", "390 MiB (rss)"],
    ]
    assert rows[1][3].reason == CPU["peak_mem_reason"]  # the record's own reason, as a footnote
    assert "emulated kernels" in rows[2][1].reason
    assert f"[{1}] {html.escape(CPU['peak_mem_reason'])}" in page.split("<h2>CPU")[0]


def test_a_spread_step_time_is_marked_noisy_with_its_spread(tmp_path):
    assert noise.NOISY_SPREAD == table.NOISY_SPREAD == 0.20
    quiet, edge, wide = _cpu("bf16", 100.0, 0.199), _cpu("bf16", 100.0, 0.201), _cpu("bf16", 100.0, 0.35)
    assert [bool(noise.noisy_step(r)) for r in (quiet, edge, wide)] == [False, True, True]
    assert noise.noisy_step(make_record(**CASE, mode="x", status="ok", step_time_ms=5.0)) is None  # no percentiles
    names = [name for name, _, _ in table.COLUMNS]
    fp32 = _cpu("fp32", 200.0, 0.1)
    cells = dict(zip(names, table.cells(wide, fp32), strict=True))
    assert cells["speedup_vs_fp32"].value == pytest.approx(2.0)  # kept, for the CSV, but marked
    assert cells["speedup_vs_fp32"].text == "2.00 (noisy)" and cells["speedup_vs_fp32"].noisy
    assert "this mode 35%" in cells["speedup_vs_fp32"].reason and "over 20%" in cells["speedup_vs_fp32"].reason
    assert cells["step_time_ms"].text == "100.00 (noisy)" and not cells["tokens_per_s"].noisy
    quiet_cells = dict(zip(names, table.cells(quiet, fp32), strict=True))
    assert quiet_cells["speedup_vs_fp32"].text == "2.00" and not quiet_cells["step_time_ms"].noisy
    # a noisy fp32 makes every speed-up against it noisy, and says whose spread it is
    against = dict(zip(names, table.cells(quiet, _cpu("fp32", 200.0, 0.5)), strict=True))["speedup_vs_fp32"]
    assert against.noisy and "fp32 50%" in against.reason and "this mode" not in against.reason
    written = _build(tmp_path, [fp32, wide])
    page = written["index.html"].read_text()
    assert page.count("2.00 (noisy)") == 2  # the summary and the speed table
    with open(written["summary.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["noisy_step_time"] == "" and "this mode 35%" in rows[1]["noisy_step_time"]


def test_a_family_measured_for_no_mode_is_one_line_with_its_reasons(tmp_path):
    written = _build(tmp_path, [_cpu("fp32", 600.0), _cpu("bf16", 300.0)])
    page, md = written["index.html"].read_text(), written["summary.md"].read_text()
    energy = "Energy: not measured on this device (energy per token, tokens per kJ: CPU: no energy counter)"
    assert page.count(html.escape(energy)) == 1 and md.count(energy) == 1
    utilization = (
        "Utilization: not measured on this device (MFU, MFU vs bf16 peak: no datasheet peak for CPUs; "
        "MAMF: not calibrated on this machine; tensor-core util: CPU: no tensor cores)"
    )
    assert page.count(html.escape(utilization)) == 1
    assert "<h4>utilization</h4>" not in page and "<h4>energy</h4>" not in page and "**energy**" not in md
    assert "<h4>memory</h4>" in page  # RSS was measured: the memory table stays, "not measured" per cell
    # one mode with a figure keeps the whole table
    gpu = _build(tmp_path, [_cpu("fp32", 600.0), _cpu("bf16", 300.0, energy_j_per_step=2.0)], "gpu")
    assert "<h4>energy</h4>" in gpu["index.html"].read_text()


def test_every_chart_draws_emulated_modes_hatched_or_dashed_in_fixed_colours(tmp_path, monkeypatch):
    drawn = keep_saved_figures(monkeypatch, charts, plots)
    records = [_cpu("fp32", 600.0), _cpu("bf16", 300.0),
               _cpu("fp8-tensorwise", 900.0, emulated=True, emulated_reason=EMULATED)]  # fmt: skip
    _build(tmp_path, records)
    assert {name.split("tiny-")[1] for name in drawn} == {
        "loss.png",
        "step-time.png",
        "speed-up.png",
        "peak-memory.png",
    }
    fp8 = charts.mode_colour("fp8-tensorwise")
    for name, fig in drawn.items():
        texts = [t.get_text() for t in fig.findobj(charts.Text)]
        assert charts.EMULATED_LEGEND in texts, name  # the legend says what the hatching means
        ax = fig.axes[0]
        hatched = [p for p in ax.patches if p.get_hatch()]
        lines = [ln for a in fig.axes for ln in a.get_lines() if ln.get_color() == fp8]
        assert hatched or lines, name
        assert all(ln.get_linestyle() == "--" for ln in lines), name
        # a hatched bar is fp8's; a hatched empty slot (no speed-up to draw) is transparent
        assert all(to_hex(p.get_facecolor()) == fp8 or p.get_facecolor()[3] == 0 for p in hatched), name
    colours = [
        charts.matplotlib.colors.to_hex(p.get_facecolor()) for p in drawn["m1-g1-tiny-step-time.png"].axes[0].patches
    ]
    assert colours[:3] == [charts.FP32_COLOUR, charts.mode_colour("bf16"), fp8]


def test_fp32_has_a_colour_no_other_mode_has():
    modes = list(charts.MODE_COLOURS) + ["future-mode", "nvfp4", "mxfp4"]
    colours = {m: charts.mode_colour(m) for m in modes}
    assert colours["fp32"] == charts.FP32_COLOUR
    assert charts.FP32_COLOUR not in [c for m, c in colours.items() if m != "fp32"]
    assert len(set(charts.MODE_COLOURS.values())) == len(charts.MODE_COLOURS)  # every known mode its own
    assert charts.mode_colour("future-mode") == colours["future-mode"]  # the same every time


def test_the_cpu_memory_chart_says_once_that_no_mode_has_an_allocator_peak(tmp_path, monkeypatch):
    drawn = keep_saved_figures(monkeypatch, charts, plots)
    records = [_cpu("fp32", 600.0), _cpu("fp8-tensorwise", 900.0, emulated=True, emulated_reason=EMULATED)]
    page = _build(tmp_path, records)["index.html"].read_text()
    texts = [t.get_text() for t in drawn["m1-g1-tiny-peak-memory.png"].findobj(charts.Text)]
    assert not any("allocator peak: emulated" in t or "allocator peak: not measured" == t for t in texts)
    assert sum("allocator peak: not measured for any mode" in t for t in texts) == 1
    line = f"peak memory chart: allocator peak not measured for any mode: {CPU['peak_mem_reason']}"
    assert page.count(html.escape(line)) == 1


def test_the_fidelity_table_shows_a_loss_scale_whole_and_none_where_a_mode_has_no_scaling():
    from suite.reporting.fidelity_table import FIDELITY_HEADERS, fidelity_cells

    scaled = {"status": "ok", "fidelity_loss_scale": 65536.0, "grad_rel_err_vs_fp64": 0.01}
    assert dict(zip(FIDELITY_HEADERS, fidelity_cells(scaled), strict=True))["loss scale"].text == "65,536"
    plain = scaled | {"fidelity_loss_scale": None}
    assert dict(zip(FIDELITY_HEADERS, fidelity_cells(plain), strict=True))["loss scale"].text == "none"


def test_the_environment_marks_a_commit_with_uncommitted_changes():
    from suite.reporting.report import _environment

    rows = dict(_environment([{"git_commit": "abc123", "git_dirty": True}, {"git_commit": "abc123"}]))
    assert rows["git commit"] == "abc123 (uncommitted changes), abc123", rows
