"""The learning-rate schedule: linear warm-up, then cosine decay to a floor, as nanoGPT and torchtitan
pretrain; or the constant rate.

Why it matters to a precision benchmark: low-precision effects show late, when the updates get small
next to the weights (pure-bf16 without stochastic rounding stalls there). A constant rate never gets
there in a short run; a schedule that ends at its floor within the run does, so the last steps of
every case train with the small updates a real pretraining run ends with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "constant")
DEFAULT_SCHEDULE = "cosine"
DEFAULT_FLOOR = 0.1  # the last step's rate as a fraction of the peak (nanoGPT: min_lr = lr / 10)
WARMUP_SHARE = 0.1  # default warm-up: this share of the steps, at least 1


def default_warmup(steps: int) -> int:
    """Warm-up steps when none are given: a tenth of the run, at least one step, and at most steps - 2, so
    that the peak's own step is followed by at least one step that decays (the last one, at the floor)."""
    return max(0, min(max(1, round(steps * WARMUP_SHARE)), steps - 2))


@dataclass(frozen=True)
class LRSchedule:
    """The rate of every optimizer step of a run of `steps` steps, from `peak`."""

    kind: str  # "cosine" | "constant"
    peak: float
    steps: int
    warmup: int  # steps of linear warm-up (cosine only)
    floor: float  # the last step's rate / peak (cosine only)

    def lr(self, step: int) -> float:
        """The rate for optimizer step `step`, counted from 0.

        cosine: steps 0..warmup-1 rise linearly to the peak (step k at peak x (k+1)/warmup, so the
        first step is not wasted at rate 0); then the rate falls along half a cosine from the peak to
        floor x peak, reached exactly at the last step (steps - 1)."""
        if self.kind == "constant":
            return self.peak
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        decay_steps = self.steps - 1 - self.warmup  # the steps after the peak's own
        progress = (step - self.warmup) / decay_steps if decay_steps > 0 else 0.0  # no step after the peak
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # 1 at the peak, 0 at the end
        low = self.floor * self.peak
        return low + cosine * (self.peak - low)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every parameter group's rate for `step`: a float on the host, so no device sync."""
        rate = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
