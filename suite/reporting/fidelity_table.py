"""The float64 comparison's table in a report (mpbench fidelity, mpbench run --fidelity).

Shown for a group only where some record has it. Errors in scientific notation: they span 1e-8 to 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from suite.reporting.table import Cell, field, why

FIDELITY_CSV = ("grad_cos_vs_fp64", "grad_rel_err_vs_fp64", "grad_max_abs_err_vs_fp64", "update_cos_vs_fp64",
                "update_rel_err_vs_fp64", "grad_underflow_frac", "scaled_grad_underflow_frac", "grad_overflow_frac",
                "fidelity_loss_diff", "fidelity_loss_scale")  # fmt: skip
FIDELITY_NOTE = (
    "Against float64: each mode's gradients (as its optimizer applies them) and update (weights after minus "
    "before) against a float64 step from the same weights and batch, at the last step compared; see "
    "docs/convergence-and-fidelity.md, 'Fidelity'. Underflow: gradient elements that are 0 in the mode and not "
    "in float64."
)


def _scale(r: dict[str, Any], ref: dict[str, Any] | None) -> Cell:
    value = r.get("fidelity_loss_scale")
    if value is None and r.get("grad_rel_err_vs_fp64") is not None:
        return Cell(None, "none")  # a mode without loss scaling: nothing is missing
    if value is None:
        return Cell(None, "not measured", why(r, "grad_rel_err_vs_fp64"))
    return Cell(value, f"{value:,.0f}")


FIDELITY_COLUMNS: list[tuple[str, str, Callable[..., Cell]]] = [
    ("mode", "mode", lambda r, ref: Cell(r.get("mode"), str(r.get("mode")))),
    ("grad_cos_vs_fp64", "grad cosine vs fp64", field("grad_cos_vs_fp64", ".7f")),
    ("grad_rel_err_vs_fp64", "grad rel. L2 error vs fp64", field("grad_rel_err_vs_fp64", ".2e")),
    ("grad_max_abs_err_vs_fp64", "grad max abs. error", field("grad_max_abs_err_vs_fp64", ".2e")),
    ("update_cos_vs_fp64", "update cosine vs fp64", field("update_cos_vs_fp64", ".5f")),
    ("update_rel_err_vs_fp64", "update rel. L2 error vs fp64", field("update_rel_err_vs_fp64", ".2e")),
    ("grad_underflow_pct", "grad underflow (%)", field("grad_underflow_frac", ".4f", 100)),
    ("scaled_grad_underflow_pct", "underflow before unscaling (%)", field("scaled_grad_underflow_frac", ".4f", 100)),
    ("grad_overflow_pct", "grad inf/NaN (%)", field("grad_overflow_frac", ".4f", 100)),
    ("fidelity_loss_diff", "loss - fp64 loss (nats)", field("fidelity_loss_diff", "+.2e")),
    ("fidelity_loss_scale", "loss scale", _scale),
]  # fmt: skip
FIDELITY_HEADERS = [header for _, header, _ in FIDELITY_COLUMNS]


def fidelity_cells(r: dict[str, Any]) -> list[Cell]:
    """The fidelity columns of one record."""
    return [make(r, None) for _, _, make in FIDELITY_COLUMNS]
