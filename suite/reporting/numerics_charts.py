"""The numerics charts: an SQNR heatmap (layers down, tensor roles across) and a figure per layer over the
sampled steps (amax, scale), in the sizes and legibility rules of charts.py.

The heatmap's colour scale is fixed (SQNR_SCALE_DB), never fitted to the data, so the same colour is the
same SQNR in every report and two pictures compare at a glance.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib as mpl
import numpy as np

from suite.reporting.charts import MIN_FONT_PT, TITLE_CHARS, new_figure, save
from suite.reporting.numerics_table import SATURATION_MARK, UNDERFLOW_MARK, Cell

# 0 dB: noise as strong as the signal; 80 dB: beyond fp16's ~74 dB, the most any format short of fp32
# keeps. Medians on the tiny GPT (results/numerics-example): MXFP4 19, NVFP4 20, e5m2 26, MXFP8 30,
# e4m3 32, int8 rowwise 44, bf16 56, fp16 and tf32 74 dB.
SQNR_SCALE_DB = (0.0, 80.0)
COLOURMAP = "viridis"  # perceptually even and readable with colour-blindness: dark = low SQNR, yellow = high
MISSING_GREY = "0.88"
EXACT, ALL_ZERO, NOT_RECORDED = "exact", "n/a", "-"
# a training run's tensor that reached its hook already in its format (amax recorded, the rest null: the
# rounding happened where it was produced; suite.training.numerics.ARRIVED)
ARRIVED = "arrived"
# a tensor holding inf or nan (amax inf/nan: an overflowed loss-scaled gradient, say) has a nan SQNR too: it is
# no all-zero tensor, and says so
NON_FINITE = "inf/nan"
LEGEND = (
    f"Colour: SQNR in dB on a fixed {SQNR_SCALE_DB[0]:g}-{SQNR_SCALE_DB[1]:g} dB scale (above it: the top "
    f"colour). {EXACT}: a lossless round trip (inf dB). U: over {UNDERFLOW_MARK:.1%} of the nonzero elements "
    f"flush to zero; S: over {SATURATION_MARK:.1%} of the elements saturate. {ALL_ZERO}: an all-zero "
    f"tensor; {NON_FINITE}: a tensor holding inf or nan; {ARRIVED}: already in the format when seen (its "
    f"rounding happened where it was produced: see mpbench numerics); {NOT_RECORDED}: not recorded or not measured."
)
LAYER_LEGEND_MAX = 12  # more layers than this: colour by depth, named by the first and the last


def cell_text(c: Cell | None) -> str:
    """What a heatmap cell says: the SQNR (or exact / n/a / inf/nan / arrived / -) and its U / S marks."""
    if c is not None and c.sqnr_db is None and c.amax is not None and c.underflow is None:
        return ARRIVED
    if c is None or c.sqnr_db is None:
        return NOT_RECORDED
    if math.isnan(c.sqnr_db):
        text = NON_FINITE if c.amax is not None and not math.isfinite(c.amax) else ALL_ZERO
    else:
        text = EXACT if c.sqnr_db == math.inf else f"{c.sqnr_db:.1f}"
    under = c.underflow is not None and c.underflow > UNDERFLOW_MARK
    marks = ("U" if under else "") + ("S" if c.saturation is not None and c.saturation > SATURATION_MARK else "")
    return f"{text} {marks}" if marks else text


def _value(c: Cell | None) -> float:
    """The colour value: inf at the top of the scale; nan (no colour, grey) for all-zero or not recorded."""
    if c is None or c.sqnr_db is None or math.isnan(c.sqnr_db):
        return math.nan
    return SQNR_SCALE_DB[1] if c.sqnr_db == math.inf else max(c.sqnr_db, SQNR_SCALE_DB[0])


def heatmap(path: Path, title: str, layers: list[str], columns: list[str], labels: list[str],
            cells: dict[tuple[str, str], Cell]) -> Path:  # fmt: skip
    """SQNR per (layer, column): layers down in model order, `columns` (roles) across with `labels` on top;
    each cell prints its SQNR and marks, so the figure reads without the colour bar too."""
    grid = [[cells.get((layer, col)) for col in columns] for layer in layers]
    values = np.array([[_value(c) for c in row] for row in grid], dtype=float).reshape(len(layers), len(columns))
    cmap = mpl.colormaps[COLOURMAP].with_extremes(bad=MISSING_GREY)
    norm = mpl.colors.Normalize(*SQNR_SCALE_DB, clip=True)
    fig = new_figure(2.2 + 0.26 * len(layers), width_in=5.6)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for i, row in enumerate(grid):
        for j, c in enumerate(row):
            v = values[i, j]
            r, g, b, _ = cmap(norm(v)) if not math.isnan(v) else (0.88, 0.88, 0.88, 1)
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # readable on its colour
            ax.text(j, i, cell_text(c), ha="center", va="center", fontsize=MIN_FONT_PT, color=ink)
    ax.set_xticks(range(len(columns)), labels, fontsize=MIN_FONT_PT)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(layers)), layers, fontsize=MIN_FONT_PT)
    ax.tick_params(length=0)
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.03)
    bar.set_ticks(np.arange(SQNR_SCALE_DB[0], SQNR_SCALE_DB[1] + 1, 10))
    bar.ax.tick_params(labelsize=MIN_FONT_PT)
    bar.set_label("SQNR (dB), fixed scale", fontsize=MIN_FONT_PT)
    fig.supxlabel(textwrap.fill(LEGEND, 84), fontsize=MIN_FONT_PT, color="0.25")
    return save(fig, path)


def over_steps(path: Path, title: str, ylabel: str, layers: list[str],
               panels: dict[str, dict[str, list[tuple[int, float]]]]) -> Path:  # fmt: skip
    """Small multiples, one panel per role: each layer's value (log y) over the sampled steps, one line per
    layer coloured by its depth in the model. A zero or non-finite value is a gap, never drawn at 0."""
    rows = -(-len(panels) // 2)
    fig = new_figure(1.4 + 2.1 * rows)
    axes = fig.subplots(rows, 2 if len(panels) > 1 else 1, sharex=True, squeeze=False).ravel()
    colour = mpl.colormaps["plasma"]
    depth = {layer: i / max(len(layers) - 1, 1) * 0.85 for i, layer in enumerate(layers)}  # 0.85: no pale yellow
    for ax, (role, series) in zip(axes, panels.items(), strict=False):
        for layer in layers:
            points = series.get(layer) or []
            ys = [v if 0 < v < math.inf else math.nan for _, v in points]
            ax.plot([s for s, _ in points], ys, marker="o", ms=3, lw=1.1, color=colour(depth[layer]), label=layer)
        ax.set_yscale("log")
        ax.set_title(role, fontsize=9)
        ax.tick_params(labelsize=MIN_FONT_PT)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    steps = sorted({s for series in panels.values() for points in series.values() for s, _ in points})
    for ax in axes[max(len(panels) - 2, 0) : len(panels)]:  # the bottom row
        ax.set_xlabel("sampled step", fontsize=MIN_FONT_PT)
        if len(steps) <= 12:  # a tick on each sampled step, none between
            ax.set_xticks(steps)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.supylabel(ylabel, fontsize=9)
    fig.suptitle(textwrap.fill(title, TITLE_CHARS), fontsize=9)
    if len(layers) <= LAYER_LEGEND_MAX:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", fontsize=MIN_FONT_PT, ncol=3, frameon=False)
    else:  # a legend of 49 or 193 names says nothing: the colour runs with depth
        fig.supxlabel(f"colour: layer depth, dark purple = {layers[0]} ... orange = {layers[-1]}",
                      fontsize=MIN_FONT_PT)  # fmt: skip
    return save(fig, path)
