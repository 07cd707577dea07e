"""Bar charts of a report, one per figure, each mode a bar; a mode without the figure says so on the chart."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: reports are built on headless CI runners
import matplotlib.pyplot as plt  # noqa: E402


def _label(value: float) -> str:
    """4 significant digits, large figures (MiB, tokens) in full: 30,000 rather than 3e+04."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def bar_chart(
    path: Path,
    title: str,
    ylabel: str,
    labels: list[str],
    series: dict[str, list[float | None]],
    absent: list[str],
    errors: tuple[list[float | None], list[float | None]] | None = None,
    hline: float | None = None,
) -> Path:
    """Grouped bars (one group per label, one bar per series) with their values printed on them.

    `absent[i]` is written where label i has no value ("not measured", "skipped"), so a missing
    bar is never read as zero. `errors` are (low, high) absolute values around the first series.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    width = 0.8 / len(series)
    top = max((v for vals in series.values() for v in vals if v is not None), default=1.0)
    if errors is not None:
        top = max([top] + [v for v in errors[1] if v is not None])
    for s, (name, values) in enumerate(series.items()):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(labels))]
        present = [i for i, v in enumerate(values) if v is not None]
        yerr = None
        if errors is not None and s == 0:
            lo, hi = errors
            yerr = [
                [values[i] - lo[i] if lo[i] is not None else 0 for i in present],
                [hi[i] - values[i] if hi[i] is not None else 0 for i in present],
            ]
        label = name if present else "_nolegend_"  # an empty series has no colour to show in a legend
        bars = ax.bar([xs[i] for i in present], [values[i] for i in present], width, label=label, yerr=yerr,
                      capsize=4 if yerr else 0, color=f"C{s}")  # fmt: skip
        ax.bar_label(bars, labels=[_label(values[i]) for i in present], fontsize=7, padding=2)
        for i, v in enumerate(values):
            if v is None:
                text = f"{name}: {absent[i]}" if len(series) > 1 else absent[i]
                ax.text(xs[i], top * 0.02, text, rotation=90, ha="center", va="bottom",
                        fontsize=7, color="0.4")  # fmt: skip
    if hline is not None:
        ax.axhline(hline, color="black", lw=0.8, ls="--")
    crowded = len(labels) > 6  # a dozen modes' names overlap when level
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")  # fmt: skip
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(textwrap.fill(title, 95), fontsize=8)
    ax.set_ylim(0, top * 1.18)  # room for the value labels
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def layer_chart(path: Path, title: str, tensors: list[str], panels: dict[str, dict[str, list[float | None]]]) -> Path:
    """One panel per figure (e.g. gradient and update relative error), x = tensor in model order,
    one line per mode, log y. A zero, missing or non-finite value is a gap in its line, never a 0."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.6, 2.8 + 2.4 * len(panels)), dpi=100, sharex=True)
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (ylabel, series) in zip(axes, panels.items(), strict=True):
        for s, (mode, values) in enumerate(series.items()):
            ys = [v if v is not None and 0 < v < float("inf") else float("nan") for v in values]
            ax.plot(range(len(tensors)), ys, marker="o", ms=3, lw=1.2, label=mode, color=f"C{s}")
        ax.set_yscale("log")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=4)
    every = max(1, -(-len(tensors) // 60))  # at most ~60 names: gpt2-xl has ~580 tensors
    axes[-1].set_xticks(range(0, len(tensors), every), tensors[::every], rotation=90, fontsize=6)
    axes[0].set_title(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
