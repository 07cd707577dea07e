"""The report page as a browser draws it: headless Chromium renders index.html from disk."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image

from suite.records import store
from suite.records.store import append, make_record
from suite.reporting import report, table

CHROMIUM = shutil.which("chromium")
CASE = dict(model="gpt2-small", batch_size=16, seq_len=1024, steps=8, warmup=2, seed=0, compile=False, run_id="r1",
            gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_mb=81559, device="cuda")  # fmt: skip


def _record(mode: str, step: float, loss: float) -> dict:
    """A GPU record with every charted figure, so every chart is drawn."""
    return make_record(**CASE, mode=mode, status="ok", step_time_ms=step, step_time_p10_ms=step * 0.97,
                       step_time_p90_ms=step * 1.04, tokens_per_step=16384, tokens_per_s=16384 / step * 1000,
                       peak_mem_mb=30_000.0 * step / 200, peak_mem_source="nvml-process",
                       peak_mem_allocated_mb=24_000.0 * step / 200, energy_j_per_step=step / 4,
                       tokens_per_joule=16384 / (step / 4), loss_curve=[6.0 - i * loss for i in range(8)],
                       final_loss=6.0 - 8 * loss, loss_floor=1.4)  # fmt: skip


def _chromium(tmp_path, width: int, height: int, *action: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},{height}", *action,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _write_records(tmp_path):
    records = tmp_path / "r.jsonl"
    for mode, step, loss in (("fp32", 200.0, 0.30), ("bf16", 110.0, 0.30), ("pure-fp16", 100.0, 0.25)):
        append(records, _record(mode, step, loss))
    return records


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium) to render the page")
def test_the_page_renders_with_its_charts(tmp_path):
    page = report.build_report(store.load(_write_records(tmp_path)), tmp_path / "report", target_loss=4.0)["index.html"]
    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, 1400, 4000, f"--screenshot={shot}", page.resolve().as_uri())
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    pixels = (image.imread(shot)[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    not_white = (pixels.min(axis=1) < 240).mean()
    # text, tables and five charts: hundreds of colours (anti-aliasing) and a good share of ink
    assert len(colours) > 200, f"only {len(colours)} distinct colours: the page looks blank"
    assert not_white > 0.03, f"only {not_white:.1%} of the screenshot is not white"


# Run in the browser on a copy of the page (the report itself has no script): every element
# that reaches past the window's right edge, or that scrolls sideways, is listed in the title.
PROBE = """<script>addEventListener('load', () => {
  const width = document.documentElement.clientWidth, wide = [];
  for (const e of [document.documentElement, ...document.body.querySelectorAll('*')]) {
    const scrolls = getComputedStyle(e).overflowX !== 'visible' && e.scrollWidth > e.clientWidth + 1;
    if (e.getBoundingClientRect().right > width + 0.5 || scrolls) wide.push(e.tagName + '.' + e.className);
  }
  document.title = 'wide:' + wide.slice(0, 8).join(',') + ':' + wide.length;
});</script>"""
EXTRA = [  # figures other issues add: a new column must fit without a new layout
    ("suspect", "suspect (rules broken)", lambda r, ref: table.Cell("mfu_range", "mfu_range")),
    ("emulated", "emulated kernels", lambda r, ref: table.Cell(False, "no")),
    ("grad_rel_err", "gradient rel. error vs fp64", lambda r, ref: table.Cell(3.3e-3, "3.3e-03")),
    ("update_rel_err", "update rel. error vs fp64", lambda r, ref: table.Cell(2.1e-3, "2.1e-03")),
]


def _wide_elements(tmp_path, page, width: int) -> str:
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    done = _chromium(tmp_path, width, 900, "--dump-dom", probe.resolve().as_uri())
    found = re.search(r"<title>wide:(.*):(\d+)</title>", done.stdout)
    assert found, f"the probe did not run (exit {done.returncode}): {done.stderr[-2000:]}"
    return "" if found.group(2) == "0" else found.group(1)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium) to render the page")
def test_the_tables_fit_a_1280_px_window_with_more_figures_to_come(tmp_path, monkeypatch):
    monkeypatch.setattr(table, "COLUMNS", table.COLUMNS + EXTRA)
    page = report.build_report(store.load(_write_records(tmp_path)), tmp_path / "report", target_loss=4.0)["index.html"]
    text = page.read_text()
    assert all(f"<th>{header}</th>" in text for _, header, _ in EXTRA)
    assert _wide_elements(tmp_path, page, 1280) == ""
    # the probe can fail: the old layout, one table of every figure, is wider than the window
    monkeypatch.setattr(table, "families", lambda: [("all", list(range(len(table.COLUMNS))))])
    wide = report.build_report(store.load(tmp_path / "r.jsonl"), tmp_path / "one-table")["index.html"]
    assert "TABLE" in _wide_elements(tmp_path, wide, 1280)


def test_every_figure_is_in_one_family_table_and_new_ones_are_not_lost(monkeypatch):
    names = [name for name, _, _ in table.COLUMNS]
    shown = [names[i] for _, cols in table.families() for i in cols if names[i] not in table.KEY_COLUMNS]
    assert sorted(shown) == sorted(set(names) - set(table.KEY_COLUMNS))  # each once
    assert all(cols[: len(table.KEY_COLUMNS)] == [names.index(k) for k in table.KEY_COLUMNS]
               for _, cols in table.families())  # fmt: skip
    many = [(f"new_{i}", f"new figure {i}", EXTRA[0][2]) for i in range(table.MAX_COLUMNS + 2)]
    monkeypatch.setattr(table, "COLUMNS", table.COLUMNS + many)
    other = [(title, cols) for title, cols in table.families() if title.startswith(table.OTHER)]
    assert [title for title, _ in other] == [f"{table.OTHER} (1/2)", f"{table.OTHER} (2/2)"]
    assert sum(len(cols) - len(table.KEY_COLUMNS) for _, cols in other) == len(many)
    assert max(len(cols) for _, cols in table.families()) <= len(table.KEY_COLUMNS) + table.MAX_COLUMNS
