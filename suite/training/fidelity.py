"""A mode's train step against a float64 reference step from the same weights and batch.

The mode's step is THE train step (`train.train_step`), watched from outside: an optimizer
step pre-hook copies the gradients the optimizer is about to apply (after any loss-scale
unscaling), post-accumulate-grad hooks copy them as backward left them (still scaled, for
loss-scaled modes), and the weights before and after give the update. A step skipped by
loss scaling has no applied gradient and no update: it is recorded as skipped.

The reference is a float64 deep copy of the same GPT, taken before the mode converts it
(so no autocast, no fp8 or int8 module, nothing of the mode), loaded before each step with
the mode's own weights (16-bit ones upcast, int8 ones dequantized), run with TF32 off, the
math SDPA and the loss in float64, and stepped by a float64 torch AdamW with the case's
hyper-parameters (lr, betas, weight decay, the mode's eps) and, from step 2 on, the mode's
AdamW state. Where one float64 pass over the whole batch would not fit, the reference runs
it in slices of rows and sums their gradients: every row is still compared.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from models import GPT, GPTConfig
from suite.hardware import DeviceInfo, available_ram, on_device
from suite.metrics.fidelity import F64, Comparison, Diff, fraction, json_number, lost, plain
from suite.modes import PrecisionMode, build_mode
from suite.modes.base import ADAM_BETAS, decay_groups, tf32_matmuls
from suite.training.case import Case
from suite.training.train import train_step

# Bytes per parameter while both models live: the mode's (fp32 weight, grad, two AdamW
# moments: 16), the float64 copy's (the same in float64: 32), and what is captured per step
# (weights before, gradients applied and as backward left them: up to 12).
BYTES_PER_PARAM = 60
# The float64 reference's activations, in float64 elements per token (measured on the CPU, see
# `reference_bytes`): per block, what autograd keeps besides attention (input, LayerNorm outputs,
# q/k/v and their scaled copies, attention output, MLP hidden before and after GELU: 11-15 x C
# measured); the math SDPA's softmax output (nh, T) per block, plus two more of one block while its
# backward runs; at the head, the logits, their log-softmax and both gradients (4 x V), and ln_f (2 x C).
PER_BLOCK_C, ATTENTION_EXTRA, HEAD_V = 16, 2, 4
# The share of the memory the plan may fill: the CUDA context, cuBLAS workspaces and the caching
# allocator's rounding and fragmentation take the rest (on a CPU: other processes may grow).
FIT_SHARE = 0.85
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class ReferencePlan:
    """How the float64 reference runs the batch: `passes` slices of about `rows` rows, gradients summed."""

    passes: int
    rows: int
    need_bytes: int  # both models' state and one pass's activations (the estimate)
    have_bytes: int


@dataclass
class StepFidelity:
    """One compared step: the mode's against the float64 reference's, global and per tensor."""

    step: int
    stepped: bool  # False: loss scaling skipped it (inf/NaN in the scaled gradients)
    loss: float
    ref_loss: float
    loss_scale: float | None  # the scale this step used; None without loss scaling
    grad: Diff | None  # None when skipped
    update: Diff | None  # None when skipped, or when the mode's optimizer state is unreadable
    applied: tuple[float, float] | None  # (underflow, overflow) fractions of the applied grads
    backward: tuple[float, float]  # the same of the grads as backward left them (scaled)
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None  # why grad or update is None
    ref_passes: int = 1  # slices of the batch the float64 step ran in (every row compared)


def available_bytes(device: DeviceInfo) -> tuple[int, str]:
    """Memory for the comparison, and what it is: the GPU's total memory, or available RAM.

    On a GPU the total, not the free memory: reading free memory creates a CUDA context in the
    process asking (the parent of `mpbench run`), which would then hold GPU memory all run long.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index).total_memory, f"the memory of {device.name}"
    ram = available_ram()
    if ram is not None:
        return ram, "available RAM"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"


def reference_bytes(cfg: GPTConfig, rows: int, seq_len: int) -> int:
    """Peak bytes of the float64 reference's activations for `rows` rows of `seq_len` tokens.

    The math SDPA is the one float64 attention CUDA has, and the reference runs it on every device,
    so its (rows, nh, T, T) attention matrices are counted. Against the step's peak RSS above the
    weights and AdamW state on a CPU (docs/convergence-and-fidelity.md): tiny 8 x 128 measured 58 MiB, estimated 66
    (+4 of gradients); gpt2-small 2 x 512 measured 3,311 MiB, estimated 3,406 (+949 of gradients).
    """
    T, C, L, nh = seq_len, cfg.n_embd, cfg.n_layer, cfg.n_head
    per_token = L * (PER_BLOCK_C * C + nh * T) + ATTENTION_EXTRA * nh * T + HEAD_V * cfg.padded_vocab_size + 2 * C
    return 8 * rows * T * per_token  # float64


def check_fits(case: Case, device: DeviceInfo) -> ReferencePlan:
    """How the float64 reference will run the case's batch; ValueError naming the field to change when
    even one row per pass cannot fit beside the mode's model and its float64 copy."""
    with torch.device("meta"):
        params = GPT(case.model_config).num_params()
    state = params * BYTES_PER_PARAM
    have, what = available_bytes(device)
    room = int(have * FIT_SHARE) - state
    per_row = reference_bytes(case.model_config, 1, case.seq_len)
    if room < per_row:
        need = state + per_row
        raise ValueError(
            f"model={case.model!r}, seq_len={case.seq_len}: the fidelity check holds the mode's model and a "
            f"float64 copy ({params:,} parameters x {BYTES_PER_PARAM} B) and runs the float64 step at least one "
            f"row at a time ({per_row / 2**30:.2f} GiB of activations per row), about {need / 2**30:.1f} GiB, "
            f"but {FIT_SHARE:.0%} of {what} is {have * FIT_SHARE / 2**30:.1f} GiB; use a smaller --model or "
            "--seq-len, or another --device"
        )
    passes = math.ceil(case.batch_size / (room // per_row))
    rows = math.ceil(case.batch_size / passes)
    return ReferencePlan(passes, rows, state + reference_bytes(case.model_config, rows, case.seq_len), have)


def _load_adam_state(opt: torch.optim.Optimizer, params: dict, ref_opt: torch.optim.Optimizer, ref: dict) -> str | None:
    """Give the float64 AdamW the mode's moments and step count; why not, if it can't read them."""
    for name, p in params.items():
        state = opt.state.get(p)
        if not state:
            continue
        if not set(ADAM_STATE) <= set(state):
            return f"the mode's optimizer state ({', '.join(sorted(state))}) is not AdamW's {'/'.join(ADAM_STATE)}"
        ref_opt.state[ref[name]] = {
            "step": torch.tensor(float(state["step"]), dtype=torch.float32),  # where torch AdamW keeps it
            "exp_avg": plain(state["exp_avg"]).to(F64).clone(),
            "exp_avg_sq": plain(state["exp_avg_sq"]).to(F64).clone(),
        }
    return None


def _reference_step(ref: nn.Module, ref_opt: torch.optim.Optimizer, batch: torch.Tensor,
                    passes: int = 1) -> tuple[float, dict]:  # fmt: skip
    """The float64 step: not `train_step`, whose fp32 loss would round the reference. The batch's
    mean loss is the sum of each slice's token losses over all tokens, so the gradients the
    slices' backward passes accumulate are the whole batch's."""
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
    tokens, loss_sum = y.numel(), 0.0
    ref_opt.zero_grad(set_to_none=True)
    with tf32_matmuls(False), torch.autocast(batch.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        for xs, ys in zip(x.tensor_split(passes), y.tensor_split(passes), strict=True):
            logits = ref(xs)  # (rows, T, V) float64
            loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum") / tokens
            loss.backward()
            loss_sum += loss.item()
            del logits, loss  # before the next slice's forward
        ref_opt.step()  # AdamW reads the grads, never writes them
    return loss_sum, {n: p.grad for n, p in ref.named_parameters()}


class _Watch(contextlib.AbstractContextManager):
    """Copies of the gradients the optimizer applies (pre-hook) and, if scaled, as backward left them."""

    def __init__(self, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, scaled: bool) -> None:
        self.applied: dict[str, torch.Tensor] = {}
        self.backward: dict[str, torch.Tensor] = {}
        self.params = params
        self.handles = [opt.register_step_pre_hook(self._pre_step)]
        if scaled:
            for name, p in params.items():
                self.handles.append(p.register_post_accumulate_grad_hook(self._accumulated(name)))

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self.applied:  # a mode steps once; the first call is the step
            self.applied = {n: plain(p.grad).clone() for n, p in self.params.items() if p.grad is not None}

    def _accumulated(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self.backward[name] = plain(p.grad).clone()

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _compare_step(k: int, mode: PrecisionMode, model: nn.Module, opt: torch.optim.Optimizer, ref: nn.Module,
                  ref_opt: torch.optim.Optimizer, batch: torch.Tensor, passes: int) -> StepFidelity:  # fmt: skip
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    before = {n: plain(p).clone() for n, p in params.items()}
    with torch.no_grad():
        for n, rp in ref_params.items():
            rp.copy_(before[n])  # the mode's weights, upcast exactly to float64
    note = _load_adam_state(opt, params, ref_opt, ref_params) if k > 1 else None
    scale = None if mode.loss_scale is None else float(mode.loss_scale)  # the scale this step uses
    with _Watch(params, opt, scaled=scale is not None) as watch:
        loss, stepped = train_step(model, mode, opt, batch)
    stepped = bool(stepped)  # may be a 0-dim device tensor
    if stepped and not watch.applied:
        raise RuntimeError(f"{type(opt).__name__}'s step pre-hook never ran: the applied gradients are unknown")
    left = {n: plain(p.grad) for n, p in params.items() if p.grad is not None}
    backward = watch.backward if scale is not None else (watch.applied or left)
    ref_loss, ref_grads = _reference_step(ref, ref_opt, batch, passes)
    grads, updates = Comparison(), Comparison()
    rows, lost_applied, lost_backward = [], [], []
    with torch.no_grad():
        for n, p in params.items():
            r = ref_grads[n]
            zeros = torch.zeros_like(r)
            lb = lost(backward.get(n, zeros), r)
            lost_backward.append(lb)
            row: dict[str, Any] = {"step": k, "tensor": n, "numel": r.numel()}
            if stepped:
                g = watch.applied.get(n, zeros)
                la = lost(g, r)
                lost_applied.append(la)
                dg = grads.add(g, r)
                row |= {"grad_cos": dg.cos, "grad_rel_err": dg.rel_err, "grad_max_abs_err": dg.max_abs_err,
                        "grad_underflow_frac": la.underflow / la.numel,
                        "grad_overflow_frac": la.overflow / la.numel}  # fmt: skip
                if note is None:
                    du = updates.add(plain(p).to(F64) - before[n].to(F64), ref_params[n].detach() - before[n].to(F64))
                    row |= {"update_cos": du.cos, "update_rel_err": du.rel_err, "update_max_abs_err": du.max_abs_err}
            row |= {"scaled_grad_underflow_frac": lb.underflow / lb.numel,
                    "scaled_grad_overflow_frac": lb.overflow / lb.numel}  # fmt: skip
            rows.append({key: json_number(v) for key, v in row.items()})
    if not stepped:
        by = f"inf/NaN in the gradients scaled by {scale:g}" if scale is not None else "the mode skipped it"
        note = f"step {k} was skipped by loss scaling ({by}): no gradient or update to compare"
    elif note:
        note = f"no update compared at step {k}: {note}"
    return StepFidelity(
        step=k, stepped=stepped, loss=float(loss), ref_loss=ref_loss, loss_scale=scale,
        grad=grads.total() if stepped else None, update=updates.total() if stepped and updates.count else None,
        applied=fraction(lost_applied) if stepped else None, backward=fraction(lost_backward), rows=rows, note=note,
        ref_passes=passes,
    )  # fmt: skip


def measure(case: Case, device: DeviceInfo, batches: torch.Tensor) -> list[StepFidelity]:
    """Compare the mode's first len(batches) steps (K, B, T+1) from the case's seed with float64 ones."""
    plan = check_fits(case, device)  # in slices of rows where the whole batch's float64 step would not fit
    mode = build_mode(case.mode, device, case.keep_high, case.fp4_recipe)
    dev = device.torch_device
    model = GPT(case.model_config, seed=case.seed)  # the fp32 model every mode starts from
    out = []
    with on_device(dev), mode.numerics():  # CUDA calls that default to the current device land on the case's GPU
        ref = copy.deepcopy(model).to(dev, F64)  # before the mode converts it; keeps the weight tying
        model = mode.prepare(model.to(dev))
        opt = mode.make_optimizer(model, case.learning_rate, case.weight_decay)
        ref_opt = torch.optim.AdamW(decay_groups(ref, case.weight_decay), lr=case.learning_rate, betas=ADAM_BETAS,
                                    eps=mode.adam_eps)  # fmt: skip
        names, ref_names = [n for n, _ in model.named_parameters()], [n for n, _ in ref.named_parameters()]
        if names != ref_names:
            raise RuntimeError(f"{case.mode} renamed the parameters ({set(names) ^ set(ref_names)}): cannot pair them")
        for k, batch in enumerate(batches, start=1):
            out.append(_compare_step(k, mode, model, opt, ref, ref_opt, batch.to(dev), plan.passes))
    return out


def _global(s: StepFidelity) -> dict[str, Any]:
    """The flat figures of one compared step, under their record names."""
    g, u = s.grad, s.update
    return {
        "grad_cos_vs_fp64": g and g.cos, "grad_rel_err_vs_fp64": g and g.rel_err,
        "grad_max_abs_err_vs_fp64": g and g.max_abs_err, "update_cos_vs_fp64": u and u.cos,
        "update_rel_err_vs_fp64": u and u.rel_err, "update_max_abs_err_vs_fp64": u and u.max_abs_err,
        "grad_underflow_frac": s.applied and s.applied[0], "grad_overflow_frac": s.applied and s.applied[1],
        "scaled_grad_underflow_frac": s.backward[0], "scaled_grad_overflow_frac": s.backward[1],
        "fidelity_loss_diff": s.loss - s.ref_loss, "fidelity_loss_scale": s.loss_scale,
    }  # fmt: skip


def record_fields(steps: list[StepFidelity]) -> dict[str, Any]:
    """Record values: the flat figures of the last compared step, every step's, every tensor's."""
    last = steps[-1]
    return {
        **_global(last),
        "fidelity_steps": [
            {
                "step": s.step,
                "stepped": s.stepped,
                "loss": s.loss,
                "ref_loss": s.ref_loss,
                **{k: json_number(v) for k, v in _global(s).items()},
            }
            for s in steps
        ],  # fmt: skip
        "fidelity_layers": [row for s in steps for row in s.rows],
        "fidelity_reason": last.note,
        "fidelity_ref_passes": last.ref_passes,
    }
