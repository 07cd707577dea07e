"""Watching a Linear's four tensors on a sampled step: the hooks exist only while `watch` is open.

The roles of a Linear y = x W^T + b in its three GEMMs: forward (input x, weight W), input gradient
(grad_output dL/dy, W) and weight gradient (grad_output, x), whose result is grad_weight dL/dW.

- input: the Linear's first argument as it arrives (before autocast casts it inside F.linear);
- weight: the weight as the module presents it to its GEMM: the fp32 master, a dtype parametrization's view
  of it (mxfp8's bf16), pure-16-bit storage, an int8 weight dequantized;
- grad_output: dL/dy as backward hands it to the Linear (scaled by the loss scale in loss-scaled modes);
- grad_weight: the parameter's .grad once backward has accumulated it (still scaled in loss-scaled
  modes; for a weight tied to another module, the sum of both modules' contributions).

An unsampled step runs with no hook at all: `watch` registers them on entry and removes them on exit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from suite.metrics.fidelity import plain
from suite.modes.format_stats import TensorStats, tensor_stats
from suite.modes.formats import format_unavailable
from suite.records.store import NUMERICS_COLUMNS as COLUMNS
from suite.records.store import NUMERICS_ROLES as ROLES

# on_tensor(layer, role, tensor): called inside the hooks with the live tensor; it must not modify it
OnTensor = Callable[[str, str, torch.Tensor], None]


def linear_layers(model: nn.Module) -> list[str]:
    """The fully qualified names of the model's Linears, in module order (call it on the fp32 model,
    before a mode swaps its Linears for its own modules: the names stay, the classes change)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def stepped_weight(layer: nn.Module) -> torch.Tensor:
    """The weight parameter itself (a leaf the optimizer steps): under a dtype parametrization its original.
    Not `master_weight`, which for torchao's int8 weight is a dequantized copy: a grad hook on that copy never
    fires (it is no leaf), so int8-weight's grad_weight went unseen."""
    return layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, T, features) as (B * T, features), a view; a 2-D tensor as it is."""
    return t.flatten(0, -2) if t.dim() > 2 else t


@contextlib.contextmanager
def watch(model: nn.Module, layers: list[str], on_tensor: OnTensor) -> Iterator[None]:
    """Call `on_tensor` with each named layer's input, weight, grad_output and grad_weight of the steps run
    inside; every hook is removed on exit, exceptions included. Activations and their gradients come as the
    GEMM's 2-D operand, (tokens, features): no statistic changes (rows and blocks run along the last
    dimension), and every format sees a matrix."""
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            on_tensor(name, "input", _tokens(args[0].detach()))
            on_tensor(name, "weight", plain(module.weight))  # as the module presents it to its GEMM
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda g: on_tensor(name, "grad_output", _tokens(g.detach())))

        return hook

    def grad_hook(name: str) -> Callable:
        def hook(param: torch.Tensor) -> None:
            on_tensor(name, "grad_weight", plain(param.grad))

        return hook

    try:
        for name in layers:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(forward_hook(name)))
            weight = stepped_weight(module)
            if weight.requires_grad:
                handles.append(weight.register_post_accumulate_grad_hook(grad_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


STATS: tuple[str, ...] = COLUMNS[4:]  # TensorStats' fields, null in a row whose statistics failed
# A tensor that reaches its hook already representable in its format (a bf16 autocast op's output gradient,
# a 16-bit GEMM's weight gradient, pure-16-bit storage) round-trips exactly: whatever the format cost it was
# lost where it was produced, which the hooks cannot see. Its amax is recorded, its other statistics are null
# rather than "exact" (a non-fp32 tensor of training size is never representable by chance).
ARRIVED = (
    "arrived already in its format (produced in it): the rounding happened before the hook, so only amax is "
    "recorded; `mpbench numerics` measures the format's cost from fp32's tensors"
)
NOT_REQUESTED = "not requested (mpbench run --numerics)"


def default_every(steps: int) -> int:
    """`--numerics` without `--numerics-every`: a quarter of the run (4 samples and the first step), and never
    every step, so that the timed window keeps unsampled steps to time."""
    return max(2, steps // 4)


def sampled_steps(every: int, steps: int) -> list[int]:
    """The 1-based steps `--numerics-every N` samples: the first (initial weights), every N-th, and the last
    (the trained state); none when `every` is 0."""
    if every <= 0:
        return []
    return sorted({1, steps, *range(every, steps + 1, every)})


def timed_steps_left(every: int, steps: int, window: range) -> int:
    """How many steps of `window` (1-based step numbers) stay unsampled, so timed, under `--numerics-every`."""
    return len(set(window) - set(sampled_steps(every, steps)))


class Sampler:
    """Statistics of the watched Linears' four tensors on the sampled steps, each in the format the mode runs
    that layer's role in (`formats[layer][role]`), as the record's columnar `numerics` field.

    A failure here never fails the case: a format that cannot be computed (unknown, unavailable here, not
    written yet), a tensor whose statistics raise, a role the hooks never saw (a hook that did not fire) all
    give rows with null statistics and a line in `numerics_reason`.
    """

    def __init__(self, model: nn.Module, layers: list[str], formats: dict[str, dict[str, str]],
                 steps: list[int], mode_formats: dict[str, str]) -> None:  # fmt: skip
        self.model, self.layers, self.formats = model, layers, formats
        self.steps = frozenset(steps)
        self.mode_formats = mode_formats
        self.sampled: list[int] = []  # the sampled steps that ran (a diverged case stops early)
        self.columns: dict[str, list] = {c: [] for c in COLUMNS}
        self._problems: dict[str, set[str]] = {}  # why -> the roles it hit (one line each in numerics_reason)
        self._blocked: dict[str, str] = {}  # format -> why it cannot be computed here (checked once)
        for fmt in {f for roles in formats.values() for f in roles.values()}:
            try:
                why = format_unavailable(fmt)
            except Exception as exc:  # an unknown name: ValueError naming the choices
                why = f"{type(exc).__name__}: {exc}"
            if why:
                self._blocked[fmt] = f"format {fmt!r} cannot be computed here: {why}"
        self._seen: dict[tuple[str, str], TensorStats | None] = {}

    def wants(self, step: int) -> bool:
        """Whether step `step` (1-based) is sampled."""
        return step in self.steps

    @contextlib.contextmanager
    def sampling(self, step: int) -> Iterator[None]:
        """The hooks around one sampled step; its rows are added when the step is done. Hooks that cannot be
        registered leave the step to run unwatched (its rows null, with why)."""
        self._seen = {}
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(watch(self.model, self.layers, self._on_tensor))
            except Exception as exc:
                self._problem(f"the hooks could not be registered: {type(exc).__name__}: {exc}", "all roles")
            yield
        self._finish(step)

    def _on_tensor(self, layer: str, role: str, tensor: torch.Tensor) -> None:
        if (layer, role) in self._seen:  # a Linear called twice in one step: its first call is recorded
            self._problem("a layer ran more than once in a step; its first call's tensors are recorded", role)
            return
        fmt = self.formats[layer][role]
        self._seen[(layer, role)] = None
        if fmt in self._blocked:
            self._problem(self._blocked[fmt], role)
            return
        try:
            stats = _stats(tensor, fmt)
        except Exception as exc:  # NotImplementedError of a format not written yet, or anything else
            self._problem(f"tensor_stats in format {fmt!r} failed: {type(exc).__name__}: {exc}", role)
            return
        if fmt != "fp32" and stats.sqnr_db == math.inf:  # see ARRIVED: "exact" would read as good news
            stats = TensorStats(stats.amax, None, None, None, stats.scale)
            self._problem(ARRIVED, role)
        self._seen[(layer, role)] = stats

    def _finish(self, step: int) -> None:
        self.sampled.append(step)
        for layer in self.layers:
            for role in ROLES:
                if (layer, role) not in self._seen:
                    self._problem("the hooks never saw this role (its hook did not fire)", role)
                stats = self._seen.get((layer, role))
                row = dict(step=step, layer=layer, role=role, format=self.formats[layer][role])
                row |= {k: getattr(stats, k) for k in STATS} if stats else dict.fromkeys(STATS)
                for column, value in row.items():
                    self.columns[column].append(value)

    def _problem(self, why: str, role: str) -> None:
        self._problems.setdefault(why, set()).add(role)

    def fields(self) -> dict[str, object]:
        """The record's numerics fields."""
        reason = "; ".join(f"{why} ({', '.join(sorted(roles))})" for why, roles in self._problems.items())
        return {
            "numerics": self.columns if self.sampled else None,
            "numerics_steps": list(self.sampled),
            "numerics_formats": dict(self.mode_formats),
            "numerics_reason": reason or (None if self.sampled else "no sampled step ran"),
        }


def _stats(tensor: torch.Tensor, fmt: str) -> TensorStats:
    """`tensor_stats` isolated from the step it runs inside: no autograd graph, no autocast (a hook inside the
    forward runs under the mode's autocast), and the global random generators put back as they were (a format
    that draws random numbers must not move the stream that int8-weight's stochastic rounding draws from)."""
    devices = [tensor.device] if tensor.device.type != "cpu" else []
    with (
        torch.no_grad(),
        torch.autocast(tensor.device.type, enabled=False),
        torch.random.fork_rng(devices=devices, device_type=tensor.device.type if devices else "cuda"),
    ):
        return tensor_stats(tensor, fmt)
