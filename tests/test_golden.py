"""The committed golden fp32 curve (results/golden/) is reproduced step by step.

Tolerance: 1e-3 nats per step. On one machine, 1 and 2 CPU threads (different reduction
orders) differ by at most 1e-6 over the 30 steps; other CPUs (AVX2 vs AVX-512 kernels) and
torch releases differ more but, over so few steps, far less than 1e-3. A real change to the
model, data, init, optimizer or loss moves the curve by more: bf16 autocast alone moves it by
1e-3 to 4e-3 per step. Digests of the initial weights and batches must match exactly;
regenerate with `python -m suite.running.golden` only for a change meant to alter training.
"""

import json

import pytest

from suite.running.golden import GOLDEN_PATH, golden_curve

TOLERANCE = 1e-3


def test_golden_fp32_curve_is_reproduced():
    golden = json.loads(GOLDEN_PATH.read_text())
    now = golden_curve()
    assert now["case"] == golden["case"]
    assert now["lr_schedule"] == golden["lr_schedule"], "the learning-rate schedule changed"
    assert now["init_digest"] == golden["init_digest"], "initial weights changed"
    assert now["data_digest"] == golden["data_digest"], "training batches changed"
    assert now["loss_floor"] == pytest.approx(golden["loss_floor"], abs=1e-12)
    worst = max(abs(a - b) for a, b in zip(now["loss_curve"], golden["loss_curve"], strict=True))
    assert worst < TOLERANCE, f"loss curve moved by up to {worst:.2e} nats (tolerance {TOLERANCE})"
    assert now["final_loss"] == pytest.approx(golden["final_loss"], abs=TOLERANCE)
    # and it is a curve worth guarding: it learns, and stays above the optimum
    assert golden["loss_curve"][-1] < golden["loss_curve"][0] - 1.0 and golden["final_loss"] > golden["loss_floor"]
