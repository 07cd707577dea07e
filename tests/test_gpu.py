"""What only a CUDA GPU can show; skipped, with the reason, everywhere else."""

import pytest
import torch

from suite import run_cases
from suite.modes import MODES
from tests.helpers import small_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here"),
]


def test_every_mode_runs_or_explains_on_this_gpu():
    records = run_cases([small_case(mode=m, device="cuda", steps=6, warmup=2) for m in MODES], log=None)
    for r in records:
        assert r["status"] in ("ok", "skipped"), (r["mode"], r["reason"])
        if r["status"] == "ok":
            assert r["step_time_ms"] > 0 and r["final_loss"] < r["initial_loss"] + 0.5
            assert r["gpu_name"] and r["device"].startswith("cuda")
        else:
            assert r["reason"]


def test_int8_weight_computes_in_bf16_on_gpu():
    r = run_cases([small_case(mode="int8-weight", device="cuda")], log=None)[0]
    if r["status"] == "skipped":
        pytest.skip(r["reason"])
    assert r["compute_dtype"] == "bf16" and "int8" in r["weight_dtypes"]


def test_fidelity_on_gpu_fp32_is_strict_and_tf32_is_not():
    from suite.hardware import resolve_device
    from suite.training import fidelity
    from suite.training.data import make_corpus

    gpu = resolve_device("cuda")
    batches = make_corpus(None, 512).batches(1, 4, 64, 0)
    err = {}
    for mode in ("fp32", "tf32", "bf16"):
        if MODES[mode].unavailable_reason(gpu):
            continue
        case = small_case(mode=mode, device="cuda", steps=1, warmup=0, batch_size=4, seq_len=64)
        err[mode] = fidelity.record_fields(fidelity.measure(case, gpu, batches))["grad_rel_err_vs_fp64"]
    assert err["fp32"] < 1e-5  # TF32 really off in fp32 mode, and the float64 reference too
    if "tf32" in err:
        assert err["tf32"] > 10 * err["fp32"]  # 10-bit mantissa matmuls show
