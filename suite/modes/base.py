"""What every precision mode is: one small class with a few hooks.

The train loop calls, in order: `unavailable_reason` (skip?), `numerics()` around the whole
case (global flags, restored after), `prepare(model)`, `make_optimizer(model, ...)`, then
per step `forward_context()` around forward + loss and `backward_and_step(loss, opt)`.
The loop never branches on a mode's name.

Emulation: a mode whose kernels this device lacks (fp8 on a CPU or an Ampere GPU) may still
run with torchao's emulated kernels: its numerics and convergence are real, its step time
is not a speed. `emulation_reason` says why a mode would be emulated here; `decide` turns
that into skip-or-run: on a CPU such modes run emulated by default (the only way to run
them there), on a GPU below the mode's capability they are skipped unless the case asks
for `emulate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from suite.hardware import DeviceInfo
from suite.modes.optimizer import adamw

ADAM_BETAS = (0.9, 0.95)  # GPT-2 / nanoGPT
# --grad-comm names -> the dtype gradients are communicated in
COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FsdpPlan:
    """How FSDP2 (`fully_shard`) shards a mode: its MixedPrecisionPolicy dtypes, or why it can't."""

    param_dtype: torch.dtype | None = None  # all-gather and compute dtype; None: as stored
    reduce_dtype: torch.dtype | None = None  # reduce-scatter dtype; None: the gradients' own
    unavailable: str | None = None  # set: the mode is skipped under FSDP with this reason


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (Linear weights, embeddings) decay; biases and norm gains don't."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, gradient or state; a plain tensor as it is.
    Code that makes its own tensors (noise, flags) must work on these: DTensor + plain tensor raises."""
    return t.to_local() if hasattr(t, "to_local") else t


def needs_capability(device: DeviceInfo, minimum: tuple[int, int], what: str) -> str | None:
    """Reason a CUDA-only feature can't run on `device`, or None if it can."""
    if device.type != "cuda":
        return (
            f"{what} needs a CUDA GPU with compute capability {minimum[0]}.{minimum[1]}+; this device is {device.type}"
        )
    if device.capability is None or device.capability < minimum:
        have = ".".join(map(str, device.capability or ("?",)))
        return f"{what} needs compute capability {minimum[0]}.{minimum[1]}; this GPU ({device.name}) is {have}"
    return None


def needs_emulation(device: DeviceInfo, minimum: tuple[int, int], what: str) -> str | None:
    """Why `what` has no native kernels on `device` (so it would be emulated), or None."""
    if device.type != "cuda":
        return f"{what}: no {device.type} kernels"
    if device.capability is None or device.capability < minimum:
        have = ".".join(map(str, device.capability or ("?",)))
        need = f"{minimum[0]}.{minimum[1]}"
        return f"{what}: real kernels need compute capability {need}; this GPU ({device.name}) is {have}"
    return None


# what an emulated case's reason ends with: decide's for a mode the device has no kernels for, and a mode's own for a
# case that left its native kernels (nvfp4)
EMULATED = "runs emulated (numerics real; step time is not a speed, mfu and speed-up are null)"


def decide(mode: type[PrecisionMode], device: DeviceInfo, emulate: bool) -> tuple[str | None, str | None]:
    """(skip reason, emulated reason) for running `mode` on `device`; at most one is set.

    CPU: emulated by default. GPU below the mode's capability: skipped unless `emulate`.
    """
    skip = mode.unavailable_reason(device)
    if skip:
        return skip, None
    why = mode.emulation_reason(device)
    if why is None:
        return None, None
    if device.type == "cuda" and not emulate:
        return f"{why}; --emulate runs it with emulated kernels (numerics only)", None
    return None, f"{why}: {EMULATED}"


# TF32 has two generations of flags in torch >= 2.9: the legacy ones (`torch.backends.cuda.matmul.allow_tf32`,
# `torch.backends.cudnn.allow_tf32`, `torch.set_float32_matmul_precision`) and per-backend `fp32_precision`
# settings. Setting only a new one leaves the legacy matmul precision behind, and reading that one then raises
# ("mix of the legacy and new APIs", pytorch/pytorch#166387), which Inductor does when it picks a CUDA matmul
# (select_algorithm, codecache). The legacy setters write both generations (torch 2.11 and 2.13: the same
# Python in torch/backends, the same checks in ATen's Context), so TF32 is set through them; only oneDNN's CPU
# matmul flag, which no legacy setter owns alone, is set through the new API, to a value the legacy reader accepts.
_NEW_PRECISION_API = hasattr(torch.backends, "fp32_precision")
_NEW_FLAGS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul")  # what the setters below touch


def _new_flag(name: str) -> object:
    """The settings object of one new-API flag, e.g. torch.backends.cudnn.conv for "cudnn.conv"."""
    backend, op = name.split(".")
    return getattr(getattr(torch.backends, backend), op)


def _readable(read: Callable[[], object]) -> object:
    """A legacy flag's value, or "unreadable: ..." where torch refuses to read it (mixed APIs)."""
    try:
        return read()
    except RuntimeError as exc:
        return f"unreadable: {str(exc)[:60]}"


def fp32_precision_state() -> dict[str, object]:
    """Every setting that decides how fp32 matmuls and convs run, both generations, by name."""
    state = {
        "float32_matmul_precision": _readable(torch.get_float32_matmul_precision),
        "cuda.matmul.allow_tf32": _readable(lambda: torch.backends.cuda.matmul.allow_tf32),
        "cudnn.allow_tf32": _readable(lambda: torch.backends.cudnn.allow_tf32),
    }
    if _NEW_PRECISION_API:
        state |= {name: _new_flag(name).fp32_precision for name in _NEW_FLAGS}
    return state


def tf32_enabled() -> bool:
    """Whether CUDA fp32 matmuls may run in TF32 right now."""
    if _NEW_PRECISION_API:
        return _new_flag("cuda.matmul").fp32_precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Set TF32 on or off for CUDA matmuls and cuDNN convs (CPU matmuls: strict fp32), both generations of
    flags agreeing, then restore the caller's settings exactly."""
    saved = fp32_precision_state()
    try:
        torch.backends.cuda.matmul.allow_tf32 = enabled  # legacy matmul precision and cuda.matmul together
        torch.backends.cudnn.allow_tf32 = enabled  # legacy cuDNN flag and cudnn.conv, cudnn.rnn together
        if _NEW_PRECISION_API:
            _new_flag("mkldnn.matmul").fp32_precision = "ieee"  # oneDNN (CPU) matmuls: full fp32, always
        yield
    finally:
        _restore(saved)


def _restore(saved: dict[str, object]) -> None:
    """Put back what `fp32_precision_state` read: the legacy flags first (their setters write the new ones
    too), then the new flags exactly. A legacy value the caller had made unreadable is left consistent."""
    legacy = saved["float32_matmul_precision"]
    if not str(legacy).startswith("unreadable"):
        torch.set_float32_matmul_precision(legacy)
    if isinstance(saved["cudnn.allow_tf32"], bool):
        torch.backends.cudnn.allow_tf32 = saved["cudnn.allow_tf32"]
    for name in _NEW_FLAGS if _NEW_PRECISION_API else ():
        _new_flag(name).fp32_precision = saved[name]


# torch dtype -> the format (suite.modes.formats) of a plain cast to it
CAST_FORMATS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def cast_formats(dtype: torch.dtype) -> dict[str, str]:
    """Every role of a plain Linear whose GEMMs run in `dtype` (autocast, or weights stored in it): its
    operands are cast to it, and its weight-gradient GEMM returns it (autocast's cast back to an fp32
    master's .grad comes after)."""
    return dict.fromkeys(("input", "weight", "grad_output", "grad_weight"), CAST_FORMATS[dtype])


class PrecisionMode:
    """Base: strict fp32 semantics. Subclasses override only what differs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `mpbench modes`
    needs: ClassVar[str] = "any device"
    allow_tf32: ClassVar[bool] = False  # every mode states TF32 explicitly
    no_data_parallel: ClassVar[str | None] = None  # why DistributedDataParallel cannot wrap it
    # why FSDP2 cannot shard it, after the mode's name; opt-in: a mode is sharded under
    # --parallel fsdp only once it says how (None, and fsdp_param_dtype)
    no_fsdp: ClassVar[str | None] = "has not been checked under FSDP2; run it with --parallel ddp or --nproc 1"
    fsdp_param_dtype: ClassVar[torch.dtype | None] = None  # FSDP's param_dtype; None: as stored
    adam_eps: ClassVar[float] = 1e-8
    cpu_default: ClassVar[bool] = True  # in `mpbench run`'s default CPU matrix (it must fit in 60 s)

    def __init__(self, device: DeviceInfo) -> None:
        self.device = device
        # "fp32" | "tf32" | "fp16" | "bf16": the dtype its matmuls run in, i.e. which
        # peak FLOP/s the mode is measured against.
        self.compute: str = "tf32" if self.allow_tf32 else "fp32"
        self.autocast_dtype: torch.dtype | None = None  # forward under torch.autocast

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo) -> str | None:
        """Why this mode cannot run on `device`; None when it can."""
        return None

    @classmethod
    def emulation_reason(cls, device: DeviceInfo) -> str | None:
        """Why this mode would run emulated on `device`; None when its kernels are native."""
        return None

    def configure(self, keep_high: str, fp4_recipe: str) -> None:
        """Before `prepare`: the case's layer policy and 4-bit recipe, resolved (suite/policy.py; "" where the
        mode takes none). The modes that take them keep them; the others have nothing to keep high."""

    def numerics(self) -> contextlib.AbstractContextManager:
        """Globals for the whole case (TF32 flags); restored on exit."""
        return tf32_matmuls(self.allow_tf32)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Convert the fp32 model (already on the device) to the mode's storage."""
        return model

    def layer_fields(self) -> dict[str, list[str]]:
        """After `prepare`: which layers the mode converted and which it kept, for the record."""
        return {}

    def tensor_formats(self, layer: str | None = None) -> dict[str, str]:
        """The format (suite.modes.formats) each role of a converted Linear is in when this mode runs it:
        input, weight and grad_output are GEMM operands; grad_weight is the weight-gradient GEMM's result.
        `layer` (a Linear's fqn, after `prepare`): that Linear's formats, for a mode that converts only some
        (the others run as plain Linears in its forward context); None: a converted Linear's."""
        operand = "tf32" if self.allow_tf32 else "fp32"
        return {"input": operand, "weight": operand, "grad_output": operand, "grad_weight": "fp32"}

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """torch AdamW, fused where every parameter of a group allows it on this device (suite.modes.optimizer);
        the record's `optimizer_impl` says which implementation the built optimizer runs."""
        groups = decay_groups(model, weight_decay)
        fused = self.no_fused_adamw() is None
        return adamw(groups, self.device, lr=lr, betas=ADAM_BETAS, eps=self.adam_eps, fused=fused)

    def no_fused_adamw(self) -> str | None:
        """Why this mode, as set up now (after `use_fsdp`), must not use torch's fused AdamW; None: it may."""
        return None

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate in strict fp32 (held-out loss); fp32-master modes use it as is."""
        return model

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool | torch.Tensor:
        """Backward and optimizer step; False when the step was skipped (loss-scale overflow). A mode
        may return a 0-dim bool tensor instead, so that knowing costs no host sync in the step."""
        loss.backward()
        optimizer.step()
        return True

    @property
    def loss_scale(self) -> float | torch.Tensor | None:
        """Current loss scale (a float or a 0-dim device tensor: read it outside timed code), None
        for modes without loss scaling."""
        return None

    @classmethod
    def fsdp_plan(cls, grad_comm: str = "fp32") -> FsdpPlan:
        """FSDP2's policy for this mode: parameters gathered in `fsdp_param_dtype` (None: as
        stored), gradients reduced in --grad-comm's dtype; with the default fp32 that is fp32
        under a low param dtype (FSDP's usual recipe) and otherwise the gradients' own dtype,
        as DDP does."""
        if cls.no_fsdp:
            return FsdpPlan(unavailable=f"{cls.name} {cls.no_fsdp}")
        if grad_comm != "fp32":
            reduce = COMM_DTYPES[grad_comm]
        else:
            reduce = torch.float32 if cls.fsdp_param_dtype is not None else None
        return FsdpPlan(param_dtype=cls.fsdp_param_dtype, reduce_dtype=reduce)

    def use_fsdp(self, plan: FsdpPlan) -> None:
        """Called once FSDP2 has sharded the model with `plan`. A param dtype replaces autocast:
        FSDP casts per module (low-precision activations and residual stream), as torchtitan
        does, rather than per op."""
        if plan.param_dtype is not None:
            self.autocast_dtype = None
