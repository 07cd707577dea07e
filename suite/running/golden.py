"""The golden fp32 loss curve: `tiny` on CPU, fixed seed, committed under results/golden/.

Regenerate (only when a change is meant to alter training) with `python -m suite.running.golden`.
`tests/test_golden.py` retrains the same case and compares the curve step by step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from suite.running.runner import run_cases
from suite.training.case import Case

GOLDEN_CASE = Case(model="tiny", mode="fp32", device="cpu", batch_size=8, seq_len=64, steps=30, warmup=1, seed=0)
GOLDEN_PATH = Path(__file__).resolve().parents[2] / "results" / "golden" / "tiny-cpu-fp32-seed0.json"


def golden_curve() -> dict:
    """Train GOLDEN_CASE and return what the golden file stores."""
    record = run_cases([GOLDEN_CASE], log=None, isolate=False)[0]
    if record["status"] != "ok":
        raise RuntimeError(f"golden case ended as {record['status']}: {record['reason']}")
    return {
        "case": {
            k: getattr(GOLDEN_CASE, k) for k in ("model", "mode", "device", "batch_size", "seq_len", "steps", "seed")
        },
        "lr": record["lr"],
        "lr_schedule": [record["lr_schedule"], record["lr_warmup_steps"], record["lr_floor"]],
        "loss_floor": record["loss_floor"],
        "init_digest": record["init_digest"],
        "data_digest": record["data_digest"],
        "loss_curve": record["loss_curve"],
        "final_loss": record["final_loss"],
        "made_with": {"torch": torch.__version__, "cpu": record["cpu"], "torch_threads": record["torch_threads"]},
    }


if __name__ == "__main__":
    GOLDEN_PATH.write_text(json.dumps(golden_curve(), indent=1) + "\n")
    print(f"wrote {GOLDEN_PATH}", file=sys.stderr)
