"""`mpbench gemms` and the calibration it stands on: GEMMs of any shape in each arithmetic, the kernels'
rectangular contracts, one timing per distinct GEMM, skips with reasons, predictions from a planted
calibration, and the memory bandwidth `mpbench calibrate` measures. No timing is asserted (CPU CI is noisy)."""

from __future__ import annotations

import json

import pytest
import torch

from suite.cli.main import main
from suite.hardware import DeviceInfo, resolve_device
from suite.metrics import calibration, roofline
from suite.metrics import gemms as gemms_mod

CPU = DeviceInfo("cpu", "test cpu")
FAST = ["--device", "cpu", "--repeats", "1"]


@pytest.fixture
def quick(monkeypatch, tmp_path):
    """One call per timed batch, and a calibration folder of the test's own (empty unless planted)."""
    monkeypatch.setattr(gemms_mod, "TARGET_S", {"cpu": 0.0, "cuda": 0.0})
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path / "cal"))
    return tmp_path


def _rows(path) -> dict:
    return json.loads(path.read_text())


def _bytes(row: dict) -> float:
    """Least traffic of a row's GEMM: operands read once, the result written once."""
    sizes = ((row["m"] * row["k"], row["a"]), (row["k"] * row["n"], row["b"]), (row["m"] * row["n"], row["out"]))
    return sum(count * roofline.FORMAT_BYTES[fmt] for count, fmt in sizes)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "int8", "fp8", "fp8-rowwise", "fp8-rowwise-rescaled"])
def test_a_gemm_of_any_shape_in_each_arithmetic(name):
    out = calibration.gemm(CPU, name, 48, 32, 80)()
    assert out.shape == (48, 80)
    assert out.dtype == (torch.int32 if name == "int8" else torch.bfloat16 if name.startswith("fp8") else
                         calibration.DTYPES[name])  # fmt: skip


def test_the_square_calibration_still_builds_n_by_n(monkeypatch):
    seen = []
    real = calibration.gemm
    monkeypatch.setattr(
        calibration, "gemm", lambda d, name, m, k, n, **kw: seen.append((name, m, k, n)) or real(d, name, m, k, n, **kw)
    )
    calibration._time_matmul(CPU, "fp32", 64, repeats=1)
    assert seen == [("fp32", 64, 64, 64)]


def test_mxfp8_is_refused_below_blackwell_with_its_reason():
    for device in (CPU, DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))):
        why = calibration.unavailable(device, "mxfp8")
        assert "compute capability >= 10.0" in why
        with pytest.raises(NotImplementedError, match="Blackwell"):
            calibration.gemm(device, "mxfp8", 128, 64, 128)


def test_mxfp8_block_scales_have_cublas_padded_size():
    # one e8m0 per 32 elements of K, K blocks padded to 4, rows to 128 (torch's _check_scaled_mm_sizes)
    a, b = calibration._scales("mxfp8", 100, 96, 300, torch.device("cpu"))
    assert a.dtype == torch.float8_e8m0fnu and a.numel() == 128 * 4 and b.numel() == 384 * 4
    assert torch.all(a.view(torch.uint8) == 127)  # 2^0: unit scales


def test_rectangular_scaled_mm_matches_the_dequantized_matmul_on_cpu():
    """torch 2.13's CPU build has _scaled_mm: tensorwise (one fp32 scale each) and rowwise ((m, 1) and (1, n))
    on rectangular e4m3 operands, the second column-major, equal the matmul of the dequantized operands."""
    gen = torch.Generator().manual_seed(0)
    m, k, n = 48, 32, 80
    a = torch.randn(m, k, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(k, n, generator=gen).to(torch.float8_e4m3fn).t().contiguous().t()
    for sa, sb in ((torch.tensor(0.5), torch.tensor(2.0)), (torch.rand(m, 1, generator=gen) + 0.5,
                                                          torch.rand(1, n, generator=gen) + 0.5)):  # fmt: skip
        got = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        want = (a.float() * sa) @ (b.float() * sb)
        assert got.shape == (m, n)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)  # bf16 output rounding


def test_rectangular_int_mm_is_the_exact_integer_product_on_cpu():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (48, 32), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (32, 80), generator=gen, dtype=torch.int8).t().contiguous().t()
    assert torch.equal(torch._int_mm(a, b), a.long().mm(b.long()).int())


def test_time_call_uses_the_devices_cuda_events_on_a_gpu(monkeypatch):
    """The GPU branch of the one timer: events on the device's stream, elapsed_time / inner, no perf_counter."""
    calls, marks = [], []

    class Event:
        def __init__(self, t):
            self.t = t

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 10.0  # 10 ms per call between the marks

    class Events:
        def __init__(self, device):
            assert device == torch.device("cuda", 1)

        def mark(self):
            marks.append(len(calls))
            return Event(len(calls))

    monkeypatch.setattr(calibration, "CudaEvents", Events)
    monkeypatch.setattr(calibration.time, "perf_counter", lambda: pytest.fail("perf_counter on a GPU"))
    gpu = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), index=1)
    times = calibration.time_call(gpu, lambda: calls.append(1), repeats=3, inner=4, warmup=2)
    assert times == pytest.approx([0.010] * 3) and len(calls) == 2 + 3 * 4 and len(marks) == 6


def test_each_distinct_gemm_is_timed_once(quick, monkeypatch):
    built = []
    real = calibration.gemm
    monkeypatch.setattr(
        calibration,
        "gemm",
        lambda d, name, m, k, n, **kw: (
            built.append((name, m, k, n, kw.get("layout", "nn"))) or real(d, name, m, k, n, **kw)
        ),
    )
    out = quick / "g.json"
    assert main(["gemms", *FAST, "--modes", "fp32,bf16,int8-mixed,bf16", "--out", str(out)]) == 0
    rows = _rows(out)["rows"]
    timed = {(r["arithmetic"], r["m"], r["k"], r["n"], r["layout"]) for r in rows if r["measured_ms"] is not None}
    probes = [b for b in built if b[1:4] == (32, 32, 32)]  # `unavailable`: does the kernel run here? once each
    assert sorted(probes) == sorted((a, 32, 32, 32, "nn") for a in ("fp32", "bf16", "int8"))
    # a 16/32-bit GEMM in the layout autograd hands it over: x @ W^T, dy @ W, dy^T @ x
    assert {r["gemm"]: r["layout"] for r in rows if r["arithmetic"] == "bf16"} == gemms_mod.LAYOUT
    assert sorted(b for b in built if b not in probes) == sorted(timed)  # each distinct GEMM timed once
    assert len(rows) > len(timed)  # shared: the lm_head's bf16 GEMMs in bf16 and int8-mixed, equal shapes
    assert {r["mode"] for r in rows} == {"fp32", "bf16", "int8-mixed"}
    int8 = [r for r in rows if r["arithmetic"] == "int8"]
    assert int8 and all(r["cast_ms"] is not None and len(r["casts"]) == 2 for r in int8)  # both operands cast
    assert all(r["cast_ms"] is None for r in rows if r["arithmetic"] in ("fp32", "bf16"))
    # the step's Linears: three GEMMs each, counted over the blocks (tiny: 2 blocks, 4 Linears each + lm_head)
    assert sum(r["count"] for r in rows if r["mode"] == "fp32") == 3 * (2 * 4 + 1)


def test_fp8_and_mxfp8_are_skipped_on_a_cpu_with_reasons(quick, capsys):
    out = quick / "g.json"
    assert main(["gemms", *FAST, "--modes", "fp8-tensorwise,fp8-rowwise,mxfp8", "--out", str(out)]) == 0
    rows = _rows(out)["rows"]
    for arith, text in (("fp8", "no fp8 matrix"), ("fp8-rowwise", "no fp8 matrix"),
                        ("fp8-rowwise-rescaled", "no fp8 matrix"), ("mxfp8", ">= 10.0")):  # fmt: skip
        mine = [r for r in rows if r["arithmetic"] == arith]
        assert mine and all(r["measured_ms"] is None and text in r["skipped_reason"] for r in mine), arith
    assert all(r["measured_ms"] is not None for r in rows if r["layer"] == "lm_head")  # kept in bf16: timed
    printed = capsys.readouterr().out
    assert "fp8 not timed: a CPU has no fp8" in printed and "mxfp8 not timed: mxfp8 matmuls need" in printed
    assert "left out: attention's batched GEMMs" in printed


def test_a_shape_the_kernel_refuses_is_skipped_with_why_and_the_rest_still_timed(quick, monkeypatch):
    """On CUDA `_scaled_mm` refuses dimensions that are not multiples of 16 (an odd --seq-len makes K of the
    weight-gradient GEMM one): that row says so; the command and the other rows go on."""
    real = calibration.gemm

    def picky(device, name, m, k, n, **kw):
        if (m, k, n) == (256, 128, 512):
            raise RuntimeError("Expected self.size(1) to be divisible by 16")
        return real(device, name, m, k, n, **kw)

    monkeypatch.setattr(calibration, "gemm", picky)
    out = quick / "g.json"
    assert main(["gemms", *FAST, "--modes", "bf16", "--out", str(out)]) == 0
    rows = _rows(out)["rows"]
    refused = [r for r in rows if (r["m"], r["k"], r["n"]) == (256, 128, 512)]
    assert refused and all("refused 256 x 128 x 512: RuntimeError: Expected" in r["skipped_reason"] for r in refused)
    assert all(r["measured_ms"] is not None for r in rows if r not in refused)


def test_predictions_need_a_calibration_and_say_why_without(quick, capsys):
    out = quick / "g.json"
    assert main(["gemms", *FAST, "--modes", "fp32", "--out", str(out)]) == 0
    rows = _rows(out)["rows"]
    assert all(r["predicted_ms"] is None and "mpbench calibrate" in r["predicted_reason"] for r in rows)
    assert all(r["measured_over_predicted"] is None for r in rows)
    assert "no calibrated ceiling: not calibrated" in capsys.readouterr().out

    # plant a calibration: 1 TFLOP/s fp32, 2 bf16, 4 int8, 10 GB/s
    here = resolve_device("cpu")
    flops = {d: {"flops": f * 1e12} for d, f in (("fp32", 1), ("bf16", 2), ("int8", 4))}
    planted = {"device": here.name, "results": flops,
               "bandwidth": {"bytes_per_s": 1e10, "method": "planted", "tries": []}}  # fmt: skip
    calibration.save(planted, calibration.calibration_path(here))
    assert main(["gemms", *FAST, "--modes", "fp32,int8-mixed", "--out", str(out)]) == 0
    data = _rows(out)
    for r in data["rows"]:  # the roofline's max(FLOPs / ceiling, bytes / bandwidth), never under either
        assert r["measured_over_predicted"] == pytest.approx(r["measured_ms"] / r["predicted_ms"])
        peak = {"fp32": 1e12, "bf16": 2e12, "int8": 4e12}[r["arithmetic"]]
        assert r["predicted_ms"] == pytest.approx(max(2 * r["m"] * r["k"] * r["n"] / peak, _bytes(r) / 1e10) * 1e3)
    top = {t["arithmetic"]: t for t in data["biggest"]}
    assert top["fp32"]["ceiling_tflops"] == pytest.approx(1.0) and top["fp32"]["of_ceiling"] > 0
    assert top["int8"]["of_ceiling"] == pytest.approx(top["int8"]["tflops"] / 4.0)
    printed = capsys.readouterr().out
    assert "x the calibrated fp32 ceiling (1.000 TFLOP/s" in printed and "measured / predicted" in printed


@pytest.mark.parametrize(
    "argv, text",
    [(["--model", "gpt9"], "model='gpt9' is unknown"),
     (["--modes", "fp64"], "fp64"),
     (["--modes", ","], "modes=',': empty"),
     (["--batch-size", "0"], "batch_size=0: must be at least 1"),
     (["--seq-len", "0"], "seq_len=0: must be 1 to the model's block size 128"),
     (["--seq-len", "129"], "seq_len=129"),
     (["--repeats", "0"], "repeats=0: must be at least 1")],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(quick, capsys, argv, text):
    assert main(["gemms", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpbench gemms: error:") and text in err and "\n" not in err


def test_casts_are_real_quantizations():
    """The cast timed beside a GEMM produces the format: fp8 tensorwise round-trips within e4m3's precision,
    int8 rowwise within half a step of each row's absmax / 127; 16-bit operands need no cast."""
    torch.manual_seed(0)
    assert gemms_mod.cast("bf16", 8, 64, CPU) is None
    q, scale = gemms_mod.cast("e4m3-tensorwise", 8, 64, CPU)()
    assert q.dtype == torch.float8_e4m3fn and scale.numel() == 1
    q, scale = gemms_mod.cast("e4m3-rowwise-pow2", 8, 64, CPU)()
    assert scale.shape == (8, 1) and torch.all(torch.log2(scale) == torch.log2(scale).round())
    assert gemms_mod.cast("int8-rowwise", 8, 64, CPU)().dtype == torch.int8
    q, exp = gemms_mod.cast("mxfp8-rceil", 8, 64, CPU)()
    assert q.shape == (8, 2, 32) and exp.shape == (8, 2, 1) and exp.dtype == torch.uint8


def test_calibrate_measures_the_bandwidth_and_bandwidth_reads_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "CPU_SIZES", (32,))
    monkeypatch.setattr(calibration, "copy_bytes", lambda device: 1 << 20)  # 1 MiB: seconds, not minutes
    assert main(["calibrate", "--device", "cpu", "--dtypes", "fp32"]) == 0
    assert "memory bandwidth: " in capsys.readouterr().out
    here = resolve_device("cpu")
    stored = json.loads(calibration.calibration_path(here).read_text())["bandwidth"]
    assert stored["bytes_per_s"] > 0 and "copy of a 1 MiB fp32 tensor" in stored["method"]
    assert len(stored["tries"]) == 5 and all(t["bytes"] == 2 << 20 for t in stored["tries"])  # read + write
    assert calibration.bandwidth(here) == (stored["bytes_per_s"], None)


def test_a_copy_that_fails_stores_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "time_call", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    result = calibration.measure_bandwidth(CPU, 1 << 20)
    assert result["bytes_per_s"] is None and "RuntimeError: out of memory" in result["reason"]
    calibration.save({"device": CPU.name, "results": {}, "bandwidth": result}, calibration.calibration_path(CPU))
    value, why = calibration.bandwidth(CPU)
    assert value is None and "out of memory" in why


@pytest.mark.real_copy_bytes
def test_copy_size_is_beyond_the_cache_and_within_memory(monkeypatch):
    monkeypatch.setattr(calibration, "_last_level_cache", lambda: 480 * 2**20)
    monkeypatch.setattr(calibration, "available_ram", lambda: 64 * 2**30)
    assert calibration.copy_bytes(CPU) == 4 * 480 * 2**20
    monkeypatch.setattr(calibration, "available_ram", lambda: 8 * 2**30)
    assert calibration.copy_bytes(CPU) == 2**30  # 1/8 of the free memory: source + destination a quarter
    monkeypatch.setattr(calibration, "_last_level_cache", lambda: None)
    assert calibration.copy_bytes(CPU) == 256 * 2**20
    assert calibration.copy_bytes(DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))) == 256 * 2**20


def test_a_gpu_predicts_with_the_datasheet_peaks_and_bandwidth_the_records_use():
    """On a GPU the rows' ceilings are the roofline's (roofline_predict.ceilings): the datasheet peak of each
    arithmetic and the datasheet bandwidth; an unknown GPU's rows say why they have no prediction."""
    from suite.metrics import peaks

    h100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
    ceil = gemms_mod.Ceilings(h100)
    assert ceil.bandwidth == peaks.peak_bandwidth(h100.name)[0] > 0 and ceil.source.startswith("datasheet")
    assert ceil.of("bf16").flops_per_s["bf16"] == peaks.peak_flops(h100.name, "bf16")[0] > 0
    unknown = gemms_mod.Ceilings(DeviceInfo("cuda", "NVIDIA GeForce RTX 3060", (8, 6)))
    assert "NVIDIA GeForce RTX 3060" in unknown.of("bf16").missing
    gemm = roofline.Gemm("lm_head", "forward", 8192, 768, 50304, "bf16", "bf16", "bf16")
    rows = gemms_mod.rows_of("bf16", [gemm], gemms_mod.Timer(h100, 1), unknown)
    assert rows[0]["skipped_reason"]  # no CUDA here: the kernel cannot run, and the row says so
    assert rows[0]["predicted_ms"] is None and "RTX 3060" in rows[0]["predicted_reason"]


def test_a_busy_cpu_is_warned_about_by_gemms_and_calibrate(quick, monkeypatch, capsys):
    """A load average past doctor's bound makes CPU timings stall (a 0.05 ms GEMM read 10 ms on the 2-core VM
    at load 5): both commands say so on stderr, and gemms's JSON keeps the line."""
    from suite.cli import gemms as gemms_cli
    from suite.cli.quiet_checks import Host

    busy = Host(loadavg=lambda: (9.0, 9.0, 9.0), cpus=lambda: 2, usable=lambda: 2)
    monkeypatch.setattr(gemms_cli, "Host", lambda: busy)
    monkeypatch.setattr(calibration, "CPU_SIZES", (32,))
    monkeypatch.setattr(calibration, "copy_bytes", lambda device: 1 << 20)
    out = quick / "g.json"
    assert main(["gemms", *FAST, "--modes", "fp32", "--out", str(out)]) == 0
    assert main(["calibrate", "--device", "cpu", "--dtypes", "fp32", "--out", str(quick / "c.json")]) == 0
    err = capsys.readouterr().err
    assert "mpbench gemms: warning: 1-minute load average 9.00" in err and "mpbench calibrate: warning:" in err
    assert "4.50 per CPU" in _rows(out)["cpu_load"]
    quiet = Host(loadavg=lambda: (0.1, 0.1, 0.1), cpus=lambda: 2, usable=lambda: 2)
    assert gemms_cli.load_warning(CPU, quiet) is None
    assert gemms_cli.load_warning(DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0)), busy) is None


def test_a_mode_that_cannot_be_prepared_is_named_and_the_others_still_shown(quick, monkeypatch, capsys):
    real = gemms_mod.mode_gemms

    def broken(name, *args):
        if name == "int8-mixed":
            raise ImportError("needs torchao")
        return real(name, *args)

    monkeypatch.setattr(gemms_mod, "mode_gemms", broken)
    out = quick / "g.json"
    assert main(["gemms", *FAST, "--modes", "int8-mixed,fp32", "--out", str(out)]) == 0
    assert "int8-mixed: not shown: ImportError: needs torchao" in capsys.readouterr().out
    data = _rows(out)
    assert data["not_shown"] == {"int8-mixed": "ImportError: needs torchao"} and {r["mode"] for r in data["rows"]} == {
        "fp32"
    }


def test_out_refuses_a_file_that_is_not_a_gemms_table(quick, capsys):
    other = quick / "records.json"
    other.write_text('{"something": "else"}')
    assert main(["gemms", *FAST, "--modes", "fp32", "--out", str(other)]) == 2
    assert "mpbench gemms: error:" in capsys.readouterr().err and other.read_text() == '{"something": "else"}'


def test_fp8_gemms_run_as_torchao_runs_them(monkeypatch):
    """torchao 0.18: the float8 forward GEMM with fast accumulation (gemm_config_output), the backward ones
    without; rowwise's backward GEMMs as the tensorwise kernel with the row x column scales applied after
    (float8_ops.py addmm_float8_unwrapped). The arithmetic per GEMM kind, and what reaches _scaled_mm."""
    kinds = {}
    for fmt in ("e4m3-tensorwise", "e4m3-rowwise-pow2"):
        for kind in roofline.KINDS:
            g = roofline.Gemm("x", kind, 64, 32, 48, fmt, fmt, "bf16")
            kinds[fmt, kind] = (gemms_mod.arithmetic(g), gemms_mod.fast_accum(g))
    assert kinds == {("e4m3-tensorwise", "forward"): ("fp8", True), ("e4m3-tensorwise", "grad_input"): ("fp8", False),
                     ("e4m3-tensorwise", "grad_weight"): ("fp8", False),
                     ("e4m3-rowwise-pow2", "forward"): ("fp8-rowwise", True),
                     ("e4m3-rowwise-pow2", "grad_input"): ("fp8-rowwise-rescaled", False),
                     ("e4m3-rowwise-pow2", "grad_weight"): ("fp8-rowwise-rescaled", False)}  # fmt: skip
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kw: calls.append(kw) or real(a, b, **kw))
    calibration.gemm(CPU, "fp8-rowwise", 64, 32, 48, fast_accum=True)()
    rescaled = calibration.gemm(CPU, "fp8-rowwise-rescaled", 64, 32, 48)()
    assert calls[0]["use_fast_accum"] and calls[0]["scale_a"].shape == (64, 1) and calls[0]["scale_b"].shape == (1, 48)
    assert calls[1]["scale_a"].numel() == 1 and "use_fast_accum" not in calls[1]  # the tensorwise kernel
    torch.testing.assert_close(rescaled, calibration.gemm(CPU, "fp8", 64, 32, 48)())  # unit scales: the same


def test_mx_needs_blackwell_and_whole_blocks():
    b200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0))
    assert calibration._no_mx(b200) is None  # capability 10.0: the kernel is tried, not refused up front
    assert gemms_mod.cast("mxfp8", 8, 48, CPU) is None  # K = 48 is no whole number of 32-element blocks
