"""The report: files, a self-contained page, "not measured" with reasons, and the record loader."""

import base64
import csv
import html
import re

import pytest

from suite import run_cases
from suite.records import store
from suite.records.store import append, make_record
from suite.reporting import report
from tests.helpers import small_case

CASE = dict(model="gpt2-small", batch_size=16, seq_len=1024, steps=60, warmup=10, seed=0, compile=False, run_id="r1")
GPU = dict(gpu_name="NVIDIA H100 80GB HBM3", gpu_memory_mb=81559, driver="570.86", cuda="12.8", torch="2.11.0",
           python="3.12.3", cpu="Intel Xeon", hostname="gpu-1", git_commit="abc123", device="cuda")  # fmt: skip
NO_PEAK = "no peak FLOP/s known for GPU 'NVIDIA H100 80GB HBM3'; mfu is not computed"


def _gpu(mode: str, step: float, **kw) -> dict:
    values = dict(mode=mode, status="ok", step_time_ms=step, step_time_p10_ms=step * 0.98, step_time_p90_ms=step * 1.03,
                  tokens_per_step=16384, tokens_per_s=16384 / step * 1000, mfu=0.4, mfu_bf16=0.2, mamf=None,
                  mamf_reason="not calibrated on this machine", tensor_core_util=0.61,
                  tensor_core_util_source="nvml-gpm", peak_mem_mb=30_000.0, peak_mem_source="nvml-process",
                  peak_mem_allocated_mb=25_000.0, energy_j_per_step=50.0, tokens_per_joule=16384 / 50.0,
                  loss_curve=[6.0, 5.0, 4.0], final_loss=4.0, loss_floor=1.4, excess_loss=2.6,
                  loss_delta_vs_fp32=0.0 if mode == "fp32" else 0.001)  # fmt: skip
    return make_record(**(CASE | GPU | values | kw))


@pytest.fixture
def files(tmp_path):
    """Two record files: an H100 run (bf16's MFU not measured, tf32 failed) and a CPU run without energy."""
    gpu, cpu = tmp_path / "gpu.jsonl", tmp_path / "cpu.jsonl"
    for r in (_gpu("fp32", 200.0), _gpu("bf16", 100.0, mfu=None, mfu_bf16=None, mfu_reason=NO_PEAK),
              make_record(**(CASE | GPU), mode="tf32", status="error", reason="RuntimeError: boom")):  # fmt: skip
        append(gpu, r)
    for mode in ("fp32", "bf16"):
        append(cpu, make_record(**CASE | {"model": "tiny", "run_id": "r2"}, mode=mode, status="ok", device="cpu",
                                cpu="AMD EPYC", step_time_ms=30.0, step_time_p10_ms=29.0, step_time_p90_ms=31.0,
                                tokens_per_s=1000.0, peak_mem_mb=400.0, peak_mem_source="rss",
                                energy_reason="CPU: no energy counter", loss_curve=[6.0, 5.5],
                                final_loss=5.4))  # fmt: skip
    return gpu, cpu


def test_load_two_files_gives_every_record_with_its_source(files):
    gpu, cpu = files
    df = store.load([gpu, str(cpu)])
    assert len(df) == 5
    assert df["source"].tolist() == [str(gpu)] * 3 + [str(cpu)] * 2
    assert set(store.FIELDS) <= set(df.columns)
    assert len(store.load(str(gpu.parent / "*.jsonl"))) == 5  # a glob, sorted: cpu.jsonl first
    assert store.load(str(gpu.parent / "*.jsonl"))["source"].iloc[0] == str(cpu)


def test_loader_names_the_missing_file_the_empty_glob_and_the_broken_line(tmp_path, files):
    with pytest.raises(ValueError, match="missing.jsonl"):
        store.load(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=re.escape("nothing-*.jsonl")):
        store.load(str(tmp_path / "nothing-*.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(files[0].read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{broken}:2")):
        store.load([files[0], broken])


def test_report_writes_every_file(tmp_path, files):
    written = report.build_report(store.load(list(files)), tmp_path / "out")
    for name in ("index.html", "summary.md", "summary.csv"):
        assert written[name].is_file() and written[name].stat().st_size > 0
    pngs = [p for name, p in written.items() if name.endswith(".png")]
    assert len(pngs) >= 7 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    with open(written["summary.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["fp32", "bf16", "tf32", "fp32", "bf16"]
    assert float(rows[1]["speedup_vs_fp32"]) == pytest.approx(2.0)  # fp32 200 ms over bf16 100 ms, same group
    assert float(rows[0]["energy_mj_per_token"]) == pytest.approx(50.0 / 16384 * 1000)
    assert rows[1]["mfu_pct"] == "" and NO_PEAK in rows[1]["not_measured"]


def test_page_is_self_contained(tmp_path, files):
    page = report.build_report(store.load(list(files)), tmp_path)["index.html"].read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "url(" not in page and "<script" not in page.lower()
    images = re.findall(r"<img\b[^>]*>", page)
    assert len(images) >= 7
    for img in images:
        data = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', img)
        assert data, img[:80]
        assert base64.b64decode(data.group(1))[:4] == b"\x89PNG"


def test_a_null_metric_reads_not_measured_with_its_reason(tmp_path, files):
    written = report.build_report(store.load(list(files)), tmp_path)
    page, md = written["index.html"].read_text(), written["summary.md"].read_text()
    # bf16's MFU: the cell says "not measured", its tooltip and a footnote give the record's reason
    assert f'<span class="nm" title="{html.escape(NO_PEAK)}">not measured <sup>[' in page
    assert re.search(rf"<li>\[\d+\] {re.escape(html.escape(NO_PEAK))}</li>", page)
    assert "not measured [" in md and NO_PEAK in md
    assert "error: RuntimeError: boom" in page  # the failed case's cells carry its status and reason
    # the CPU group has no energy: its chart is skipped, and the page says why
    assert "energy per token chart skipped: no mode has this figure: CPU: no energy counter" in page
    for unit in ("(ms)", "(MiB)", "(mJ)", "(nats/token)", "tokens/s", "(%)"):
        assert unit in page
    assert "NVIDIA H100 80GB HBM3" in page and "570.86" in page and "abc123" in page  # environment


def test_procurement_section_only_when_asked(tmp_path, files):
    df = store.load(list(files))
    assert "Procurement" not in report.build_report(df, tmp_path / "a")["index.html"].read_text()
    page = report.build_report(df, tmp_path / "b", prices={"H100": 2.5}, target_loss=4.5)["index.html"].read_text()
    assert "Procurement" in page and "price (USD/GPU-h)" in page and "CPU run: no GPU price applies" in page


def test_report_of_a_real_cpu_run(tmp_path):
    out = tmp_path / "r.jsonl"
    run_cases([small_case(mode="fp32"), small_case(mode="bf16")], out=out, log=None, isolate=False)
    written = report.build_report(store.load(out), tmp_path / "report")
    page = written["index.html"].read_text()
    assert "CPU: no tensor cores" in page and "not measured" in page
    assert sum(name.endswith(".png") for name in written) == 4  # loss, step time, speed-up, memory; no energy
