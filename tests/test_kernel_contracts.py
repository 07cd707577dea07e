"""The GPU kernels' contracts, checked on a CPU at every converted layer, forward and backward, for every mode.

No GPU runs here, and the CPU fallbacks of the 8-bit kernels accept what their CUDA versions refuse. So the
tests wrap the points where torchao hands operands to a GPU kernel and check what that kernel would demand
(read in torchao 0.18 and torch 2.11/2.13; each rule names its source), under the autocast the mode uses on a
GPU. Every mode in the registry is run, so a new mode is covered the day it is added: one that converts layers
must reach a checked kernel boundary from each of them, or the count fails and asks for a spy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import GPT, GPTConfig
from suite.hardware import DeviceInfo
from suite.modes import MODES, get_mode
from suite.training.train import evaluate

CPU = DeviceInfo("cpu", "test cpu")
B200 = DeviceInfo("cuda", "NVIDIA B200", (10, 0))  # every mode is native here: its GPU dtype flow
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# kernel boundary -> checked calls per converted layer (forward, backward)
PER_LAYER = {"int8": (1, 2), "fp8": (1, 2), "mxfp8": (1, 1), "fp4": (1, 1)}


class KernelSpies:
    """Wraps torchao's kernel entry points; records (boundary, phase) per call and every broken rule."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from torchao.float8 import float8_linear, float8_ops
        from torchao.prototype.moe_training import mxfp8_linear
        from torchao.prototype.quantized_training import int8_mixed_precision

        from suite.modes import fp4_linear

        self.calls: list[tuple[str, str]] = []
        self.broken: list[str] = []
        self.phase = "forward"  # the test says which: grad mode is off inside autograd Functions either way
        for module, name, spy in (
            (int8_mixed_precision, "scaled_int8_mm", self._int8),
            (float8_ops, "preprocess_addmm", self._fp8),
            (mxfp8_linear, "_to_mxfp8_then_scaled_mm", self._mxfp8),
            (fp4_linear, "_fp4_matmul", self._fp4),
        ):
            monkeypatch.setattr(module, name, spy(getattr(module, name)))
        monkeypatch.setattr(float8_linear, "matmul_with_hp_or_float8_args", self._fp8_entry(float8_linear))

    def rule(self, ok: bool, text: str) -> None:
        if not ok:
            self.broken.append(f"{self.phase}: {text}")

    def count(self, boundary: str, phase: str) -> int:
        return sum(call == (boundary, phase) for call in self.calls)

    def _int8(self, real):
        def scaled_int8_mm(A, B, row_scale, col_scale):
            # torchao int8_mm.py, the Triton kernel always used on CUDA: its asserts
            self.rule(A.dtype is torch.int8 and B.dtype is torch.int8, "int8 operands")
            self.rule(row_scale.dtype is col_scale.dtype, f"scale dtypes {row_scale.dtype} vs {col_scale.dtype}")
            self.rule(row_scale.is_contiguous() and col_scale.is_contiguous(), "contiguous scales")
            # torch._int_mm on CUDA (aten Blas.cpp): M > 16, K and N multiples of 8
            (M, K), N = A.shape, B.shape[1]
            self.rule(M > 16 and K % 8 == 0 and N % 8 == 0, f"_int_mm shape {M} x {K} x {N}")
            self.calls.append(("int8", self.phase))
            return real(A, B, row_scale, col_scale)

        return scaled_int8_mm

    def _fp8(self, real):
        def preprocess_addmm(a, b):
            a_data, a_scale, b_data, b_scale = out = real(a, b)  # exactly what torch._scaled_mm is handed
            # torch._scaled_mm on CUDA (aten Blas.cpp): fp8 operands, not both e5m2; mat1 row-major, mat2
            # column-major; mat1's columns and both dimensions of mat2 multiples of 16; fp32 scales
            self.rule(a_data.dtype in FP8 and b_data.dtype in FP8, "fp8 operands")
            self.rule(not a_data.dtype == b_data.dtype == torch.float8_e5m2, "not both e5m2")
            self.rule(a_data.stride(1) == 1 and b_data.stride(0) == 1, "row-major mat1, column-major mat2")
            (M, K), N = a_data.shape, b_data.shape[1]
            self.rule(K % 16 == 0 and N % 16 == 0, f"_scaled_mm shape {M} x {K} x {N}: multiples of 16")
            self.rule(a_scale.dtype == b_scale.dtype == torch.float32, "fp32 scales")
            # torchao's Float8Linear casts its input to the autocast dtype under CUDA autocast: on a GPU every
            # fp8 matmul's high-precision side (input, output, output gradient) is bf16
            self.rule(a._orig_dtype is torch.bfloat16, f"high-precision dtype {a._orig_dtype}, bf16 on a GPU")
            self.calls.append(("fp8", self.phase))
            return out

        return preprocess_addmm

    def _fp8_entry(self, float8_linear):
        real = float8_linear.matmul_with_hp_or_float8_args
        spies = self

        class Entry:  # Float8Linear.forward calls `matmul_with_hp_or_float8_args.apply(input, weight_t, ...)`
            @staticmethod
            def apply(input_hp, *args):
                # under CUDA autocast Float8Linear hands it a bf16 input (float8_linear.py, forward): a CPU run
                # must too, or its fp8 scales come from other values than the GPU's
                spies.rule(input_hp.dtype is torch.bfloat16, f"Float8Linear input {input_hp.dtype}, bf16 on a GPU")
                return real.apply(input_hp, *args)

        return Entry

    def _mx_operand(self, t: torch.Tensor, what: str) -> None:
        # torchao mx_formats/kernels.py triton_to_mxfp8_dim0: bf16 only, contiguous; csrc mxfp8_extension.cpp
        # (dim1): 2-D, contiguous, both dimensions multiples of 32 (the operand is viewed as 2-D first)
        rows, cols = t.reshape(-1, t.shape[-1]).shape
        self.rule(t.dtype is torch.bfloat16, f"{what} dtype {t.dtype}: the MXFP8 Triton cast takes bf16 only")
        self.rule(t.is_contiguous(), f"{what} contiguous")
        self.rule(rows % 32 == 0 and cols % 32 == 0, f"{what} {rows} x {cols}: multiples of 32")

    def _mxfp8(self, real):
        def to_mxfp8_then_scaled_mm(input_hp, weight_hp, *args, **kwargs):
            self._mx_operand(input_hp, "input")
            self._mx_operand(weight_hp, "weight")
            self.calls.append(("mxfp8", self.phase))
            out = real(input_hp, weight_hp, *args, **kwargs)
            if out.requires_grad:

                def check_grad(grad: torch.Tensor) -> None:
                    self._mx_operand(grad.contiguous(), "output gradient")  # torchao makes it contiguous
                    self.calls.append(("mxfp8", self.phase))

                out.register_hook(check_grad)
            return out

        return to_mxfp8_then_scaled_mm

    def _fp4(self, real):
        # the 4-bit modes' emulated GEMMs (FP4Linear, on a CPU and on a GPU without native kernels): bf16 autocast's
        # dtype flow, 2-D bf16 operands and a bf16 output gradient, as torchao's NVFP4 Triton casts take on a
        # Blackwell GPU (that path's own contract: tests/test_modes_fp4.py, on a fake B200)
        def fp4_matmul(x, w, *args):
            self.rule(x.dtype is w.dtype is torch.bfloat16 and x.dim() == w.dim() == 2, f"fp4 operands {x.dtype}")
            self.calls.append(("fp4", self.phase))
            out = real(x, w, *args)
            if out.requires_grad:

                def check_grad(grad: torch.Tensor) -> None:
                    self.rule(grad.dtype is torch.bfloat16, f"fp4 output gradient {grad.dtype}")
                    self.calls.append(("fp4", self.phase))

                out.register_hook(check_grad)
            return out

        return fp4_matmul


class MatmulDtypes(TorchDispatchMode):
    """Dtypes of the floating inputs of every matmul-like op, and any 8-bit kernel called at all."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if "mm" in name or "scaled_dot_product" in name:
            for a in args:
                if torch.is_tensor(a) and (a.is_floating_point() or a.dtype is torch.int8):
                    self.seen.add((name.split(".")[0], str(a.dtype).removeprefix("torch.")))
        return func(*args, **(kwargs or {}))


def _cpu_mode(name: str):
    cls = get_mode(name)
    if reason := cls.unavailable_reason(CPU):
        pytest.skip(f"{name} cannot run on a CPU: {reason}")
    return cls(CPU)


CFG = GPTConfig.preset("tiny")
BATCH = torch.randint(0, CFG.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))  # 64 tokens


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")  # amp-fp16 built for a fake GPU
@pytest.mark.parametrize("name", list(MODES))
def test_cpu_takes_the_gpu_dtype_flow(name):
    """Part 2.2 of issue 20: where a mode autocasts on a GPU it autocasts on a CPU, in the same dtype, and
    its matmuls are measured against the same dtype."""
    cls = get_mode(name)
    cpu, gpu = cls(CPU), cls(B200)
    assert (cpu.autocast_dtype, cpu.compute) == (gpu.autocast_dtype, gpu.compute)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
@pytest.mark.parametrize("name", list(MODES))
def test_gpu_kernel_contracts_hold_at_every_converted_layer(name, monkeypatch):
    mode = _cpu_mode(name)
    spies = KernelSpies(monkeypatch)
    gpu_autocast = get_mode(name)(B200).autocast_dtype  # the autocast this mode runs under on a GPU
    with mode.numerics():  # prepare inside too: fp8's process-wide inductor patch is undone on exit
        model = mode.prepare(GPT(CFG, seed=0))
        with torch.autocast("cpu", dtype=gpu_autocast or torch.bfloat16, enabled=bool(gpu_autocast)):
            logits = model(BATCH[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), BATCH[:, 1:].flatten())
        spies.phase = "backward"
        loss.backward()
    assert spies.broken == [], spies.broken[:5]
    converted = len(mode.layer_fields().get("converted_layers", []))
    reached = {boundary for boundary, _ in spies.calls}
    assert len(reached) <= 1, f"{name} reached several kernel boundaries: {reached}"
    if converted:
        assert reached, f"{name} converts {converted} layers but reached no checked kernel: add a spy"
        (boundary,) = reached
        forward, backward = PER_LAYER[boundary]
        assert spies.count(boundary, "forward") == forward * converted
        assert spies.count(boundary, "backward") == backward * converted
    else:
        assert not reached


@pytest.mark.parametrize("name", list(MODES))
def test_held_out_loss_is_strict_fp32_for_every_mode(name, monkeypatch):
    """docs/modes.md: held-out loss is evaluated in strict fp32 for every mode, from the weights training produced
    (fp32 masters, or the stored low-precision weights upcast): no 8-bit kernel, no bf16 matmul."""
    mode = _cpu_mode(name)
    spies = KernelSpies(monkeypatch)
    with mode.numerics():
        model = mode.prepare(GPT(CFG, seed=0))
        optimizer = mode.make_optimizer(model, lr=1e-2, weight_decay=0.1)
        with mode.forward_context():
            loss = F.cross_entropy(model(BATCH[:, :-1]).float().flatten(0, 1), BATCH[:, 1:].flatten())
        mode.backward_and_step(loss, optimizer)  # the weights move: the copy must hold the trained ones
        copy = mode.eval_model(model)
        spies.calls.clear()
        spies.phase = "evaluation"
        with MatmulDtypes() as seen:
            evaluate(copy, BATCH[None], torch.device("cpu"))
    assert spies.calls == [], f"{name} evaluated through {len(spies.calls)} low-precision kernels"
    assert {dtype for _, dtype in seen.seen} == {"float32"}, seen.seen
    foreign = {type(m).__name__ for m in copy.modules() if not type(m).__module__.startswith(("torch.nn", "models"))}
    assert not foreign and {p.dtype for p in copy.parameters()} == {torch.float32}
    if converted := mode.layer_fields().get("converted_layers"):
        from suite.modes.torchao_calls import master_weight

        layer = converted[0]
        assert torch.equal(copy.get_submodule(layer).weight, master_weight(model.get_submodule(layer)).float())
