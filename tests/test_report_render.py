"""The report page as a browser draws it: headless Chromium renders index.html from disk."""

import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image

from suite.records import store
from suite.records.store import append, make_record
from suite.reporting import report

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


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium) to render the page")
def test_the_page_renders_with_its_charts(tmp_path):
    records = tmp_path / "r.jsonl"
    for mode, step, loss in (("fp32", 200.0, 0.30), ("bf16", 110.0, 0.30), ("pure-fp16", 100.0, 0.25)):
        append(records, _record(mode, step, loss))
    page = report.build_report(store.load(records), tmp_path / "report", target_loss=4.0)["index.html"]
    shot = tmp_path / "shot.png"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,4000", f"--screenshot={shot}",
        page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    pixels = (image.imread(shot)[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    not_white = (pixels.min(axis=1) < 240).mean()
    # text, tables and five charts: hundreds of colours (anti-aliasing) and a good share of ink
    assert len(colours) > 200, f"only {len(colours)} distinct colours: the page looks blank"
    assert not_white > 0.03, f"only {not_white:.1%} of the screenshot is not white"
