"""The one train step and loop, shared by `mpbench run`, the benchmarks, asv and the tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import GPT
from suite.case import Case
from suite.data import Corpus, digest
from suite.hardware import DeviceInfo
from suite.metrics.timing import StepTimer, TimingStats
from suite.modes import PrecisionMode, get_mode

# progress(step_done, steps, last_loss): called a few times per case
Progress = Callable[[int, int, float], None]


def train_step(
    model: nn.Module, mode: PrecisionMode, optimizer: torch.optim.Optimizer, batch: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """One optimizer step on batch (B, T+1). Returns (detached loss, whether the step applied)."""
    x, y = batch[:, :-1], batch[:, 1:]  # inputs and next-token targets, (B, T) each
    # Free the previous step's grads here, not after the step, so they stay inspectable.
    optimizer.zero_grad(set_to_none=True)
    with mode.forward_context():
        logits = model(x)  # (B, T, V)
        # The loss is taken in fp32 in every mode, so modes differ only in the network.
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    stepped = mode.backward_and_step(loss, optimizer)
    return loss.detach(), stepped


@torch.no_grad()
def evaluate(model: nn.Module, mode: PrecisionMode, batches: torch.Tensor, device: torch.device) -> float:
    """Mean loss over held-out batches (n, B, T+1), with the mode's forward numerics."""
    losses = []
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        with mode.forward_context():
            logits = model(batch[:, :-1])
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()))
    return torch.stack(losses).mean().item()


def storage_dtypes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[str]]:
    """Which dtypes the weights, grads and optimizer state are stored in (sorted, unique)."""

    def name(t: torch.Tensor) -> str:
        int_data = getattr(t, "int_data", None)  # torchao's int8 weight: int8 data + scale
        return str(int_data.dtype if int_data is not None else t.dtype).removeprefix("torch.")

    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "weight_dtypes": sorted({name(p) for p in params}),
        "grad_dtypes": sorted({name(p.grad) for p in params if p.grad is not None}),
        "optimizer_state_dtypes": sorted({name(v) for v in state}),
    }


@dataclass
class CaseResult:
    """What training one case produced; the runner turns it into a record."""

    timing: TimingStats | None
    loss_curve: list[float]
    final_loss: float | None
    skipped_steps: int
    loss_scale: float | None
    diverged_at: int | None  # first step whose loss was NaN/inf
    compute: str
    init_digest: str
    storage: dict[str, list[str]] = field(default_factory=dict)


def run_case(
    case: Case,
    device: DeviceInfo,
    corpus: Corpus,
    train_batches: torch.Tensor,
    heldout_batches: torch.Tensor,
    progress: Progress | None = None,
) -> CaseResult:
    """Build the model from the case's seed, let the mode prepare it, train, evaluate."""
    mode = get_mode(case.mode)(device)
    dev = device.torch_device
    model = GPT(case.model_config, seed=case.seed)  # fp32 on the CPU: identical for every mode
    init_digest = digest(torch.cat([p.detach().flatten() for p in model.parameters()]))
    with mode.numerics():
        model = mode.prepare(model.to(dev))
        optimizer = mode.make_optimizer(model, case.learning_rate, case.weight_decay)
        step_fn = torch.compile(model) if case.compile else model
        timer = StepTimer(dev)
        losses: list[torch.Tensor] = []
        skipped, diverged_at, checked = 0, None, 0
        report_every = max(1, case.steps // 4)
        for step, batch in enumerate(train_batches):
            batch = batch.to(dev, non_blocking=True)
            if step < case.warmup:
                loss, stepped = train_step(step_fn, mode, optimizer, batch)
            else:
                with timer.measure():
                    loss, stepped = train_step(step_fn, mode, optimizer, batch)
            losses.append(loss)
            skipped += not stepped
            if (step + 1) % report_every == 0 or step + 1 == case.steps:
                recent = torch.stack(losses[checked:]).tolist()  # one sync per report
                bad = [i for i, v in enumerate(recent) if not math.isfinite(v)]
                if bad:
                    diverged_at = checked + bad[0]
                    break
                checked = len(losses)
                if progress:
                    progress(step + 1, case.steps, recent[-1])
        curve = torch.stack(losses).tolist()
        timing = timer.stats() if diverged_at is None else None
        final = None if diverged_at is not None else evaluate(step_fn, mode, heldout_batches, dev)
        storage = storage_dtypes(model, optimizer)  # grads of the last step are still there
    return CaseResult(
        timing=timing,
        loss_curve=curve,
        final_loss=final,
        skipped_steps=skipped,
        loss_scale=mode.loss_scale,
        diverged_at=diverged_at,
        compute=mode.compute,
        init_digest=init_digest,
        storage=storage,
    )
