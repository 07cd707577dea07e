"""The roofline of a step: GEMMs against the model's FLOP count, bytes per format, each mode's arithmetic,
the bound from planted ceilings, null + reason where a ceiling is missing, and the fields a run records."""

from __future__ import annotations

import json

import pytest
import torch

from models import GPT, GPTConfig
from suite.hardware import DeviceInfo, resolve_device
from suite.metrics import calibration
from suite.metrics.roofline import Gemm, converted_layers, gemm_seconds, linear_gemms, mode_formats, model_gemms
from suite.metrics.roofline_predict import predict, record_fields
from suite.metrics.roofline_step import _operand_cast, cast_traffic, model_linears
from suite.modes import get_mode
from suite.running.runner import run_cases
from tests.helpers import small_case

CPU = DeviceInfo("cpu", "test cpu")
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
TINY = GPTConfig.preset("tiny")


def formats(mode: str, device: DeviceInfo = H100, config: GPTConfig = TINY):
    m = get_mode(mode)(device)
    return mode_formats(m, converted_layers(m, config))


def plant(tmp_path, monkeypatch, flops: dict[str, float], bandwidth: float | None, device: DeviceInfo = CPU) -> None:
    """A calibration file for `device` as `mpbench calibrate` writes it, with the given ceilings."""
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    data = {"device": device.name, "results": {k: {"flops": v} for k, v in flops.items()},
            "bandwidth": {"bytes_per_s": bandwidth, "method": "planted", "reason": "planted"}}  # fmt: skip
    calibration.save(data, calibration.calibration_path(device))


@pytest.mark.parametrize("name", ["tiny", "gpt2-small", "gpt2-xl"])
def test_gemm_flops_are_the_models_count_with_half_of_attention(name):
    """GPT.flops_per_token counts the full T x T attention; the roofline, like flash kernels, half of it."""
    cfg, batch, seq = GPTConfig.preset(name), 2, 128
    gemms = model_gemms(cfg, batch, seq, *formats("fp32", CPU, cfg))
    with torch.device("meta"):
        per_token = GPT(cfg).flops_per_token(seq)
    attention_half = 6 * cfg.n_layer * cfg.n_embd * seq  # per token: half of 12 L C T
    assert sum(g.flops for g in gemms) == batch * seq * (per_token - attention_half)
    assert len(gemms) == 3 * (4 * cfg.n_layer + 1) + 6 * cfg.n_layer  # three per Linear, six per attention


def test_the_three_gemms_of_a_linear_have_autograds_shapes():
    f = dict.fromkeys(("input", "weight", "grad_output", "grad_weight"), "bf16")
    fwd, dx, dw = linear_gemms("l", 1024, 768, 3072, f)
    assert (fwd.shape, dx.shape, dw.shape) == ((1024, 768, 3072), (1024, 3072, 768), (3072, 1024, 768))
    assert fwd.flops == dx.flops == dw.flops == 2 * 1024 * 768 * 3072


def test_bytes_per_format_and_per_cast():
    bf16 = Gemm("l", "forward", 128, 64, 32, "bf16", "bf16", "bf16")
    fp8 = Gemm("l", "forward", 128, 64, 32, "e4m3-tensorwise", "e4m3-tensorwise", "bf16")
    mx = Gemm("l", "forward", 128, 64, 32, "mxfp8", "mxfp8", "bf16")
    assert bf16.bytes == 2 * (128 * 64 + 64 * 32 + 128 * 32)
    assert fp8.bytes == 128 * 64 + 64 * 32 + 2 * 128 * 32
    assert mx.bytes == (1 + 1 / 32) * (128 * 64 + 64 * 32) + 2 * 128 * 32
    # a (100 x 50) bf16 activation cast tensorwise: amax read + one cast read, both layouts written
    assert _operand_cast("e4m3-tensorwise", 100, 50, 2.0, weight=False) == (2 * 2 * 5000, 2 * 5000)
    assert _operand_cast("e4m3-tensorwise", 100, 50, 4.0, weight=True) == (3 * 4 * 5000, 2 * 5000)
    # rowwise: two casts, each a read, 1 byte out, an fp32 scale per row of each layout
    assert _operand_cast("e4m3-rowwise-pow2", 100, 50, 2.0, weight=False) == (2 * 2 * 5000, 2 * 5000 + 4 * 150)
    assert _operand_cast("mxfp8-rceil", 100, 50, 2.0, weight=False) == (2 * 2 * 5000, 2 * (1 + 1 / 32) * 5000)


def test_each_modes_gemms_run_in_its_arithmetic():
    for mode, block in (("fp8-tensorwise", "fp8"), ("fp8-rowwise", "fp8"), ("int8-mixed", "int8"),
                        ("mxfp8", "mxfp8"), ("bf16", "bf16"), ("fp32", "fp32"), ("pure-bf16", "bf16")):  # fmt: skip
        gemms = model_gemms(TINY, 2, 32, *formats(mode))
        kinds = {(g.layer.startswith("blocks.") and not g.layer.endswith("sdpa"), g.compute) for g in gemms}
        rest = "fp32" if mode == "fp32" else "bf16"  # the LM head and attention: as the mode's plain Linears
        assert kinds == {(True, block), (False, rest)}, mode


def test_gemm_time_is_the_larger_of_compute_and_memory_hand_computed():
    g = Gemm("l", "forward", 128, 64, 32, "fp32", "fp32", "fp32")  # 524,288 FLOP; 57,344 bytes
    assert g.flops == 524_288 and g.bytes == 57_344
    assert gemm_seconds(g, {"fp32": 1e9}, 1e8) == pytest.approx(57_344 / 1e8)  # memory-bound
    assert gemm_seconds(g, {"fp32": 1e9}, 1e9) == pytest.approx(524_288 / 1e9)  # compute-bound
    assert gemm_seconds(g, {"bf16": 1e9}, 1e9) is None and gemm_seconds(g, {"fp32": 1e9}, None) is None


def test_bf16_casts_are_the_weight_copy_and_the_gradient_cast_hand_computed():
    """bf16 autocast: each Linear's fp32 master read (4) and copied to bf16 (2), its bf16 weight gradient
    read (2) and cast to the fp32 .grad (4): 12 bytes per weight element; fp32 casts nothing."""
    weights = 2 * (128 * 384 + 128 * 128 + 128 * 512 + 512 * 128) + 128 * 512  # tiny: 2 blocks + the LM head
    bf16 = cast_traffic(model_linears(TINY, "bf16", formats("bf16")[0])[0], 64)
    assert bf16["read"] + bf16["written"] == 12 * weights
    fp32 = cast_traffic(model_linears(TINY, "fp32", formats("fp32", CPU)[0])[0], 64)
    assert fp32 == {"read": 0.0, "written": 0.0}


def test_the_bound_adds_its_parts_over_planted_ceilings(tmp_path, monkeypatch):
    plant(tmp_path, monkeypatch, {"fp32": 1e11, "bf16": 4e11}, 1e10)
    p = predict(TINY, 2, 32, "fp32", CPU)
    assert p.reason is None and p.step_ms == pytest.approx(p.gemm_ms + p.cast_ms + p.rest_ms)
    assert p.cast_ms == 0.0 and p.rest_ms == pytest.approx(p.inputs["rest_bytes"] / 1e10 * 1e3)
    gemms = model_gemms(TINY, 2, 32, *formats("fp32", CPU))
    want = sum(max(g.flops / 1e11, g.bytes / 1e10) for g in gemms) * 1e3
    assert p.gemm_ms == pytest.approx(want)
    params = sum(p.numel() for p in GPT(TINY).parameters())
    assert p.inputs["optimizer_bytes"] == 28 * params  # fp32 AdamW: read w, g, m, v; write w, m, v
    assert p.inputs["flops_per_s"] == {"fp32": 1e11} and "calibrated" in p.inputs["source"]
    fields = record_fields(TINY, 2, 32, "fp32", CPU, None)
    bf16 = predict(TINY, 2, 32, "bf16", CPU)
    assert fields["predicted_speedup_vs_bf16"] == pytest.approx(bf16.step_ms / p.step_ms)
    assert fields["predicted_speedup_vs_fp32"] == pytest.approx(1.0)
    assert json.loads(json.dumps(fields)) == fields  # JSON-friendly as recorded


def test_null_with_a_reason_never_a_made_up_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))  # nothing calibrated here
    cpu = record_fields(TINY, 2, 32, "fp32", CPU, None)
    assert cpu["predicted_step_ms"] is None and "mpbench calibrate" in cpu["roofline_reason"]
    assert cpu["predicted_speedup_vs_bf16"] is None
    plant(tmp_path, monkeypatch, {"fp32": 1e11}, None)  # matmuls calibrated, bandwidth not measured
    assert "no memory bandwidth" in predict(TINY, 2, 32, "fp32", CPU).reason
    plant(tmp_path, monkeypatch, {"fp32": 1e11}, 1e10)  # bf16 not calibrated: the speed-up says why
    partial = record_fields(TINY, 2, 32, "fp32", CPU, None)
    assert partial["predicted_step_ms"] and partial["predicted_speedup_vs_bf16"] is None
    assert "predicted_speedup_vs_bf16" in partial["roofline_reason"] and "bf16" in partial["roofline_reason"]
    unknown = predict(TINY, 2, 32, "bf16", DeviceInfo("cuda", "NVIDIA GeForce RTX 3060", (8, 6)))
    assert unknown.step_ms is None and "RTX 3060" in unknown.reason
    a10g = predict(TINY, 2, 32, "bf16", DeviceInfo("cuda", "NVIDIA A10G", (8, 6)))
    assert a10g.step_ms is None and "bandwidth" in a10g.reason  # its peaks are known, its bandwidth is not
    emulated = record_fields(TINY, 2, 32, "fp8-tensorwise", CPU, None)
    assert emulated["predicted_step_ms"] is None and "emulated" in emulated["roofline_reason"]
    assert emulated["predicted_speedup_vs_bf16"] is None


def test_gpu_bound_from_the_datasheet():
    cfg = GPTConfig.preset("gpt2-small")
    bf16 = record_fields(cfg, 16, 1024, "bf16", H100, None)
    fp8 = record_fields(cfg, 16, 1024, "fp8-tensorwise", H100, None)
    assert bf16["roofline_reason"] is None and fp8["roofline_reason"] is None
    inputs = fp8["roofline_inputs"]
    assert inputs["flops_per_s"] == {"bf16": 989.5e12, "fp8": 1979e12} and inputs["bandwidth_bytes_per_s"] == 3.35e12
    assert "H100" in inputs["source"] and "3.35 TB/s" in inputs["source"]
    assert fp8["predicted_gemm_ms"] < bf16["predicted_gemm_ms"] and fp8["predicted_cast_ms"] > bf16["predicted_cast_ms"]
    assert fp8["predicted_speedup_vs_bf16"] < 1.05  # gpt2-small: the casts eat the fp8 GEMMs' gain
    assert bf16["predicted_speedup_vs_fp32"] > 5  # tensor cores vs the fp32 FMA rate
    big = record_fields(GPTConfig.preset("gpt2-xl"), 16, 1024, "fp8-tensorwise", H100, None)
    assert big["predicted_speedup_vs_bf16"] > fp8["predicted_speedup_vs_bf16"]  # larger GEMMs gain more


def test_data_parallel_is_per_gpu_and_says_communication_is_not_modelled():
    one = predict(TINY, 2, 32, "bf16", H100)
    ddp = predict(TINY, 2, 32, "bf16", H100, nproc=2, parallel="ddp")
    fsdp = predict(TINY, 2, 32, "bf16", H100, nproc=2, parallel="fsdp")
    assert ddp.step_ms == pytest.approx(one.step_ms) and one.inputs["communication"] is None
    assert "not modelled" in ddp.inputs["communication"]
    assert fsdp.inputs["optimizer_bytes"] == pytest.approx(one.inputs["optimizer_bytes"] / 2)


def test_a_cpu_run_records_the_bound_and_a_faster_step_is_suspect(tmp_path, monkeypatch):
    here = resolve_device("cpu")
    plant(tmp_path, monkeypatch, {"fp32": 1e15, "bf16": 2e15}, 1e13, here)  # ceilings no CPU reaches
    r = run_cases([small_case(mode="fp32", steps=3, warmup=1)], log=None, isolate=False)[0]
    assert r["status"] == "ok" and r["roofline_reason"] is None
    assert 0 < r["predicted_step_ms"] < r["step_time_ms"]
    assert r["predicted_speedup_vs_bf16"] > 0 and r["predicted_speedup_vs_fp32"] == pytest.approx(1.0)
    assert r["roofline_inputs"]["gemm_count"] == 3 * 9 + 12 and r["roofline_inputs"]["tokens_per_gpu"] == 64
    assert "roofline_bound" not in [s["rule"] for s in r["suspect"]]
    plant(tmp_path, monkeypatch, {"fp32": 1e3, "bf16": 1e3}, 1e3, here)  # ceilings far too low: the step beats them
    slow = run_cases([small_case(mode="fp32", steps=3, warmup=1)], log=None, isolate=False)[0]
    assert slow["predicted_step_ms"] > slow["step_time_ms"]
    assert "roofline_bound" in [s["rule"] for s in slow["suspect"]]


def summary_records() -> list[dict]:
    """fp32, bf16 and fp8 records of one H100 case with their roofline fields: fp8 measured 1.30x bf16 where
    the roofline predicts 1.10x, against a bf16 step faster than its own bound (suspect, so both marked)."""
    from suite.records import checks
    from tests.test_narrow_terminal import ok

    recs = [ok("fp32", 1000.0, 990.0, 1010.0, 0.0, predicted_step_ms=800.0, predicted_speedup_vs_bf16=0.2),
            ok("bf16", 130.0, 129.0, 131.0, 0.001, predicted_step_ms=140.0, predicted_speedup_vs_bf16=1.0),
            ok("fp8-tensorwise", 100.0, 99.0, 101.0, 0.002, predicted_step_ms=95.0,
               predicted_speedup_vs_bf16=1.1)]  # fmt: skip
    return [r | {"suspect": checks.check(r)} for r in recs]


@pytest.mark.parametrize("width", [80, 160])
def test_summary_shows_measured_over_predicted_and_the_speed_up_beside_the_roofline(width):
    from tests.test_narrow_terminal import printed

    text = printed(width, summary_records())
    lines = text.splitlines()
    assert "…" not in text and all(len(line.rstrip()) <= width for line in lines), text
    if width < 160:  # narrow: the roofline columns go before the step time, and the note says so
        assert "left out at" in text and "meas/pred" in text.split("left out at")[1]
        return
    row = {
        line.split()[0]: line.split() for line in lines if line.split()[:1] in (["fp32"], ["bf16"], ["fp8-tensorwise"])
    }
    assert "1.05" in row["fp8-tensorwise"] and "1.25" in row["fp32"]  # 100 / 95 and 1000 / 800
    assert "0.93!" in row["bf16"]  # 130 ms against a 140 ms bound: below it by more than 5%, suspect
    # 130 / 100 against a bf16 step that beat its own bound: the speed-up is marked too
    assert "1.30!" in row["fp8-tensorwise"] and "(1.10)" in row["fp8-tensorwise"]
    assert "meas/pred: measured step / the roofline's lower bound" in " ".join(text.split())


def test_a_roofline_that_fails_is_a_reason_not_a_failed_case(monkeypatch):
    from suite.running import execute

    def broken(*args, **kwargs):
        raise KeyError("fp4")

    monkeypatch.setattr(execute.roofline, "record_fields", broken)
    fields = execute.roofline_fields(small_case(mode="fp32"), CPU, None)
    assert fields == {"roofline_reason": "the roofline could not be computed: KeyError: 'fp4'"}


def test_summary_of_several_seeds_with_and_without_a_roofline():
    """The seed column goes in after the roofline columns were kept or dropped: every row as wide as the header."""
    from tests.test_narrow_terminal import printed

    with_roofline = summary_records()
    seeds = [r | {"seed": s} for s in (0, 1) for r in with_roofline]
    text = printed(240, seeds)
    assert "meas/pred" in text and "seed" in text and "0.93!" in text
    plain = [{k: v for k, v in r.items() if not k.startswith("predicted")} | {"suspect": []} for r in seeds]
    text = printed(240, plain)  # no roofline (not calibrated, say): both columns dropped, bf16 in the run or not
    assert "meas/pred" not in text and "x bf16" not in text and "seed" in text
