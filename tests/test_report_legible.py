"""Charts legible at 800 and 1280 px: no text under MIN_FONT_PT, none cut off, none shrunk by the page.

Every chart's PNG carries its smallest font size and its DPI (charts.save measures them on the
figure); headless Chromium says how wide the page draws each image. Together: the smallest text
a reader sees, in CSS pixels.
"""

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from suite.records import store
from suite.records.store import append, make_record
from suite.reporting import charts, report

CHROMIUM = shutil.which("chromium")
MIN_TEXT_PX = 10.0  # CSS px: the smallest chart text a reader must get at 800 and 1280 px
CASE = dict(model="gpt2-small", batch_size=16, seq_len=1024, steps=8, warmup=2, seed=0, compile=False, run_id="r1",
            gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_mb=81559, device="cuda")  # fmt: skip
TENSORS = [f"transformer.h.{i}.{part}" for i in range(24) for part in ("attn.c_attn.weight", "mlp.c_fc.weight")]


def _record(mode: str, step: float, emulated: bool = False) -> dict:
    """A GPU record with every charted figure, per-tensor fidelity included, so every chart is drawn."""
    layers = [{"step": 1, "tensor": t, "grad_rel_err": 1e-3 * (1 + i % 7), "update_rel_err": 2e-3} for i, t in
              enumerate(TENSORS)]  # fmt: skip
    return make_record(**CASE, mode=mode, status="ok", step_time_ms=step, step_time_p10_ms=step * 0.97,
                       step_time_p90_ms=step * 1.04, tokens_per_step=16384, tokens_per_s=16384 / step * 1000,
                       peak_mem_mb=30_000.0 * step / 200, peak_mem_source="nvml-process",
                       peak_mem_allocated_mb=24_000.0 * step / 200, energy_j_per_step=step / 4,
                       tokens_per_joule=16384 / (step / 4), loss_curve=[6.0 - i * 0.3 for i in range(8)],
                       final_loss=3.6, loss_floor=1.4, fidelity_layers=layers, grad_rel_err_vs_fp64=1e-3,
                       emulated=emulated, emulated_reason="no fp8 kernels here" if emulated else None)  # fmt: skip


def _report(tmp_path) -> dict[str, Path]:
    """Every mode the suite knows (12), fp8 ones emulated: the most crowded charts a run makes."""
    records = tmp_path / "r.jsonl"
    for i, mode in enumerate(charts.MODE_COLOURS):
        append(records, _record(mode, 200.0 - 10 * i, emulated=mode.startswith(("fp8", "mxfp8"))))
    return report.build_report(store.load(records), tmp_path / "report")


def _legibility(png: bytes) -> tuple[float, int, int, str]:
    """(smallest font pt, dpi, width px, text cut off) from a chart's PNG."""
    image = Image.open(io.BytesIO(png))
    meta = image.text
    return float(meta[charts.FONT_KEY]), int(meta[charts.DPI_KEY]), image.width, meta[charts.CUT_KEY]


def test_every_chart_has_large_enough_text_and_none_cut_off(tmp_path):
    pngs = {name: p for name, p in _report(tmp_path).items() if name.endswith(".png")}
    assert {name.split("small-")[1] for name in pngs} == {
        "loss.png", "fidelity-layers.png", "step-time.png", "speed-up.png", "peak-memory.png",
        "energy-per-token.png",
    }  # fmt: skip
    for name, path in pngs.items():
        font, dpi, width, cut = _legibility(path.read_bytes())
        assert font >= charts.MIN_FONT_PT and dpi == charts.DPI, name
        assert width <= charts.MAX_WIDTH_PX, name
        assert cut == "", f"{name}: text cut off at the edges: {cut!r}"


def test_the_measure_sees_small_and_cut_off_text(tmp_path):
    """The metadata is measured, not declared: a 5 pt label and a legend wider than the figure show."""
    fig = charts.new_figure(3.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], label="fp32 with a label long enough to run past the edges of the figure")
    ax.plot([0, 1], [1, 0], label="bf16 with another label long enough to run past the edges")
    ax.set_xlabel("step", fontsize=5)
    fig.legend(loc="outside lower center", ncol=2)
    font, _, _, cut = _legibility(charts.save(fig, tmp_path / "bad.png").read_bytes())
    assert font == 5.0 and "fp32 with a label" in cut


# Run in the browser on a copy of the page: each image's drawn width over its own pixel width.
PROBE = """<script>addEventListener('load', () => {
  const shown = [...document.images].map(i => [i.getBoundingClientRect().width, i.naturalWidth]);
  document.title = 'shown:' + JSON.stringify(shown) + ':end';
});</script>"""


def _smallest_text_px(tmp_path, page: Path, width: int) -> dict[int, float]:
    """The smallest chart text, in CSS px, that Chromium draws at `width`: per image, in page order."""
    text = page.read_text()
    pngs = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]
    probe = page.with_name("probe.html")
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={width},900", "--dump-dom", probe.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    found = re.search(r"<title>shown:(.*):end</title>", done.stdout)
    assert found, f"the probe did not run (exit {done.returncode}): {done.stderr[-2000:]}"
    shown = json.loads(found.group(1))
    assert len(shown) == len(pngs) >= 6
    out = {}
    for i, ((drawn, natural), png) in enumerate(zip(shown, pngs, strict=True)):
        font, dpi, _, _ = _legibility(png)
        out[i] = font * dpi / 72 * drawn / natural
    return out


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium) to render the page")
def test_chart_text_is_at_least_10_px_in_an_800_and_a_1280_px_window(tmp_path, monkeypatch):
    page = _report(tmp_path)["index.html"]
    for width in (800, 1280):
        sizes = _smallest_text_px(tmp_path, page, width)
        assert min(sizes.values()) >= MIN_TEXT_PX, f"{width} px window: smallest chart text (px) {sizes}"
    # the check can fail: the old layout squeezed every chart into half the window, at least 480 px
    old = report.CSS.replace(
        ".charts img{max-width:100%;height:auto}", ".charts img{width:calc(50% - 12px);min-width:480px}"
    )
    monkeypatch.setattr(report, "CSS", old)
    squeezed = report.build_report(store.load(tmp_path / "r.jsonl"), tmp_path / "old")["index.html"]
    assert min(_smallest_text_px(tmp_path, squeezed, 800).values()) < MIN_TEXT_PX
    plt.close("all")
