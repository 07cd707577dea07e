"""The roofline of a training step: every GEMM with its shape, FLOPs and bytes in the mode's formats.

A GEMM cannot run faster than its FLOPs at the peak of its arithmetic, nor than its operands and
result moved once at the memory bandwidth: its time is at least the larger of the two. Summed over
the step's GEMMs (with the cast kernels a mode adds and the memory-bound rest of the step:
`suite.metrics.roofline_step`; the bound and its record fields: `suite.metrics.roofline_predict`),
that is a lower bound on the step time: a measured step faster than it means a wrong peak, a wrong
model of the step, or a wrong timer (docs/roofline.md).

The GEMMs of one Linear (in -> out features, M = batch x seq_len tokens), as autograd runs them:

    forward       y  = x  @ W^T      (M x in) @ (in x out)    operands: input, weight
    grad_input    dx = dy @ W        (M x out) @ (out x in)   operands: grad_output, weight
    grad_weight   dW = dy^T @ x      (out x M) @ (M x in)     operands: grad_output, input

Each operand is in the format (suite.modes.formats) the mode runs that role in (`tensor_formats`),
so a float8 Linear's GEMMs move 1-byte operands and run at the fp8 peak, a bf16 one 2-byte operands
at the bf16 peak. Attention's batched GEMMs (B x heads of them) run in the dtype of the Linears the
mode leaves alone; flash-style kernels skip the masked upper triangle, so they count half the square.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from models import GPT, GPTConfig

# Bytes per element of each format, the block scales included (mxfp8/mxfp4: one e8m0 byte per 32
# elements; nvfp4: one e4m3 byte per 16 plus a per-tensor fp32 scale, negligible). Tensor-wise and
# row-wise fp32 scales are a handful of bytes per tensor or row: left out here, counted with the casts.
FORMAT_BYTES: dict[str, float] = {
    "fp32": 4.0, "tf32": 4.0, "fp16": 2.0, "fp16-scaled": 2.0, "bf16": 2.0,
    "e4m3-tensorwise": 1.0, "e4m3-rowwise": 1.0, "e4m3-rowwise-pow2": 1.0, "e5m2-tensorwise": 1.0,
    "e5m2-rowwise": 1.0, "int8-rowwise": 1.0,
    "mxfp8": 1.0 + 1 / 32, "mxfp8-rceil": 1.0 + 1 / 32, "mxfp4": 0.5 + 1 / 32, "nvfp4": 0.5 + 1 / 16,
}  # fmt: skip
# The peak-table column (suite.metrics.peaks.DTYPES) a GEMM on operands of each format runs at; None: no
# column (4-bit formats: no datasheet row of ours has them yet).
FORMAT_PEAK: dict[str, str | None] = {
    "fp32": "fp32", "tf32": "tf32", "fp16": "fp16", "fp16-scaled": "fp16", "bf16": "bf16",
    **dict.fromkeys(("e4m3-tensorwise", "e4m3-rowwise", "e4m3-rowwise-pow2", "e5m2-tensorwise", "e5m2-rowwise"),
                    "fp8"),
    "int8-rowwise": "int8", "mxfp8": "mxfp8", "mxfp8-rceil": "mxfp8", "mxfp4": None, "nvfp4": None,
}  # fmt: skip
# What an 8-bit GEMM hands back: its operands' original dtype under the modes' bf16 autocast.
WIDE_RESULT = {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "fp16-scaled": "fp16", "bf16": "bf16"}
KINDS = ("forward", "grad_input", "grad_weight")
ATTENTION_KINDS = ("scores", "weighted_sum", "grad_probs", "grad_values", "grad_query", "grad_key")


@dataclass(frozen=True)
class Gemm:
    """One GEMM of the step: `batch` products of (m x k) @ (k x n), operands in formats `a` and `b`,
    the result in `out`. `density` is the share of the product computed (0.5: causal attention)."""

    layer: str  # the Linear's fqn ("blocks.0.mlp.c_fc", "lm_head") or "blocks.0.attn.sdpa"
    kind: str  # KINDS for a Linear, ATTENTION_KINDS for attention
    m: int
    k: int
    n: int
    a: str
    b: str
    out: str
    batch: int = 1
    density: float = 1.0

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n * self.density

    @property
    def bytes(self) -> float:
        """Operands read once and the result written once: the least traffic the GEMM can have."""
        elems = ((self.m * self.k, self.a), (self.k * self.n, self.b), (self.m * self.n, self.out))
        return self.batch * self.density * sum(count * FORMAT_BYTES[fmt] for count, fmt in elems)

    @property
    def compute(self) -> str | None:
        """The peak-table column it runs at: the wider operand's (a bf16 x fp8 product runs in bf16)."""
        a, b = FORMAT_PEAK[self.a], FORMAT_PEAK[self.b]
        return a if FORMAT_BYTES[self.a] >= FORMAT_BYTES[self.b] else b

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.m, self.k, self.n)


def result_format(a: str, b: str) -> str:
    """The format a GEMM on operands `a` x `b` writes its output in (an 8-bit product: bf16, the autocast
    dtype its operands were cast from)."""
    wide = [WIDE_RESULT[f] for f in (a, b) if f in WIDE_RESULT]
    if not wide:
        return "bf16"
    return max(wide, key=lambda f: FORMAT_BYTES[f])


def linear_gemms(layer: str, tokens: int, in_features: int, out_features: int, formats: dict[str, str]) -> list[Gemm]:
    """The three GEMMs of one Linear over `tokens` rows, with its roles' formats (`tensor_formats`). A GEMM kind
    named in `formats` as "gemm.KIND" (a layer policy keeps it high inside a converted Linear: `mode_formats`)
    runs on both operands in that format instead, at its peak."""
    x, w, dy, dw = (formats[r] for r in ("input", "weight", "grad_output", "grad_weight"))
    fx, fw = formats.get("gemm.forward", x), formats.get("gemm.forward", w)
    ix, iw = formats.get("gemm.grad_input", dy), formats.get("gemm.grad_input", w)
    wx, ww = formats.get("gemm.grad_weight", dy), formats.get("gemm.grad_weight", x)
    return [
        Gemm(layer, "forward", tokens, in_features, out_features, fx, fw, result_format(fx, fw)),
        Gemm(layer, "grad_input", tokens, out_features, in_features, ix, iw, result_format(ix, iw)),
        Gemm(layer, "grad_weight", out_features, tokens, in_features, wx, ww, dw),
    ]


def attention_gemms(layer: str, batch: int, heads: int, seq_len: int, head_dim: int, fmt: str) -> list[Gemm]:
    """Attention's six batched GEMMs (two forward, four backward) over B x heads, causal: half of each."""
    t, d, bh = seq_len, head_dim, batch * heads
    shapes = {"scores": (t, d, t), "weighted_sum": (t, t, d), "grad_probs": (t, d, t),
              "grad_values": (t, t, d), "grad_query": (t, t, d), "grad_key": (t, t, d)}  # fmt: skip
    return [Gemm(layer, kind, *shapes[kind], fmt, fmt, fmt, batch=bh, density=0.5) for kind in ATTENTION_KINDS]


def model_gemms(
    config: GPTConfig,
    batch: int,
    seq_len: int,
    formats_of: Callable[[str], dict[str, str]],
    attention_format: str,
) -> list[Gemm]:
    """Every GEMM of one training step of `config` on a (batch x seq_len) batch: each Linear's three (its
    formats from `formats_of(fqn)`) and each block's attention (in `attention_format`)."""
    import torch  # here: importing this module stays light

    with torch.device("meta"):  # shapes only
        model = GPT(config)
    tokens = batch * seq_len
    gemms: list[Gemm] = []
    for fqn, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gemms += linear_gemms(fqn, tokens, module.in_features, module.out_features, formats_of(fqn))
        if fqn.endswith(".attn"):
            head_dim = config.n_embd // config.n_head
            gemms += attention_gemms(f"{fqn}.sdpa", batch, config.n_head, seq_len, head_dim, attention_format)
    return gemms


def converted_layers(mode: object, config: GPTConfig) -> list[str] | None:
    """The Linears `mode` (an instance) converts in `config`, as a run's `prepare` selects them: the mode prepared
    on a meta-device model (no weights), inside its numerics() so that what it changes process-wide (torchao's
    inductor patch, TF32 flags) is put back. None for a mode that runs every Linear alike."""
    import torch  # here: importing this module stays light

    with torch.device("meta"):
        model = GPT(config)
    with mode.numerics():  # type: ignore[attr-defined]
        mode.prepare(model)  # type: ignore[attr-defined]
    return mode.layer_fields().get("converted_layers")  # type: ignore[attr-defined]


def mode_formats(mode: object, converted: list[str] | None) -> tuple[Callable[[str], dict[str, str]], str]:
    """(formats of each Linear, attention's format) for a mode instance: a converted Linear (every one when
    `converted` is None) in the mode's `tensor_formats()`, any other in `tensor_formats(fqn)` (the mode's
    plain Linears: bf16 under the 8-bit modes' autocast); attention in the format of what a mode never converts
    (the LM head may be converted now: a layer policy decides). A converted Linear's GEMM kinds that the mode's
    layer policy keeps high (`high_gemms`) run in the format the mode says (`kept_gemm_format`: bf16, at the bf16
    peak), on both operands."""
    kept = {f"gemm.{kind}": mode.kept_gemm_format(kind) for kind in getattr(mode, "high_gemms", ())}  # type: ignore[attr-defined]

    def formats_of(fqn: str) -> dict[str, str]:
        if converted is None or fqn in converted:
            return mode.tensor_formats(None) | kept  # type: ignore[attr-defined]
        return mode.tensor_formats(fqn)  # type: ignore[attr-defined]

    return formats_of, mode.tensor_formats("blocks.0.attn.sdpa")["input"]  # type: ignore[attr-defined]


def gemm_seconds(gemm: Gemm, flops_per_s: dict[str, float | None], bandwidth: float | None) -> float | None:
    """max(FLOPs / peak, bytes / bandwidth): the least time the GEMM can take; None when its arithmetic has
    no peak here or the bandwidth is unknown."""
    peak = flops_per_s.get(gemm.compute) if gemm.compute else None
    if not peak or not bandwidth:
        return None
    return max(gemm.flops / peak, gemm.bytes / bandwidth)
