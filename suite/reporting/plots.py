"""Loss curves per mode as a PNG (matplotlib, no display needed), in the report's colours."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from suite.reporting.charts import (
    FP32_COLOUR,
    MIN_FONT_PT,
    TITLE_CHARS,
    emulated_handle,
    mode_colour,
    new_figure,
    save,
)


def plot_loss_curves(records: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Two panels: training loss per step (held-out points, the loss floor), and below it each
    mode's training loss minus fp32's at the same step, where precision effects are visible.
    Each mode has its fixed colour; an emulated mode's line is dashed."""
    fig, ax, diff = loss_panels()
    curves = [r for r in records if r.get("loss_curve")]
    fp32 = next((r for r in curves if r["mode"] == "fp32"), None)
    for r in curves:
        label = r["mode"] if r["status"] == "ok" else f"{r['mode']} ({r['status']})"
        label += " (emulated)" if r.get("emulated") else ""
        style = dict(color=mode_colour(r["mode"]), ls="--" if r.get("emulated") else "-")
        losses = r["loss_curve"]  # a NaN is a gap in the line
        steps = range(1, len(losses) + 1)
        ax.plot(steps, losses, label=label, lw=1.2, zorder=3 if r is fp32 else 2, **style)  # fp32 on top
        for step, loss in r.get("eval_curve") or []:
            ax.plot(step, loss, "o", color=style["color"], ms=4)
        if fp32 is not None and r is not fp32:
            ref = fp32["loss_curve"]
            diff.plot(steps, [a - b for a, b in zip(losses, ref, strict=False)], lw=1, **style)
    if curves:
        c = curves[0]
        text = title or f"{c['model']}, batch {c['batch_size']} x {c['seq_len']}, seed {c['seed']}"
        ax.set_title(textwrap.fill(text, TITLE_CHARS), fontsize=9)
    ax.set_ylabel("loss (nats/token)\ndots: held-out, fp32 eval", fontsize=9)
    diff_label = "loss - fp32 loss" if fp32 else "no fp32 in these records"
    finish_loss_panels(fig, ax, diff, curves, diff_label, any(r.get("emulated") for r in curves))
    return save(fig, Path(path))


def loss_panels() -> tuple[Any, Any, Any]:
    """(figure, loss panel, difference-to-fp32 panel below it, sharing the step axis): every loss chart's layout."""
    fig = new_figure(5.6)
    ax, diff = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    return fig, ax, diff


def finish_loss_panels(fig: Any, ax: Any, diff: Any, records: Sequence[dict[str, Any]], diff_label: str,
                       emulated: bool) -> None:  # fmt: skip
    """What every loss chart ends with: the corpus' loss floor, the difference panel's zero line (fp32) and
    labels, grids, tick sizes, and the legend under the chart (with the dashed-line key when a mode is emulated)."""
    for floor in {r["loss_floor"] for r in records if r.get("loss_floor") is not None}:
        ax.axhline(floor, color="0.5", ls=":", lw=1, label=f"loss floor {floor:.3f}")
    diff.axhline(0, color=FP32_COLOUR, lw=0.8)
    diff.set_ylabel(diff_label, fontsize=9)
    diff.set_xlabel("step", fontsize=9)
    for a in (ax, diff):
        a.grid(alpha=0.3)
        a.tick_params(labelsize=9)
    handles, _ = ax.get_legend_handles_labels()
    if emulated:
        handles.append(emulated_handle())
    fig.legend(handles=handles, loc="outside lower center", fontsize=MIN_FONT_PT, ncol=2, frameon=False)
