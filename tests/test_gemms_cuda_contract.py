"""Every GEMM `mpbench gemms` would time on an H100, checked against torch's CUDA contract
for torch._scaled_mm (torch/_meta_registrations.py _check_scaled_mm_sizes, run on fake CUDA tensors: the same
checks aten's CUDA kernel makes: row-major A, column-major B, K and N multiples of 16, scale dtypes/shapes) and
the documented CUDA rules of torch._int_mm (M > 16, K and N multiples of 8), with the scales calibration._scales
builds. No GPU needed."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from models import GPTConfig
from suite.hardware import DeviceInfo
from suite.metrics import calibration, gemms
from suite.modes import MODES

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 0)
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0), 0)


def _fake(mode: FakeTensorMode, shape: tuple[int, int], dtype: torch.dtype, col_major: bool = False) -> torch.Tensor:
    stride = (1, shape[0]) if col_major else (shape[1], 1)
    return FakeTensor(mode, torch.empty_strided(shape, stride, dtype=dtype, device="meta"), torch.device("cuda", 0))


def _run_as_cuda(arith: str, m: int, k: int, n: int, fast: bool) -> None:
    """What calibration.gemm(arith, m, k, n) launches, on fake CUDA tensors (meta checks = CUDA's contract)."""
    if arith == "int8":
        assert m > 16 and k % 8 == 0 and n % 8 == 0, f"_int_mm on CUDA refuses {m} x {k} x {n}"
        return
    fake = FakeTensorMode()
    with fake:
        a = _fake(fake, (m, k), torch.float8_e4m3fn)
        b = _fake(fake, (k, n), torch.float8_e4m3fn, col_major=True)
        scale_a, scale_b = calibration._scales(arith, m, k, n, torch.device("cuda", 0))
        if arith == "fp8-rowwise-rescaled":
            one = torch.ones((), device="cuda")
            out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            out *= scale_a * scale_b
        else:
            out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                                   use_fast_accum=fast)  # fmt: skip
    assert tuple(out.shape) == (m, n)


CASES = [("gpt2-small", 16, 1024, H100), ("gpt2-xl", 4, 1024, H100), ("tiny", 8, 256, H100),
         ("gpt2-small", 16, 1024, B200)]  # fmt: skip


@pytest.mark.parametrize("model,batch,seq_len,device", CASES)
@pytest.mark.parametrize("mode_name", sorted(MODES))
def test_every_gemm_of_mpbench_gemms_meets_the_cuda_contract(mode_name, model, batch, seq_len, device):
    try:
        every = gemms.mode_gemms(mode_name, device, GPTConfig.preset(model), batch, seq_len)
    except Exception as exc:  # a mode that cannot be prepared here is not this test's subject
        pytest.skip(f"{mode_name}: {type(exc).__name__}: {exc}")
    failures = []
    for g in every:
        arith = gemms.arithmetic(g)
        if arith not in ("int8", *calibration.FP8) or (arith == "mxfp8" and device is H100):
            continue
        try:
            _run_as_cuda(arith, g.m, g.k, g.n, gemms.fast_accum(g))
        except (RuntimeError, AssertionError) as exc:
            failures.append(f"{g.layer} {g.kind} {arith} {g.shape}: {str(exc).splitlines()[0][:150]}")
    assert not failures, "\n".join(failures[:10])


def test_the_gpu_gate_times_an_aligned_gemm_in_the_steps_layout():
    """benchmarks/test_gemms_ceiling.py gates, on a GPU, a bf16 GEMM of gpt2-small b16 x 1024 against the calibrated
    square-matmul ceiling. The biggest GEMM is the unpadded LM head, N = 50257: not a multiple of 8 (NVIDIA's
    alignment rule for tensor-core GEMMs), a cost of the shape the gate must not blame on the timer; so the gate
    takes the biggest GEMM with every dimension a multiple of 64, timed in the layout autograd hands it over."""
    every = gemms.mode_gemms("bf16", H100, GPTConfig.preset("gpt2-small"), 16, 1024)
    assert any(d % 8 for d in max(every, key=lambda x: x.flops).shape)  # the misaligned LM head is the biggest
    big = gemms.biggest_aligned(every)
    assert big is not None and all(d % 64 == 0 for d in big.shape), big
    assert big.layer.startswith("blocks.") and big.flops == max(g.flops for g in every if g.layer.startswith("blocks."))
    # the forward GEMM x @ W^T hands its second operand over column-major, the weight gradient its first
    cpu = DeviceInfo("cpu", "cpu")
    for layout, (a_col, b_col) in {"nn": (False, False), "nt": (False, True), "tn": (True, False)}.items():
        call = calibration.gemm(cpu, "bf16", 32, 48, 64, layout=layout)
        a, b = (call.__closure__[i].cell_contents for i in range(2))
        assert (a.stride() == (1, 32), b.stride() == (1, 48)) == (a_col, b_col), layout
        assert call().shape == (32, 64)
    with pytest.raises(ValueError, match="layout='tt' is unknown"):
        calibration.gemm(cpu, "bf16", 32, 48, 64, layout="tt")
    assert gemms.LAYOUT == {"forward": "nt", "grad_input": "nn", "grad_weight": "tn"}


def test_no_mark_when_every_mode_is_above_its_own_bound():
    """cli/summary.py `_versus_roofline` marks "!" when a mode's measured speed-up vs bf16 exceeds 1.05 x the
    ratio of the two roofline bounds. A ratio of lower bounds is no bound on a ratio of times: a mode that reaches
    its bound more closely than bf16 does (fp32 on CUDA cores is compute-bound, eager bf16 is not) beats it with
    nothing wrong. Figures of gpt2-small b16 x 1024 on an H100 SXM: bounds 209.0 ms (fp32) and 26.56 ms (bf16,
    roofline_predict.predict); plausible steps 280 ms and 50 ms, each above its own bound. A step that beats its
    bound marks its own ratio and the speed-up."""
    from suite.records import checks
    from tests.test_narrow_terminal import ok, printed

    recs = [ok("fp32", 280.0, 278.0, 282.0, 0.0, predicted_step_ms=209.0, predicted_speedup_vs_bf16=26.56 / 209.0),
            ok("bf16", 50.0, 49.0, 51.0, 0.001, predicted_step_ms=26.56, predicted_speedup_vs_bf16=1.0)]  # fmt: skip
    recs = [r | {"suspect": checks.check(r)} for r in recs]
    assert not any(s["rule"] == "roofline_bound" for r in recs for s in r["suspect"])  # both above their bounds
    text = printed(200, recs)
    fp32 = next(line for line in text.splitlines() if line.split()[:1] == ["fp32"])
    assert "!" not in fp32, fp32
    fast = [ok("fp32", 190.0, 189.0, 191.0, 0.0, predicted_step_ms=209.0, predicted_speedup_vs_bf16=26.56 / 209.0),
            recs[1]]  # fmt: skip
    fast[0] |= {"suspect": checks.check(fast[0])}
    fp32 = next(line for line in printed(200, fast).splitlines() if line.split()[:1] == ["fp32"])
    assert "0.91!" in fp32 and "0.26! (0.13)" in fp32, fp32


def test_listing_a_modes_gemms_leaves_no_process_wide_change_behind():
    """mode_gemms prepares the mode (torchao's Float8Linear swap patches inductor's min/max codegen process-wide):
    inside the mode's numerics(), so the patch and the TF32 flags are put back, as a training case puts them."""
    from torch._inductor.codegen.triton import TritonOverrides

    before = (
        TritonOverrides.__dict__["minimum"],
        TritonOverrides.__dict__["maximum"],
        torch.get_float32_matmul_precision(),
    )
    for mode_name in ("fp8-tensorwise", "fp8-rowwise", "tf32"):
        gemms.mode_gemms(mode_name, H100, GPTConfig.preset("tiny"), 2, 32)
    after = (
        TritonOverrides.__dict__["minimum"],
        TritonOverrides.__dict__["maximum"],
        torch.get_float32_matmul_precision(),
    )
    assert after == before
