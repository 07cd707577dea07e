"""Tensor comparisons against a float64 reference: cosine, relative L2 error, max error, underflow.

Pure math on dicts of tensors keyed by parameter name (module path); the step that produces
them is `suite.training.fidelity`. Everything is computed in float64 on the tensors' device,
one host transfer per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64


def plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the values a (possibly quantized) tensor subclass stands for.

    torchao's int8 training weight (`Int8QuantizedTrainingLinearWeight`) and its low-bit
    optimizer states define `dequantize()` (int8 data x per-row scale); a wrapper subclass
    with one inner tensor of its own shape (`__tensor_flatten__`) stands for that tensor.
    """
    t = t.detach()
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t
    if callable(getattr(t, "dequantize", None)) and not t.is_quantized:
        return t.dequantize()
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None:
        inner = [getattr(t, name) for name in flatten()[0]]
        same = [x for x in inner if torch.is_tensor(x) and x.shape == t.shape and x.is_floating_point()]
        if len(same) == 1:
            return plain(same[0])
    raise TypeError(f"cannot read the values of a {type(t).__name__}: no dequantize() and no single inner tensor")


@dataclass(frozen=True)
class Diff:
    """How far a mode's tensor is from the float64 one: cosine, |a-b|/|b| (L2), max |a-b|."""

    cos: float | None  # None where either side is all zero; NaN where the mode has inf/NaN
    rel_err: float  # 0 where both are all zero, inf where only the reference is
    max_abs_err: float


def _rel(nd: float, nb: float) -> float:
    if nb > 0:
        return math.sqrt(nd / nb)
    return 0.0 if nd == 0 else math.inf


def _cos(dot: float, na: float, nb: float) -> float | None:
    if not (math.isfinite(na) and math.isfinite(dot)):  # inf / NaN in the mode: no direction
        return math.nan
    if na == 0 or nb == 0:
        return None
    return dot / math.sqrt(na * nb)


class Comparison:
    """Per-tensor Diffs and their global sum over every tensor added."""

    def __init__(self) -> None:
        self._dot = self._na = self._nb = self._nd = 0.0
        self._max = 0.0
        self.count = 0

    def add(self, mode: torch.Tensor, ref: torch.Tensor) -> Diff:
        """Compare one tensor (any float dtype, upcast) with its float64 reference (same shape)."""
        a, b = mode.to(F64), ref.to(F64)
        d = a - b
        stats = torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum(), (d * d).sum(), d.abs().max()])
        dot, na, nb, nd, mx = stats.tolist()  # the one sync for this tensor
        self._dot, self._na, self._nb, self._nd = self._dot + dot, self._na + na, self._nb + nb, self._nd + nd
        self._max = max(self._max, mx) if not math.isnan(mx) else math.nan
        self.count += 1
        return Diff(_cos(dot, na, nb), _rel(nd, nb), mx)

    def total(self) -> Diff:
        """The global figures: as if every tensor were one long vector."""
        return Diff(_cos(self._dot, self._na, self._nb), _rel(self._nd, self._nb), self._max)


@dataclass(frozen=True)
class Lost:
    """Gradient elements lost to the format: zero where float64 is not (underflow), or inf/NaN."""

    underflow: int
    overflow: int
    numel: int


# A float64 value below this fraction of its tensor's largest is float64's own rounding noise
# rather than a gradient: e.g. the key bias's gradient, exactly 0 in exact arithmetic (softmax
# ignores a shift of all scores) and about 1e-12 in float64. A mode's 0 there is no underflow.
NOISE_FLOOR = 1e-8


def lost(mode: torch.Tensor, ref: torch.Tensor) -> Lost:
    """Counts of underflowed (0 where float64 is not, above its noise) and non-finite elements of `mode`."""
    floor = ref.abs().max() * NOISE_FLOOR
    under = ((mode == 0) & (ref.abs() > floor)).sum()
    over = (~torch.isfinite(mode)).sum()
    u, o = torch.stack([under, over]).tolist()
    return Lost(int(u), int(o), mode.numel())


def fraction(counts: list[Lost]) -> tuple[float, float]:
    """(underflow, overflow) as fractions of all gradient elements counted."""
    n = sum(c.numel for c in counts)
    return sum(c.underflow for c in counts) / n, sum(c.overflow for c in counts) / n


def json_number(x: float | None) -> float | str | None:
    """NaN / inf as the strings the record store writes ('nan', 'inf'): JSON has no such numbers."""
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x
