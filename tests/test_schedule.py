"""The learning-rate schedule: warm-up then cosine to the floor by the last step, applied to every step
the loop trains, recorded, and part of the case key (old constant-rate records stay their own case)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from suite.cli.main import main
from suite.hardware import resolve_device
from suite.records import store
from suite.records.cases import case_key, differences
from suite.reporting.convergence import TOLERANCES
from suite.reporting.seeds import judge
from suite.running.execute import case_fields
from suite.running.runner import run_cases
from suite.training import train as train_mod
from suite.training.schedule import LRSchedule, default_warmup
from tests.helpers import small_case


def test_cosine_warms_up_linearly_and_ends_exactly_at_its_floor():
    s = LRSchedule("cosine", peak=1e-3, steps=50, warmup=5, floor=0.1)
    rates = [s.lr(k) for k in range(50)]
    assert rates[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])  # step k at peak x (k+1)/warmup
    assert rates[5] == pytest.approx(1e-3)  # the first step after warm-up is at the peak
    assert rates[-1] == pytest.approx(1e-4, rel=1e-12)  # the floor is reached within the run, at the last step
    after = rates[5:]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))  # strictly falling after the peak
    mid = 5 + (50 - 1 - 5) // 2  # halfway through the decay: half-way between peak and floor
    assert rates[mid] == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert min(rates) >= 1e-4 * (1 - 1e-12)
    longest = LRSchedule("cosine", 1e-3, steps=50, warmup=48, floor=0.1)  # the longest warm-up a case accepts
    assert longest.lr(48) == pytest.approx(1e-3) and longest.lr(49) == pytest.approx(1e-4)


def test_constant_is_the_peak_at_every_step_and_short_runs_stay_sane():
    assert {LRSchedule("constant", 3e-3, 10, 0, 1.0).lr(k) for k in range(10)} == {3e-3}
    one = LRSchedule("cosine", 3e-3, steps=1, warmup=default_warmup(1), floor=0.1)
    assert one.lr(0) == pytest.approx(3e-3)  # a one-step run trains at the peak, not at 0 or the floor
    assert default_warmup(40) == 4 and default_warmup(3) == 1 and default_warmup(2) == 0 == default_warmup(1)
    for steps in range(1, 60):  # the default always leaves the peak's step and the floor's step, when it can
        s = LRSchedule("cosine", 1.0, steps, default_warmup(steps), 0.1)
        assert s.lr(steps - 1) == pytest.approx(0.1 if steps >= 2 else 1.0), steps
    assert all(math.isfinite(LRSchedule("cosine", 1.0, 2, 1, 0.0).lr(k)) for k in range(2))


def test_the_loop_sets_each_steps_rate_before_the_step(monkeypatch):
    seen: list[float] = []
    real = train_mod.train_step

    def spying(model, mode, optimizer, batch):
        seen.append(optimizer.param_groups[0]["lr"])
        assert len({g["lr"] for g in optimizer.param_groups}) == 1  # decay and no-decay groups alike
        return real(model, mode, optimizer, batch)

    monkeypatch.setattr(train_mod, "train_step", spying)
    case = small_case(steps=8, warmup=2, lr=1e-3, lr_warmup=2, lr_floor=0.25)
    run_cases([case], log=None, isolate=False)
    assert seen == pytest.approx([case.schedule.lr(k) for k in range(8)])
    assert seen[0] == pytest.approx(5e-4) and seen[-1] == pytest.approx(2.5e-4)


def test_the_schedule_changes_training_and_is_recorded():
    cosine, constant = run_cases(
        [small_case(steps=10, warmup=1), small_case(steps=10, warmup=1, lr_schedule="constant")],
        log=None,
        isolate=False,
    )
    assert (cosine["lr_schedule"], cosine["lr_warmup_steps"], cosine["lr_floor"]) == ("cosine", 1, 0.1)
    assert (constant["lr_schedule"], constant["lr_warmup_steps"], constant["lr_floor"]) == ("constant", 0, 1.0)
    # the default warm-up of 10 steps is 1 step: step 0 trains at the peak, as does step 1 (the peak's own
    # step); step 2 is the first decayed one, so the losses agree up to step 2's and differ from step 3's
    assert cosine["loss_curve"][:3] == constant["loss_curve"][:3]
    assert cosine["loss_curve"][3] != constant["loss_curve"][3]
    assert case_key(cosine) != case_key(constant)


def test_an_old_record_without_the_schedule_is_the_constant_rate_case():
    device = resolve_device("cpu")
    new_constant = case_fields(small_case(lr_schedule="constant"), device)
    old = {k: v for k, v in new_constant.items() if k not in ("lr_schedule", "lr_warmup_steps", "lr_floor")}
    assert case_key(old) == case_key(new_constant)
    cosine = case_fields(small_case(), device)
    assert case_key(old) != case_key(cosine)
    assert "lr_schedule constant vs cosine" in differences(old, cosine)


def test_a_resume_under_another_schedule_runs_the_case(tmp_path):
    out = tmp_path / "r.jsonl"
    run_cases([small_case(lr_schedule="constant")], out=out, log=None, isolate=False)
    assert run_cases([small_case(lr_schedule="constant")], out=out, log=None, isolate=False, resume=True) == []
    again = run_cases([small_case(lr_floor=0.5)], out=out, log=None, isolate=False, resume=True)
    assert [r["lr_floor"] for r in again] == [0.5]
    assert [json.loads(line)["lr_schedule"] for line in out.read_text().splitlines()] == ["constant", "cosine"]


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--lr-schedule", "linear"], "lr_schedule='linear' is unknown; choose one of cosine, constant"),
        (["--lr-warmup", "2"], "lr_warmup=2: must be in 1..steps-2 (steps=3)"),
        (["--lr-warmup", "0"], "lr_warmup=0: must be in 1..steps-2"),
        (["--lr-warmup", "1", "--lr-schedule", "constant"], "lr_warmup=1: only the cosine schedule warms up"),
        (["--lr-floor", "1.5"], "lr_floor=1.5: must be a fraction of the peak rate in 0..1"),
        (["--lr-floor", "nan"], "lr_floor=nan: must be a fraction"),
    ],
)
def test_bad_schedule_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, field):
    out = tmp_path / "r.jsonl"
    argv = ["run", "--device", "cpu", "--modes", "fp32", "--steps", "3", "--warmup", "1", "--out", str(out), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1
    assert not out.exists() or out.read_text() == ""


def test_the_rate_is_a_host_float_so_the_step_adds_no_sync():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    LRSchedule("cosine", 1e-3, 10, 2, 0.1).apply(opt, 3)
    assert type(opt.param_groups[0]["lr"]) is float


def test_a_resume_never_pairs_a_mode_with_an_fp32_trained_under_another_schedule(tmp_path):
    out = tmp_path / "r.jsonl"
    run_cases([small_case(steps=8, lr_warmup=1)], out=out, log=None, isolate=False)
    resumed = run_cases([small_case(steps=8, mode="bf16", lr_warmup=5)], out=out, log=None, isolate=False, resume=True)
    bf16 = resumed[0]
    assert bf16["loss_delta_vs_fp32"] is None and "fp32 is not in this run" in bf16["loss_delta_reason"]
    fp32 = run_cases([small_case(steps=8, lr_warmup=5)], out=out, log=None, isolate=False, resume=True)[0]
    verdicts = {v.mode: v for v in judge(store.read(out), TOLERANCES)}  # bf16's own fp32, not the first one
    assert verdicts["bf16"].delta.mean == pytest.approx(bf16["final_loss"] - fp32["final_loss"])
