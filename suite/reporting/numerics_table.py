"""A record's numerics as cells: read once, checked, and what the summary, compare and report take from them.

`numerics` (a training run, each tensor in the mode's own format) and `numerics_whatif` (`mpbench numerics`:
every format on fp32's tensors) are dicts of equal-length columns: step, layer, role, format, amax,
underflow, saturation, sqnr_db, scale (see suite/records/store.py). Records come from files other versions
wrote, so nothing here trusts them: `read` returns the cells, or none and the reason the field cannot be
read (never an exception), and an absent or empty field is simply no cells.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from suite.records.store import NUMERICS_ROLES as ROLES

FIELDS = ("numerics", "numerics_whatif")
TEXT_COLUMNS = ("layer", "role", "format")
NUMBER_COLUMNS = ("amax", "underflow", "saturation", "sqnr_db")
# A cell is marked U or S in the heatmaps and in `mpbench numerics`' table past these shares, so the
# picture and the table mark the same tensors.
# A thousandth of the elements lost to underflow or clipped by saturation is already visible in SQNR.
UNDERFLOW_MARK = 0.001  # share of the nonzero elements flushed to zero
SATURATION_MARK = 0.001  # share of the elements above the format's largest finite value after its scaling
# `mpbench compare` shows a (layer, role, format) whose SQNR fell by more than this between A and B:
# 3 dB is the quantization noise power doubled (half a bit lost; 6.02 dB is a bit). compare pairs runs of
# one case (same seed, weights and batches). Measured on the tiny GPT (fp16 and bf16, steps 1-30): weights
# perturbed by 1e-7 relative, the size of a changed kernel order, moved any tensor's SQNR by at most
# 0.03 dB; another data seed moved unscaled fp16's small gradients by up to 5.5 dB (why pairs must share
# the seed). A changed scaling recipe (tensorwise vs rowwise, a power-of-two scale, a lost loss scale) moves
# it by several dB. It is shown, not failed: a format losing more is a cause to look at, not a loss.
DROP_DB = 3.0
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@dataclass(frozen=True)
class Cell:
    """One tensor (a layer's role, in one format, at one step) and what the format lost of it."""

    step: int
    layer: str
    role: str
    format: str
    amax: float | None  # None: not measured (a format that failed; the record's numerics_reason says why)
    underflow: float | None
    saturation: float | None
    sqnr_db: float | None  # inf: an exact round trip; nan: an all-zero tensor
    scale: float | None


def _number(value: Any) -> float | None:
    """A column's number as a float ('inf'/'nan' text too); None (not measured) as None; else no number."""
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's numbers too
        return float(value)
    raise TypeError


def _step(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise TypeError
    return int(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def present(record: dict[str, Any], field: str) -> bool:
    """Whether the record holds anything in `field` (pandas' NaN for a missing field is nothing)."""
    value = record.get(field)
    return not (value is None or (isinstance(value, float) and math.isnan(value)) or value == {})


def read(record: dict[str, Any], field: str) -> tuple[list[Cell], str | None]:
    """(the cells of `field`, None), or ([], why) when the field is there but cannot be read."""
    if not present(record, field):
        return [], None
    columns = record[field]
    if not isinstance(columns, dict):
        return [], f"field {field!r} is {type(columns).__name__}, not an object of columns"
    needed = ("step", *TEXT_COLUMNS, *NUMBER_COLUMNS)
    missing = [c for c in needed if c not in columns]
    if missing:
        return [], f"field {field!r} has no column {', '.join(missing)}"
    lists = {c: columns[c] for c in (*needed, "scale") if c in columns}
    bad = [c for c, v in lists.items() if not isinstance(v, list)]
    if bad:
        return [], f"field {field!r}: column {bad[0]!r} is {type(lists[bad[0]]).__name__}, not a list"
    lengths = {c: len(v) for c, v in lists.items()}
    if len(set(lengths.values())) > 1:
        return [], f"field {field!r}: columns of unequal length ({', '.join(f'{c} {n}' for c, n in lengths.items())})"
    cells = []
    for i in range(lengths["step"]):
        column = "step"
        try:
            step = _step(lists["step"][i])
            texts = []
            for column in TEXT_COLUMNS:
                if not isinstance(lists[column][i], str):
                    raise TypeError
                texts.append(lists[column][i])
            numbers = []
            for column in NUMBER_COLUMNS:
                numbers.append(None if lists[column][i] is None else _number(lists[column][i]))
            column = "scale"
            scale = lists.get("scale", [None] * lengths["step"])[i]
            scale = None if scale is None else _number(scale)
        except TypeError:
            return [], f"field {field!r}: column {column!r} row {i} is {_shown(lists[column][i])}, not a valid value"
        cells.append(Cell(step, *texts, *numbers, scale))
    return cells, None


def layers(cells: list[Cell]) -> list[str]:
    """The layers in the order the writer recorded them first: the model's order (forward hooks)."""
    return list(dict.fromkeys(c.layer for c in cells))


def roles(cells: list[Cell]) -> list[str]:
    """The roles in ROLES order, then any other role in the order it came."""
    seen = list(dict.fromkeys(c.role for c in cells))
    return [r for r in ROLES if r in seen] + [r for r in seen if r not in ROLES]


def formats(cells: list[Cell]) -> list[str]:
    return list(dict.fromkeys(c.format for c in cells))


def last_step(cells: list[Cell]) -> int | None:
    return max((c.step for c in cells), default=None)


def at_step(cells: list[Cell], step: int | None) -> list[Cell]:
    return [c for c in cells if c.step == step]


def overflowed(c: Cell) -> bool:
    """Whether the tensor held inf or nan (its amax is not finite; its SQNR is nan, as an all-zero one's)."""
    return c.amax is not None and not math.isfinite(c.amax)


def worst(cells: list[Cell], n: int = 3) -> list[Cell]:
    """The `n` worst cells at the last sampled step: tensors holding inf or nan first, then the lowest finite
    SQNR (an exact round trip, inf, and an all-zero tensor, nan, lose nothing worth naming); ties in the
    model's order."""
    last = [c for c in at_step(cells, last_step(cells))
            if overflowed(c) or (c.sqnr_db is not None and math.isfinite(c.sqnr_db))]  # fmt: skip
    order = {layer: i for i, layer in enumerate(layers(cells))}
    return sorted(last, key=lambda c: (not overflowed(c), 0.0 if overflowed(c) else c.sqnr_db, order[c.layer]))[:n]


def sqnr_text(c: Cell) -> str:
    """The SQNR as the summary and compare print it: "31.3 dB", or "inf/nan dB" for a tensor holding inf or nan."""
    return "inf/nan dB" if overflowed(c) else f"{c.sqnr_db:.1f} dB"


@dataclass(frozen=True)
class Drop:
    """A (layer, role, format) whose SQNR fell by more than DROP_DB from A to B at the same step."""

    a: Cell
    b: Cell

    @property
    def db(self) -> float:
        if overflowed(self.b):  # B's tensor holds inf or nan: as far down as it goes
            return math.inf
        return self.a.sqnr_db - self.b.sqnr_db  # inf when A's round trip was exact and B's is not


def drops(a: list[Cell], b: list[Cell]) -> tuple[list[Drop], int | None]:
    """(every drop beyond DROP_DB, largest first; the step compared): the last step both records sampled,
    so both tensors come from the same batch after as many updates. (None step: no step in common.)"""
    common = {c.step for c in a} & {c.step for c in b}
    if not common:
        return [], None
    step = max(common)
    before = {(c.layer, c.role, c.format): c for c in at_step(a, step)}
    found = []
    for cb in at_step(b, step):
        ca = before.get((cb.layer, cb.role, cb.format))
        if ca is None or ca.sqnr_db is None or math.isnan(ca.sqnr_db):
            continue  # nothing to compare: a tensor only one side has, a statistic not measured, A all zero
        if overflowed(cb):  # A finite, B holding inf or nan: an overflow B did not have, a change to show
            found.append(Drop(ca, cb))
            continue
        if cb.sqnr_db is None or not math.isfinite(cb.sqnr_db):
            continue  # B not measured, exact (no drop) or all-zero (not an SQNR)
        drop = Drop(ca, cb)
        if drop.db > DROP_DB:  # inf - finite = inf: an exact round trip that no longer is
            found.append(drop)
    return sorted(found, key=lambda d: -d.db), step
