"""The one train step and loop, shared by `mpbench run`, the benchmarks, asv and the tests."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import GPT
from suite.hardware import DeviceInfo, on_device
from suite.metrics.tensor_cores import ProfilerTensorCores
from suite.metrics.timing import StepTimer, TimingStats
from suite.metrics.window import MeasuredWindow, profiler_fields
from suite.modes import PrecisionMode, build_mode
from suite.modes.base import tf32_matmuls
from suite.modes.optimizer import optimizer_impl
from suite.training.case import Case
from suite.training.data import Corpus, digest
from suite.training.numerics import NOT_REQUESTED, Sampler, linear_layers, sampled_steps
from suite.training.schedule import LRSchedule

# progress(step_done, steps, last_loss): called a few times per case
Progress = Callable[[int, int, float], None]
# agree(first NaN/inf step seen here, or None) -> the step every process stops at (data parallel)
Agree = Callable[[int | None], int | None]


def train_step(
    model: nn.Module, mode: PrecisionMode, optimizer: torch.optim.Optimizer, batch: torch.Tensor
) -> tuple[torch.Tensor, bool | torch.Tensor]:
    """One optimizer step on batch (B, T+1). Returns (detached loss, whether the step applied: a bool
    or a 0-dim bool tensor, so that the step adds no host sync of its own)."""
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
def evaluate(model: nn.Module, batches: torch.Tensor, device: torch.device) -> float:
    """Mean loss over held-out batches (n, B, T+1) in strict fp32: no autocast, no TF32, so
    modes are compared on what their weights learned, not on how they evaluate."""
    losses = []
    with tf32_matmuls(False):
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            logits = model(batch[:, :-1]).float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
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
    loss_scale_curve: list[float] | None  # after each step; None without loss scaling
    eval_curve: list[list[float]]  # [step, held-out loss] every eval_every steps and at the end
    diverged_at: int | None  # first step (counted from 1) whose loss was NaN/inf
    compute: str
    init_digest: str
    storage: dict[str, Any] = field(default_factory=dict)  # dtypes, converted layers, optimizer_impl
    measurements: dict[str, Any] = field(default_factory=dict)  # tracker fields for the record
    numerics: dict[str, Any] = field(default_factory=dict)  # the numerics_* record fields (mpbench run --numerics)


class TrainLoop:
    """Runs train steps over batches and stops at the first NaN/inf loss: `run_case`'s loop, and the fp32 steps
    `mpbench numerics` trains before it takes its tensors.

    Per-step values live in tensors preallocated on the device, one per series (loss, whether
    the step applied, loss scale), written without a host sync and read only at the few check
    points. A growing list of per-step tensors would pin freed heap memory on a CPU (resident
    memory grew ~2 MB a step) and cost cache blocks or syncs on a GPU.
    """

    def __init__(
        self,
        fn: nn.Module,
        mode: PrecisionMode,
        optimizer: torch.optim.Optimizer,
        dev: torch.device,
        steps: int,
        progress: Progress | None,
        eval_every: int = 0,
        evaluate: Callable[[], float] | None = None,
        agree: Agree | None = None,
        schedule: LRSchedule | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.fn, self.mode, self.optimizer, self.dev = fn, mode, optimizer, dev
        self.sampler = sampler  # None: no step is sampled (mpbench run without --numerics)
        self.schedule = schedule  # None: the optimizer's rate as made
        self.agree = agree
        self.steps, self.progress = steps, progress
        self.report_every = max(1, steps // 4)
        self.eval_every, self.evaluate = eval_every, evaluate
        self.losses = torch.full((steps,), float("nan"), device=dev)  # (steps,) fp32
        self.applied = torch.ones(steps, dtype=torch.bool, device=dev)  # False: loss scaling skipped it
        self.scales = torch.zeros(steps, device=dev) if mode.loss_scale is not None else None
        self.eval_curve: list[list[float]] = []
        self.done = 0
        self.diverged_at: int | None = None
        self._checked = 0

    def run(
        self,
        batches: torch.Tensor,
        timer: StepTimer | None = None,
        pause: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        """Train on `batches` (n, B, T+1); `pause` wraps each held-out evaluation and each sampled step
        (the measured window is paused around them, so their work is not counted).

        A sampled step (--numerics) runs the same `train_step` with the statistics hooks around it, paused
        and outside the step timer; every other step runs exactly as without --numerics: no hook exists."""
        for batch in batches:
            if self.diverged_at is not None:
                return
            batch = batch.to(self.dev, non_blocking=True)  # outside the timed step
            if self.schedule is not None:  # this step's rate: a host float, set outside the timed step
                self.schedule.apply(self.optimizer, self.done)
            if self.sampler is not None and self.sampler.wants(self.done + 1):
                with pause(), self.sampler.sampling(self.done + 1):
                    loss, stepped = train_step(self.fn, self.mode, self.optimizer, batch)
            else:
                with timer.measure() if timer else contextlib.nullcontext():
                    loss, stepped = train_step(self.fn, self.mode, self.optimizer, batch)
            i = self.done
            self.losses[i] = loss  # a device copy: no sync
            self.applied[i] = stepped  # a bool, or a 0-dim bool tensor on the device
            if self.scales is not None:
                self.scales[i] = self.mode.loss_scale
            self.done = done = i + 1
            if done % self.report_every == 0 or done == self.steps:
                self._check(done, timer)
            if self.eval_every and done % self.eval_every == 0 and done < self.steps and self.diverged_at is None:
                with pause():
                    self.eval_curve.append([done, self.evaluate()])

    def _check(self, done: int, timer: StepTimer | None) -> None:
        recent = self.losses[self._checked : done].tolist()  # the check point's one sync
        if timer is not None:
            timer.flush()  # the device is idle up to here: the events are ready
        # steps count from 1, as the progress lines do: the first NaN/inf loss of step k is "at step k"
        first_bad = next((self._checked + i + 1 for i, v in enumerate(recent) if not math.isfinite(v)), None)
        if self.agree is not None:  # data parallel: every rank stops at the same check point
            first_bad = self.agree(first_bad)
        if first_bad is not None:
            self.diverged_at = first_bad
            return
        self._checked = done
        if self.progress:
            self.progress(done, self.steps, recent[-1])

    def curves(self) -> tuple[list[float], int, list[float] | None]:
        """(loss per step run, steps skipped by loss scaling, loss scale after each step or None)."""
        n = self.done
        skipped = int((~self.applied[:n]).sum())
        return self.losses[:n].tolist(), skipped, None if self.scales is None else self.scales[:n].tolist()


def run_case(
    case: Case,
    device: DeviceInfo,
    corpus: Corpus,
    train_batches: torch.Tensor,
    heldout_batches: torch.Tensor,
    progress: Progress | None = None,
    trackers: bool = True,
    wrap: Callable[[nn.Module, PrecisionMode], nn.Module] | None = None,
    unshard: Callable[[nn.Module], nn.Module] | None = None,
    agree: Agree | None = None,
) -> CaseResult:
    """Build the model from the case's seed, let the mode prepare it, train, evaluate.

    Every CUDA call runs with the case's GPU as the current device (events, syncs and contexts
    that default to the current device land on it, not on GPU 0). `trackers=False` leaves only
    the step timer (to measure what the trackers cost). `wrap(model, mode)` wraps the prepared
    model for training, before the optimizer sees its parameters (data parallelism: DDP, or
    FSDP2, which replaces them with shards); storage and evaluation see the model itself, or
    for a sharded one what `unshard` gathers.
    """
    mode = build_mode(case.mode, device, case.keep_high, case.fp4_recipe)
    dev = device.torch_device
    model = GPT(case.model_config, seed=case.seed)  # fp32 on the CPU: identical for every mode
    layers = linear_layers(model)  # before the mode swaps Linears: the names stay, the classes change
    # torch's global generators (CPU and every GPU) from the case's seed too: torchao's stochastic
    # rounding (int8-weight) draws from them, so unseeded the same case ended 0.005 nats apart
    torch.manual_seed(case.seed)
    init_digest = digest(torch.cat([p.detach().flatten() for p in model.parameters()]))
    with on_device(dev), mode.numerics():
        model = mode.prepare(model.to(dev))
        trained = wrap(model, mode) if wrap else model
        optimizer = mode.make_optimizer(model, case.learning_rate, case.weight_decay)
        step_fn = torch.compile(trained) if case.compile else trained

        def held_out_loss() -> float:
            return evaluate(mode.eval_model(unshard(model) if unshard else model), heldout_batches, dev)

        sampler, numerics = _sampler(case, mode, model, layers)
        loop = TrainLoop(step_fn, mode, optimizer, dev, case.steps, progress, case.eval_every, held_out_loss, agree,
                     case.schedule, sampler)  # fmt: skip
        timing, measurements = _train_measured(case, device, loop, train_batches, trackers)
        final = None
        if loop.diverged_at is None:
            final = held_out_loss()
            loop.eval_curve.append([case.steps, final])
        # grads of the last step are still there; the optimizer that ran, from the optimizer object itself
        storage = storage_dtypes(model, optimizer) | mode.layer_fields() | {"optimizer_impl": optimizer_impl(optimizer)}
        loss_curve, skipped, scales = loop.curves()
        numerics = sampler.fields() if sampler else numerics
    return CaseResult(
        timing=timing,
        loss_curve=loss_curve,
        final_loss=final,
        skipped_steps=skipped,
        loss_scale_curve=scales,
        eval_curve=loop.eval_curve,
        diverged_at=loop.diverged_at,
        compute=mode.compute,
        init_digest=init_digest,
        storage=storage,
        measurements=measurements,
        numerics=numerics,
    )


def _sampler(
    case: Case, mode: PrecisionMode, model: nn.Module, layers: list[str]
) -> tuple[Sampler | None, dict[str, Any]]:
    """(the statistics sampler of --numerics, or None; the record fields when there is none). Setting it up
    failing never fails the case: the steps then train unsampled, and numerics_reason says why."""
    if not case.numerics_every:
        return None, {"numerics_reason": NOT_REQUESTED}
    try:
        formats = {layer: mode.tensor_formats(layer) for layer in layers}
        steps = sampled_steps(case.numerics_every, case.steps)
        return Sampler(model, layers, formats, steps, mode.tensor_formats()), {}
    except Exception as exc:
        return None, {"numerics_reason": f"the statistics could not be set up: {type(exc).__name__}: {exc}"}


def _train_measured(
    case: Case, device: DeviceInfo, loop: TrainLoop, batches: torch.Tensor, trackers: bool
) -> tuple[TimingStats | None, dict[str, Any]]:
    """All steps, in phases: warm-up (not measured); the timed window (step timer inside,
    memory/energy/GPM trackers around it, paused for held-out evaluation); then, on a GPU, a
    few reserved steps that run under the profiler when GPM gave no tensor-core figure (not
    supported, failed at run time, or a window too short) and train plainly otherwise."""
    window = MeasuredWindow(device) if trackers else None
    reserved = window.profiler_steps(case.steps - case.warmup) if window else 0
    timed_end = case.steps - reserved
    loop.run(batches[: case.warmup])
    timer = StepTimer(device.torch_device)
    with window or contextlib.nullcontext():
        loop.run(batches[case.warmup : timed_end], timer, window.paused if window else contextlib.nullcontext)
    measurements: dict[str, Any] = {}
    timing = None
    if loop.diverged_at is None:
        timing = timer.stats()
        measurements["timed_steps"] = len(timing.times_ms)
        if window:
            measurements |= window.fields(len(timing.times_ms), case.batch_size * case.seq_len)  # this process
    rest = batches[timed_end:]
    if reserved and loop.diverged_at is None and measurements.get("tensor_core_util") is None:
        # the profiler sees the first unbroken run of unsampled reserved steps (--numerics): the statistics'
        # kernels are not the step's, and a profiler is not paused around them. A Case samples every N-th step
        # with N >= 2 (and the last), so of the 3 reserved steps at least one is unsampled
        sampled = [bool(loop.sampler and loop.sampler.wants(timed_end + i + 1)) for i in range(len(rest))]
        start = sampled.index(False) if False in sampled else len(rest)
        end = sampled.index(True, start) if True in sampled[start:] else len(rest)
        loop.run(rest[:start])
        with ProfilerTensorCores() as prof:
            loop.run(rest[start:end])
        measurements |= profiler_fields(prof.result(), gpm_reason=measurements.get("tensor_core_util_reason"))
        loop.run(rest[end:])
    else:
        loop.run(rest)  # reserved steps train all the same: the loss curve has every step
    return timing, measurements
