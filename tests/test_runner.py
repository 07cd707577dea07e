import pytest
import torch

from suite import Case, run_cases
from suite.modes import MODES
from suite.modes.base import PrecisionMode
from tests.helpers import small_case


class NaNWeights(PrecisionMode):
    name = "test-nan"

    def prepare(self, model):
        with torch.no_grad():
            model.ln_f.weight.fill_(float("nan"))
        return model


class Raises(PrecisionMode):
    name = "test-raise"

    def backward_and_step(self, loss, optimizer):
        raise RuntimeError("injected failure")


class OutOfMemory(PrecisionMode):
    name = "test-oom"

    def prepare(self, model):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.fixture
def faulty_modes(monkeypatch):
    for mode in (NaNWeights, Raises, OutOfMemory):
        monkeypatch.setitem(MODES, mode.name, mode)


def test_failing_cases_become_records_and_the_run_goes_on(tmp_path, faulty_modes):
    out = tmp_path / "r.jsonl"
    modes = ["fp32", "test-raise", "test-nan", "test-oom", "bf16"]
    records = run_cases([small_case(mode=m) for m in modes], out=out, log=None, isolate=False)
    status = {r["mode"]: r for r in records}
    assert [r["mode"] for r in records] == modes
    assert status["fp32"]["status"] == status["bf16"]["status"] == "ok"
    assert status["test-raise"]["status"] == "error"
    assert "RuntimeError: injected failure" in status["test-raise"]["reason"]
    assert status["test-nan"]["status"] == "diverged"
    assert status["test-nan"]["diverged_at_step"] == 1 and "step 1" in status["test-nan"]["reason"]
    assert status["test-oom"]["status"] == "oom" and "20.00 GiB" in status["test-oom"]["reason"]
    assert len(out.read_text().splitlines()) == 5


def test_same_seed_reproduces_the_run_and_another_seed_does_not():
    a, b = (run_cases([small_case(mode="fp32", steps=4)], log=None, isolate=False)[0] for _ in range(2))
    c = run_cases([small_case(mode="fp32", steps=4, seed=1)], log=None, isolate=False)[0]
    assert a["loss_curve"] == b["loss_curve"] and a["final_loss"] == b["final_loss"]
    assert a["loss_curve"] != c["loss_curve"]
    assert a["init_digest"] != c["init_digest"] and a["data_digest"] != c["data_digest"]


def test_training_lowers_the_loss():
    r = run_cases([small_case(mode="fp32", steps=30, batch_size=8, seq_len=64)], log=None, isolate=False)[0]
    assert r["final_loss"] < r["initial_loss"] - 1.0


def test_progress_is_logged():
    lines = []
    run_cases([small_case(mode="fp32", steps=4)], log=lines.append, isolate=False)
    assert any("step 4/4 loss" in line for line in lines)
    assert lines[-1].endswith(f"final loss {float(lines[-1].rsplit(' ', 1)[1]):.4f}")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(model="gpt5"), "model='gpt5' is unknown"),
        (dict(mode="fp7"), "mode='fp7' is unknown"),
        (dict(device="tpu"), "device='tpu' is unknown"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(steps=3, warmup=3), "warmup=3"),
        (dict(seq_len=129), "seq_len=129 exceeds the block size 128"),
        (dict(lr=-1.0), "lr=-1.0"),
    ],
)
def test_invalid_case_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        small_case(**overrides)


def test_case_defaults_are_valid():
    assert Case(device="cpu").learning_rate > 0
