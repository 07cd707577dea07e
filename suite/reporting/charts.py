"""Charts of a report: one colour per mode (fp32's its own), emulated modes hatched or dashed, legible at 800 px.

Every chart is saved by `save`, which measures the smallest text on it and writes that, with
the DPI, into the PNG's metadata: the page shows each PNG at most at its own pixel size, so
MIN_FONT_PT at DPI is the smallest text a reader sees on a window wide enough for it (tests
read the metadata of every chart; see tests/test_report_legible.py).
"""

from __future__ import annotations

import textwrap
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: reports are built on headless CI runners
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.text import Text  # noqa: E402

DPI = 100
WIDTH_IN = 5.8  # 580 px: two charts side by side in a 1280 px window, one at full size in 800 px
MAX_WIDTH_PX = 750  # no chart wider: an 800 px window (minus the page margins) shows it unscaled
MIN_FONT_PT = 8.0  # 8 pt at 100 DPI is 11 px: nothing smaller is drawn
FONT_KEY, DPI_KEY, CUT_KEY = "mpbench:min_font_pt", "mpbench:dpi", "mpbench:cut_text"  # PNG text that `save` writes
FP32_COLOUR = "#222222"  # the reference: near-black, which no other mode uses
MODE_COLOURS = {
    "fp32": FP32_COLOUR, "tf32": "#17becf", "amp-fp16": "#ff7f0e", "bf16": "#1f77b4", "pure-fp16": "#d62728",
    "pure-bf16": "#2ca02c", "pure-bf16-sr": "#bcbd22", "int8-weight": "#8c564b", "int8-mixed": "#e377c2",
    "fp8-tensorwise": "#9467bd", "fp8-rowwise": "#393b79", "mxfp8": "#8c6d31",
}  # fmt: skip
SPARE_COLOURS = ("#e7ba52", "#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1")
TITLE_CHARS = 68  # characters per title line at 9 pt in WIDTH_IN
EMULATED_HATCH = "///"
EMULATED_LEGEND = "hatched or dashed: emulated kernels (a time, not a speed)"


def mode_colour(mode: str) -> str:
    """The mode's fixed colour in every chart; a mode not listed gets a spare one, the same every time."""
    return MODE_COLOURS.get(mode) or SPARE_COLOURS[zlib.crc32(mode.encode()) % len(SPARE_COLOURS)]


def emulated_handle() -> Patch:
    """The legend entry that says what hatching (bars) and dashes (lines) mean."""
    return Patch(facecolor="white", edgecolor="0.3", hatch=EMULATED_HATCH, label=EMULATED_LEGEND)


def new_figure(height_in: float, width_in: float = WIDTH_IN) -> Figure:
    """A figure of the page's size; constrained layout keeps legends below the axes inside it."""
    return plt.figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _texts(fig: Figure) -> list[Text]:
    """Every text drawn on the figure: ticks, labels, titles, legend entries, notes."""
    fig.canvas.draw()
    hidden = set()  # tick labels beyond the axis limits: matplotlib keeps them but does not draw them
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - 1e-9 * (hi - lo) <= tick.get_loc() <= hi + 1e-9 * (hi - lo):
                    hidden |= {id(tick.label1), id(tick.label2)}
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def legibility(fig: Figure) -> tuple[float, list[str]]:
    """The smallest font size (pt) on the figure, and the texts that reach past its edges (cut off)."""
    texts, box = _texts(fig), fig.bbox
    cut = [t.get_text() for t in texts if (e := t.get_window_extent()).x0 < box.x0 - 1 or e.x1 > box.x1 + 1
           or e.y0 < box.y0 - 1 or e.y1 > box.y1 + 1]  # fmt: skip
    return min((t.get_fontsize() for t in texts), default=MIN_FONT_PT), cut


def save(fig: Figure, path: Path) -> Path:
    """Write the PNG with, in its metadata, its DPI, its smallest font and the texts cut off at its
    edges (tests hold every chart to MIN_FONT_PT, MAX_WIDTH_PX and no cut text; a report still saves)."""
    smallest, cut = legibility(fig)
    meta = {FONT_KEY: f"{smallest:g}", DPI_KEY: str(DPI), CUT_KEY: "\n".join(cut)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata=meta)
    plt.close(fig)
    return path


def _label(value: float) -> str:
    """3 significant digits (1.00, 0.226, 581), large figures (MiB, ms) in full: 30,000 rather than 3e+04."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:#.3g}".rstrip(".")


def bar_chart(
    path: Path,
    title: str,
    ylabel: str,
    modes: list[str],
    series: dict[str, list[float | None]],
    absent: dict[str, list[str]],
    emulated: list[bool],
    errors: tuple[list[float | None], list[float | None]] | None = None,
    hline: float | None = None,
    flags: list[str] | None = None,
    note: str | None = None,
) -> Path:
    """Grouped bars (one group per mode, one bar per series) with their values printed on them.

    Bars take the mode's colour; a second series is the same colour, lighter. `absent[name][i]`
    is written where mode i has no value ("not measured", "skipped"), so a missing bar is never
    read as zero. Emulated modes are hatched. `errors` are (low, high) absolute values around
    the first series; `flags[i]` follows mode i's first value ("noisy"); `note` is one line
    under the title (a series no mode has, said once).
    """
    fig = new_figure(4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    top = max((v for vals in series.values() for v in vals if v is not None), default=1.0)
    if errors is not None:
        top = max([top] + [v for v in errors[1] if v is not None])
    colours = [mode_colour(m) for m in modes]
    upright = len(modes) * len(series) > 8  # level value labels of a dozen bars overlap: stand them up
    for s, (name, values) in enumerate(series.items()):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(modes))]
        present = [i for i, v in enumerate(values) if v is not None]
        yerr = None
        if errors is not None and s == 0:
            lo, hi = errors
            yerr = [
                [values[i] - lo[i] if lo[i] is not None else 0 for i in present],
                [hi[i] - values[i] if hi[i] is not None else 0 for i in present],
            ]
        bars = ax.bar([xs[i] for i in present], [values[i] for i in present], width, yerr=yerr,
                      capsize=4 if yerr else 0, color=[colours[i] for i in present], alpha=1.0 if s == 0 else 0.45,
                      hatch=[EMULATED_HATCH if emulated[i] else None for i in present], edgecolor="0.25",
                      linewidth=0.6)  # fmt: skip
        texts = [_label(values[i]) + (f" {flags[i]}" if flags and flags[i] and s == 0 else "") for i in present]
        ax.bar_label(bars, labels=texts, fontsize=MIN_FONT_PT, padding=2, rotation=90 if upright else 0)
        for i, v in enumerate(values):
            if v is None and emulated[i]:  # no bar to hatch: hatch the mode's empty slot, lightly
                ax.axvspan(xs[i] - width / 2, xs[i] + width / 2, facecolor="none", hatch=EMULATED_HATCH,
                           edgecolor="0.8", linewidth=0)  # fmt: skip
            if v is None:
                text = f"{name}: {absent[name][i]}" if len(series) > 1 else absent[name][i]
                ax.text(xs[i], top * 0.02, text, rotation=90, ha="center", va="bottom", fontsize=MIN_FONT_PT,
                        color="0.35")  # fmt: skip
    if hline is not None:
        ax.axhline(hline, color=FP32_COLOUR, lw=0.8, ls="--")
    labels = [m + (" (emulated)" if e else "") for m, e in zip(modes, emulated, strict=True)]
    crowded = len(modes) > 4 or any(emulated)  # longer names overlap when level
    ax.set_xticks(range(len(modes)), labels, fontsize=9, rotation=25 if crowded else 0,
                  ha="right" if crowded else "center")  # fmt: skip
    ax.tick_params(axis="y", labelsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(textwrap.fill(title, TITLE_CHARS) + (f"\n{note}" if note else ""), fontsize=9)
    ax.set_ylim(0, top * (1.45 if upright else 1.2))  # room for the value labels
    ax.set_xlim(-0.5, len(modes) - 0.5)  # every mode has its slot, with or without a bar
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor="0.45", alpha=1.0 if s == 0 else 0.45, edgecolor="0.25", label=name)
               for s, name in enumerate(series)] if len(series) > 1 else []  # fmt: skip
    if any(emulated):
        handles.append(emulated_handle())
    if handles:
        fig.legend(handles=handles, loc="outside lower center", fontsize=MIN_FONT_PT, ncol=1, frameon=False)
    return save(fig, path)


def layer_chart(
    path: Path, title: str, tensors: list[str], panels: dict[str, dict[str, list[float | None]]], emulated: set[str]
) -> Path:
    """One panel per figure (e.g. gradient and update relative error), x = tensor in model order,
    one line per mode (dashed: emulated), log y. A zero, missing or non-finite value is a gap in
    its line, never a 0."""
    fig = new_figure(2.8 + 2.6 * len(panels), width_in=7.4)
    axes = fig.subplots(len(panels), 1, sharex=True)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (ylabel, series) in zip(axes, panels.items(), strict=True):
        for mode, values in series.items():
            ys = [v if v is not None and 0 < v < float("inf") else float("nan") for v in values]
            ax.plot(range(len(tensors)), ys, marker="o", ms=3, lw=1.2, label=mode, color=mode_colour(mode),
                    ls="--" if mode in emulated else "-")  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=MIN_FONT_PT)
        ax.grid(alpha=0.3, which="both")
    every = max(1, -(-len(tensors) // 45))  # at most ~45 names at 8 pt: gpt2-xl has ~580 tensors
    axes[-1].set_xticks(range(0, len(tensors), every), tensors[::every], rotation=90, fontsize=MIN_FONT_PT)
    axes[0].set_title(textwrap.fill(title, 95), fontsize=9)
    handles, _ = axes[0].get_legend_handles_labels()
    if emulated & set(next(iter(panels.values()), {})):
        handles.append(emulated_handle())
    fig.legend(handles=handles, loc="outside upper center", fontsize=MIN_FONT_PT, ncol=4, frameon=False)
    return save(fig, path)
