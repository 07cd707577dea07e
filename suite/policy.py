"""Which layers and GEMMs a low-precision mode keeps in bf16 (its layer policy), and the 4-bit modes' recipe.

Torch-free on purpose: the case key (suite.records.cases) and the record readers use it.

A layer policy is a comma-separated list (`mpbench run --keep-high`, `Case.keep_high`):

- `first:K` / `last:K`: the first or last K transformer blocks (K a count, or a share of the blocks such as
  `15%`, rounded up: 15% of 12 blocks is 2);
- `block:I`: block I alone (0-based; may repeat);
- `lm_head`: the LM head (tied to the token embedding in this GPT);
- `forward`, `grad_input`, `grad_weight`: that GEMM of every converted Linear (x @ W^T, dy @ W, dy^T @ x);
- `none`, alone: keep nothing high; every Linear the mode can convert is converted.

"Kept high" means a plain Linear under the mode's bf16 autocast: its GEMMs take bf16 operands. A case holds its
policy resolved (shares turned into counts, tokens in one order), so one policy is one case key. Only the modes in
DEFAULT_POLICY take one; every other mode's case holds "" (it has no low-precision Linears to keep high).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GEMM_KINDS = ("forward", "grad_input", "grad_weight")
# Each low-precision mode's policy when none is given, from the recipe it follows (docs/layer-policy.md):
# torchtitan's float8 and MX converters leave the output projection out (its `filter_fqns` default); NVIDIA's
# NVFP4 pretraining recipe (arXiv 2509.25149) and torchtitan's NVFP4 converter keep about the last 15% of the
# blocks and the LM head in bf16; the MXFP4 mode follows the same recipe so the two 4-bit formats compare alike.
DEFAULT_POLICY: dict[str, str] = {
    "fp8-tensorwise": "lm_head",
    "fp8-rowwise": "lm_head",
    "mxfp8": "lm_head",
    "int8-mixed": "lm_head",
    "nvfp4": "last:15%,lm_head",
    "mxfp4": "last:15%,lm_head",
}
# The GEMM kinds a mode can keep in bf16 inside a converted Linear (`forward`, `grad_input`, `grad_weight` in a
# policy), with why where it cannot keep them all; a mode not listed keeps any kind. torchao 0.18's MXFP8Linear
# (prototype/moe_training/mxfp8_linear.py) has one such switch, wgrad_with_hp: its forward and input-gradient GEMMs
# always quantize. Here, torch-free, so that a Case refuses such a policy before anything is built.
KEEPABLE_GEMMS: dict[str, tuple[tuple[str, ...], str]] = {
    "mxfp8": (("grad_weight",), "torchao's MXFP8Linear has one per-GEMM switch, wgrad_with_hp, for grad_weight"),
}
# The 4-bit modes' recipe switches (`mpbench run --fp4-recipe`, `Case.fp4_recipe`), a comma-separated list of
# those on, or `none`: sr = stochastic rounding of the gradients (the output gradient in both backward GEMMs,
# nothing else); rht = a 16 x 16 random Hadamard transform on both operands of the weight-gradient GEMM; 2d = one
# scale per 16 x 16 block of the weight (one quantized weight for the forward and the input-gradient GEMM).
FP4_SWITCHES = ("sr", "rht", "2d")
FP4_ALLOWED: dict[str, tuple[str, ...]] = {"nvfp4": FP4_SWITCHES, "mxfp4": ("sr", "rht")}
# NVIDIA's NVFP4 recipe has all three on; the MXFP4 default follows Tseng et al., "Training LLMs with MXFP4"
# (arXiv 2502.20586): stochastic rounding and a random Hadamard transform in the backward pass.
DEFAULT_FP4_RECIPE: dict[str, str] = {"nvfp4": "sr,rht,2d", "mxfp4": "sr,rht"}


@dataclass(frozen=True)
class LayerPolicy:
    """A resolved layer policy: counts, not shares."""

    first: int = 0
    last: int = 0
    blocks: tuple[int, ...] = ()  # sorted, each once
    lm_head: bool = False
    gemms: tuple[str, ...] = ()  # in GEMM_KINDS order

    def text(self) -> str:
        """The canonical form, parsed back to the same policy ("none" when it keeps nothing)."""
        parts = [f"first:{self.first}"] if self.first else []
        parts += [f"last:{self.last}"] if self.last else []
        parts += [f"block:{i}" for i in self.blocks]
        parts += ["lm_head"] if self.lm_head else []
        parts += list(self.gemms)
        return ",".join(parts) or "none"

    def kept_blocks(self, n_layer: int) -> set[int]:
        """The blocks kept high in a model of `n_layer` blocks."""
        return set(range(self.first)) | set(range(n_layer - self.last, n_layer)) | set(self.blocks)

    def why_kept(self, fqn: str, n_layer: int) -> str | None:
        """Why the Linear named `fqn` ("blocks.3.mlp.c_fc", "lm_head") stays in bf16 under this policy; None when
        the policy converts it (its GEMM kinds aside: `gemms` applies inside converted Linears)."""
        if fqn.startswith("blocks."):
            index = int(fqn.split(".")[1])
            if index in self.kept_blocks(n_layer):
                return f"kept in bf16 by the layer policy {self.text()} (block {index})"
            return None
        if fqn == "lm_head" and self.lm_head:
            return f"kept in bf16 by the layer policy {self.text()} (LM head)"
        return None


def _count(field: str, token: str, value: str, n_layer: int) -> int:
    """K of first:K / last:K: a count in 1..n_layer, or a share "P%" of the blocks rounded up."""
    try:
        k = math.ceil(float(value[:-1]) / 100 * n_layer) if value.endswith("%") else int(value)
    except ValueError:
        k = -1
    if not 1 <= k <= n_layer:
        raise ValueError(
            f"{field}={token!r}: the model has {n_layer} blocks; give a count in 1..{n_layer} or a share such as 15%"
        )
    return k


def parse_policy(text: str, n_layer: int, field: str = "keep_high") -> LayerPolicy:
    """`text` resolved against a model of `n_layer` blocks; ValueError naming the field, the token and the fix."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if tokens == ["none"]:
        return LayerPolicy()
    first = last = 0
    blocks: set[int] = set()
    lm_head = False
    gemms: set[str] = set()
    for token in tokens:
        name, _, value = token.partition(":")
        if name in ("first", "last") and value:
            k = _count(field, token, value, n_layer)
            first, last = (k, last) if name == "first" else (first, k)
        elif name == "block" and value:
            if not value.isdigit() or int(value) >= n_layer:
                raise ValueError(f"{field}={token!r}: the model has blocks 0..{n_layer - 1}; name one of them")
            blocks.add(int(value))
        elif token == "lm_head":
            lm_head = True
        elif token in GEMM_KINDS:
            gemms.add(token)
        else:
            raise ValueError(
                f"{field}={token!r} is unknown; give first:K, last:K, block:I, lm_head, forward, grad_input, "
                "grad_weight (comma-separated), or none"
            )
    if len(gemms) == len(GEMM_KINDS):
        raise ValueError(f"{field}={text!r} keeps every GEMM in bf16: that is the bf16 mode; keep one or two")
    return LayerPolicy(first, last, tuple(sorted(blocks)), lm_head, tuple(g for g in GEMM_KINDS if g in gemms))


def check_gemms(mode: str, policy: LayerPolicy, field: str = "keep_high") -> LayerPolicy:
    """`policy`, or ValueError when it keeps a GEMM kind high that `mode` cannot (KEEPABLE_GEMMS)."""
    allowed, why = KEEPABLE_GEMMS.get(mode, (GEMM_KINDS, ""))
    for kind in policy.gemms:
        if kind not in allowed:
            raise ValueError(
                f"{field}={policy.text()!r}: {mode} cannot keep the {kind} GEMM in bf16 ({why}); drop {kind} "
                f"(it can keep {', '.join(allowed)}), or use a mode that can, such as fp8-rowwise"
            )
    return policy


def gemm_kinds(text: str) -> tuple[str, ...]:
    """The GEMM kinds a policy text keeps high, in GEMM_KINDS order, without resolving its blocks (which needs the
    model's depth): what a mode needs to know about its converted Linears before it sees a model."""
    tokens = {t.strip() for t in text.split(",")}
    return tuple(kind for kind in GEMM_KINDS if kind in tokens)


def resolve_keep_high(mode: str, text: str, n_layer: int) -> str:
    """A case's policy as it holds it: "" for a mode that takes none; the mode's default when `text` is ""; else
    `text` resolved and in canonical form. ValueError for a policy the model or the mode cannot have."""
    if mode not in DEFAULT_POLICY:
        return ""
    return check_gemms(mode, parse_policy(text or DEFAULT_POLICY[mode], n_layer)).text()


def legacy_keep_high(mode: str | None) -> str:
    """The policy a record written before policies existed ran: its mode's default (for the modes that had one
    then, the LM head alone, which does not depend on the model's depth), "" for the others."""
    default = DEFAULT_POLICY.get(mode or "", "")
    return "" if "%" in default else default


def default_keep_high(mode: str | None, model: str | None) -> str:
    """The policy a case of `mode` on the preset `model` holds by default, resolved ("" for a mode without one). A
    share resolves against the preset's depth: only then is `models` (and with it torch) imported."""
    default = DEFAULT_POLICY.get(mode or "", "")
    if "%" not in default:
        return default
    from models import GPTConfig

    return parse_policy(default, GPTConfig.preset(model).n_layer).text() if model in GPTConfig.presets() else default


def policy_note(mode: str | None, keep_high: str | None, model: str | None) -> str:
    """What a table adds to a mode's name so that two policies of one mode are two rows: " [keep TEXT]" when the
    record's policy is not its mode's default on its model, "" for the default, a mode without a policy, or a
    record written before policies."""
    if not keep_high or mode not in DEFAULT_POLICY or keep_high == default_keep_high(mode, model):
        return ""
    return f" [keep {keep_high}]"


def recipe_note(mode: str | None, fp4_recipe: str | None) -> str:
    """What a table adds to a 4-bit mode's name when its recipe is not the mode's default: " [fp4 sr]"; "" for the
    default, another mode, or a record without one."""
    if not fp4_recipe or mode not in FP4_ALLOWED or fp4_recipe == resolve_fp4_recipe(mode, ""):
        return ""
    return f" [fp4 {fp4_recipe}]"


@dataclass(frozen=True)
class FP4Recipe:
    """The 4-bit modes' switches (FP4_SWITCHES), resolved."""

    stochastic_rounding: bool = False
    hadamard: bool = False
    weight_2d: bool = False

    def text(self) -> str:
        flags = (self.stochastic_rounding, self.hadamard, self.weight_2d)
        return ",".join(name for name, on in zip(FP4_SWITCHES, flags, strict=True) if on) or "none"


def parse_fp4_recipe(mode: str, text: str, field: str = "fp4_recipe") -> FP4Recipe:
    """`text` ("" for the mode's default) for a 4-bit `mode`; ValueError naming the field, the switch and the fix."""
    allowed = FP4_ALLOWED[mode]
    tokens = [t.strip() for t in (text or DEFAULT_FP4_RECIPE[mode]).split(",") if t.strip()]
    if tokens == ["none"]:
        return FP4Recipe()
    for token in tokens:
        if token not in allowed:
            raise ValueError(
                f"{field}={token!r} is not a switch of {mode}; give some of {', '.join(allowed)} "
                "(comma-separated), or none"
            )
    return FP4Recipe("sr" in tokens, "rht" in tokens, "2d" in tokens)


def resolve_fp4_recipe(mode: str, text: str) -> str:
    """A case's recipe as it holds it: "" for a mode without 4-bit switches, else the canonical switches on."""
    return parse_fp4_recipe(mode, text).text() if mode in FP4_ALLOWED else ""
