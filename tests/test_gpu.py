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
