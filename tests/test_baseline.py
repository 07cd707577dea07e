import json

import pytest

from suite.cli.main import main
from suite.records.store import append, make_record
from suite.reporting import baseline

CASE = dict(batch_size=16, seq_len=1024, steps=60, warmup=10, seed=0, compile=False)


def _record(mode="bf16", step=100.0, p10=99.0, p90=101.0, mem=20_000.0, loss=3.0, **kw):
    values = dict(mode=mode, model="gpt2-small", status="ok", gpu_name="NVIDIA H100 80GB HBM3", step_time_ms=step,
                  step_time_p10_ms=p10, step_time_p90_ms=p90, peak_mem_allocated_mb=mem, peak_mem_mb=mem + 600,
                  final_loss=loss, energy_j_per_step=50.0, **CASE)  # fmt: skip
    return make_record(**(values | kw))


def _entry(record):
    return baseline.make_baseline([record])["entries"][f"{record['model']}/{record['mode']}"]


def test_a_slower_run_fails_naming_metric_mode_and_values():
    entry = _entry(_record(step=100.0))
    findings = baseline.compare(_record(step=110.0), entry)
    bad = [f for f in findings if f.regressed]
    assert [f.metric for f in bad] == ["step_time_ms"]
    message = bad[0].message("bf16", "gpt2-small")
    assert "gpt2-small/bf16 step_time_ms: 100 -> 110 (+10.0%)" in message and "REGRESSED" in message


def test_a_run_within_its_measured_noise_passes():
    entry = _entry(_record(step=100.0, p10=97.0, p90=103.0))  # 6% spread
    assert not any(f.regressed for f in baseline.compare(_record(step=107.0, p10=104.0, p90=110.0), entry))
    # the same +7% with a tight spread is a regression: the threshold follows the noise
    tight = _entry(_record(step=100.0, p10=99.8, p90=100.2))
    assert any(f.regressed for f in baseline.compare(_record(step=107.0, p10=106.8, p90=107.2), tight))


def test_memory_and_loss_have_their_own_bounds():
    entry = _entry(_record())
    assert not any(f.regressed for f in baseline.compare(_record(mem=20_010.0, loss=3.01), entry))
    worse = {f.metric for f in baseline.compare(_record(mem=21_000.0, loss=3.05), entry) if f.regressed}
    assert worse == {"peak_mem_allocated_mb", "peak_mem_mb", "final_loss"}


def test_faster_is_never_a_regression():
    entry = _entry(_record(step=100.0))
    assert not any(f.regressed for f in baseline.compare(_record(step=50.0, mem=10_000.0, loss=2.0), entry))


def test_a_different_case_is_refused():
    with pytest.raises(ValueError, match="differs from the baseline"):
        baseline.compare(_record(batch_size=8), _entry(_record()))


def test_one_machine_per_baseline():
    other = _record(gpu_name="NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match="one machine"):
        baseline.make_baseline([_record(), other])
    assert baseline.machine_key(_record()) == "nvidia-h100-80gb-hbm3"


def test_cli_writes_the_baseline(tmp_path, capsys):
    records = tmp_path / "r.jsonl"
    for mode in ("fp32", "bf16"):
        append(records, _record(mode=mode))
    append(records, _record(mode="tf32", status="error", reason="boom"))  # not baselined
    out = tmp_path / "b.json"
    assert main(["baseline", str(records), "--out", str(out)]) == 0
    assert sorted(json.loads(out.read_text())["entries"]) == ["gpt2-small/bf16", "gpt2-small/fp32"]
    assert main(["baseline", str(tmp_path / "missing.jsonl")]) == 2


def test_memory_measured_differently_is_not_compared():
    from suite.reporting import baseline

    a = {"model": "tiny", "mode": "fp32", "status": "ok", "gpu_name": "NVIDIA H100", "peak_mem_mb": 1000.0,
         "peak_mem_source": "nvml-process", "step_time_ms": 10.0, "batch_size": 8, "seq_len": 128}  # fmt: skip
    entry = baseline.make_baseline([a])["entries"]["tiny/fp32"]
    same = baseline.compare(a | {"peak_mem_mb": 3000.0}, entry)
    assert [f.metric for f in same if f.regressed] == ["peak_mem_mb"]
    other = baseline.compare(a | {"peak_mem_mb": 3000.0, "peak_mem_source": "rss"}, entry)
    assert "peak_mem_mb" not in [f.metric for f in other]
