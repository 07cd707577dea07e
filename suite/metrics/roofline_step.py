"""The rest of a training step's roofline: the casts a mode adds, the memory-bound rest, and the bound.

`suite.metrics.roofline` lists the step's GEMMs. Here the step's other kernels are counted in bytes (each
moves its tensors at the memory bandwidth at best), and `predict` adds them up:

    predicted step = sum over GEMMs of max(FLOPs / peak of its arithmetic, bytes / bandwidth)
                   + cast bytes / bandwidth + rest bytes / bandwidth

Every term is the least its kernels can take, so the sum is a lower bound on the step: a measured step
faster than it is a wrong ceiling, a wrong model of the step, or a wrong timer (the `roofline_bound` rule).

Casts (`cast_traffic`), per Linear and step, after torchao 0.18's own roofline (torchao/testing/training/
roofline_utils.py, `get_tensor_memory_traffic_ovhd_s`, without its fusion with a previous kernel):
  - 8-bit operands, each of the three roles (input, weight, grad_output) feeding two GEMMs:
    tensorwise (torchao.float8 `hp_tensor_to_float8_dynamic`, TENSORWISE): one amax pass (a full read: the
    reduction cannot be fused into the cast, which needs its result), then the cast, reading the tensor once
    and writing it in both layouts (the weight: one cast in the forward, one in the backward, two reads);
    rowwise (float8 AXISWISE, and int8-mixed's `quantize_int8_rowwise`, one call per GEMM operand): two casts,
    one per layout, each reading the tensor, writing 8-bit data and an fp32 scale per row (the row's amax
    is computed in the same pass); mxfp8 (torchao.prototype.mx_formats `to_mx`, the dim0 and dim1 casts of
    MXFP8Linear): two casts, each writing 1 byte + one e8m0 scale per 32 elements.
    The high-precision side is what the mode hands the cast (CAST_SOURCE): the float8 modes read a bf16 input
    and gradient (autocast) and the fp32 master weight itself (Float8Linear casts `self.weight`); int8-mixed
    reads fp32 everywhere (its pre-hook keeps the inputs fp32); mxfp8 reads bf16 everywhere (the weight
    presented as bf16 by a parametrization, whose fp32 -> bf16 cast is counted as a weight cast).
  - weight casts: a Linear whose GEMM operand is narrower than the stored weight (autocast's fp32 -> bf16
    copy of a master weight, the mxfp8 parametrization, int8-weight's dequantization): read the stored bytes,
    write the operand's, once a step (autocast caches it for the backward).
  - gradient casts: a weight gradient produced in another dtype than the parameter's .grad (a bf16 GEMM
    result for an fp32 master): read it, write the .grad.
  Approximated: the casts torchao runs eagerly read their tensor once per call (an eager amax reads it once
  more, a transposed layout may cost a copy); the bound counts the least traffic, so it stays a bound.

The rest (`rest_traffic`), per token: LayerNorms, residual adds, GELU, attention's input and output
(flash-style: Q, K, V read and O written once in the forward; Q, K, V, O, dO read and dQ, dK, dV written in
the backward), the embedding lookup and its gradient, cross-entropy on the logits (read once forward, read
and its gradient written once backward: computing it in fp32 under autocast costs registers, not bytes;
eager autocast's fp32 copies of the logits are left out, as any fusion would), and AdamW per parameter (read
weight, grad and both moments, write weight and moments: the fused kernel's traffic, in the mode's stored
dtypes). Bias adds are taken as fused into their GEMM's epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from models import GPT, GPTConfig
from suite.metrics.roofline import FORMAT_BYTES, Gemm

# Bytes the 8-bit cast reads per element, per operand role (input, weight, grad_output), by format family.
CAST_SOURCE: dict[str, tuple[float, float, float]] = {
    "e4m3": (2.0, 4.0, 2.0), "e5m2": (2.0, 4.0, 2.0),  # Float8Linear: bf16 input/grad, the fp32 master
    "int8": (4.0, 4.0, 4.0),  # int8-mixed: fp32 inputs (its to_weight_dtype pre-hook), master, gradients
    "mxfp8": (2.0, 2.0, 2.0),  # MXFP8Linear: bf16 everywhere (the weight through its bf16 parametrization)
}  # fmt: skip
ROW_SCALE_BYTES = 4.0  # one fp32 scale per row of a row-wise cast
# (param, grad, optimizer state) bytes per element where a mode does not store fp32 everywhere
PURE16 = (2.0, 2.0, 2.0)
STORAGE: dict[str, tuple[float, float, float]] = {"pure-bf16": PURE16, "pure-bf16-sr": PURE16, "pure-fp16": PURE16}
# int8-weight: the blocks' Linear weights in int8 (its bf16 row scales left out), bf16 grads and moments
BLOCK_STORAGE: dict[str, tuple[float, float, float]] = {"int8-weight": (1.0, 2.0, 2.0)}
FP32_STORAGE = (4.0, 4.0, 4.0)


def storage(mode: str, param: str) -> tuple[float, float, float]:
    """(param, grad, AdamW moment) bytes per element of parameter `param` (its fqn) under `mode`."""
    if mode in BLOCK_STORAGE and param.startswith("blocks.") and param.endswith(".weight") and ".ln_" not in param:
        return BLOCK_STORAGE[mode]
    return STORAGE.get(mode, FP32_STORAGE)


@dataclass(frozen=True)
class Linear:
    """One Linear of the model as the roofline needs it: shape, its roles' formats, its stored dtypes."""

    fqn: str
    in_features: int
    out_features: int
    formats: dict[str, str] = field(hash=False)
    stored: tuple[float, float, float]


def _operand_cast(fmt: str, rows: int, cols: int, source: float, weight: bool) -> tuple[float, float]:
    """(read, written) bytes of casting one (rows x cols) operand to 8-bit `fmt` for its two GEMMs."""
    n = rows * cols
    if fmt.endswith("tensorwise"):
        return source * n * (3 if weight else 2), 2.0 * n  # amax pass + the cast(s); both layouts written
    if "rowwise" in fmt:
        return 2 * source * n, 2.0 * n + ROW_SCALE_BYTES * (rows + cols)
    return 2 * source * n, 2 * FORMAT_BYTES[fmt] * n  # MX: the e8m0 block scales are in FORMAT_BYTES


def cast_traffic(linears: list[Linear], tokens: int) -> dict[str, float]:
    """Bytes read and written per step by the casts the mode adds: {"read", "written"} (see module doc)."""
    read = written = 0.0
    for lin in linears:
        f, (p, g, _) = lin.formats, lin.stored
        w_numel = lin.in_features * lin.out_features
        family = f["weight"].split("-")[0]
        if family in CAST_SOURCE:
            src_x, src_w, src_dy = CAST_SOURCE[family]
            shapes = {"input": (tokens, lin.in_features, src_x), "weight": (lin.out_features, lin.in_features, src_w),
                      "grad_output": (tokens, lin.out_features, src_dy)}  # fmt: skip
            for role, (rows, cols, src) in shapes.items():
                r, w = _operand_cast(f[role], rows, cols, src, role == "weight")
                read, written = read + r, written + w
        else:
            src_w = FORMAT_BYTES[f["weight"]]  # a wide GEMM operand: the weight as the GEMM reads it
        if src_w != p:  # autocast's copy of the master, a parametrization's cast, int8-weight's dequantize
            read, written = read + p * w_numel, written + src_w * w_numel
        made = FORMAT_BYTES[f["grad_weight"]]
        if made != g:  # the weight gradient GEMM's result cast to the parameter's .grad
            read, written = read + made * w_numel, written + g * w_numel
    return {"read": read, "written": written}


def rest_traffic(config: GPTConfig, tokens: int, mode: str, act: float, logits: float, params: dict[str, int],
                 optimizer_share: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Bytes per step of the memory-bound rest: per token the norms, adds, GELU, attention I/O, embedding and
    cross-entropy (activations `act` bytes, logits `logits` bytes, the residual stream in the embedding's
    stored dtype), plus AdamW over `params` (fqn -> elements; `optimizer_share` of them on this GPU)."""
    c, v = config.n_embd, config.padded_vocab_size
    res, _, _ = storage(mode, "wte.weight")
    grad = storage(mode, "wte.weight")[1]
    norm = c * (3 * res + 2 * act)  # forward: read residual, write activation; backward: dy, x in, dx out
    add = c * (5 * res + act)  # forward: residual + branch -> residual; backward: the gradient accumulated
    gelu = 4 * c * act * 5  # forward: read, write; backward: read dy and x, write dx (4C wide)
    attention = c * act * 12  # forward: Q, K, V in, O out; backward: Q, K, V, O, dO in, dQ, dK, dV out
    layer = 2 * norm + 2 * add + gelu + attention
    embedding = c * (2 * res + res) + c * (res + 2 * grad)  # lookups + sum out; gradient in, scatter-add
    cross_entropy = 3 * v * logits  # forward: read logits; backward: read logits, write their gradient
    per_token = config.n_layer * layer + norm + embedding + cross_entropy
    adamw = sum(n * (2 * p + g + 4 * s) for fqn, n in params.items() for p, g, s in [storage(mode, fqn)])
    return {"activations": per_token * tokens, "optimizer": adamw * optimizer_share}


def model_linears(config: GPTConfig, mode: str, formats_of: Any) -> tuple[list[Linear], dict[str, int]]:
    """The model's Linears with their formats and stored dtypes, and every parameter's element count."""
    with torch.device("meta"):
        model = GPT(config)
    linears = [
        Linear(fqn, m.in_features, m.out_features, formats_of(fqn), storage(mode, f"{fqn}.weight"))
        for fqn, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    # the tied LM head's weight is the embedding's: named once, as wte.weight (nn.Module dedups it)
    return linears, {name: p.numel() for name, p in model.named_parameters()}


def gemm_totals(gemms: list[Gemm]) -> dict[str, float]:
    return {"flops": sum(g.flops for g in gemms), "bytes": sum(g.bytes for g in gemms), "count": len(gemms)}
