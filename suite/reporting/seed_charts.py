"""The charts of a case run on several seeds: each mode's delta vs fp32 with its 95% interval, and the
loss curves as a mean over seeds with a band. Same colours, sizes and legibility rules as charts.py."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D

from suite.reporting.charts import (
    FP32_COLOUR,
    MIN_FONT_PT,
    TITLE_CHARS,
    emulated_handle,
    mode_colour,
    new_figure,
    save,
)
from suite.reporting.plots import finish_loss_panels, loss_panels
from suite.reporting.seeds import ModeVerdict

SHORT = {"pass": "pass", "FAIL": "FAIL", "inconclusive": "inconclusive", "lags (expected)": "lags (expected)"}
BAND = "min..max"  # what the loss chart's band spans, said in its caption


def interval_chart(path: Path, title: str, verdicts: list[ModeVerdict], emulated: set[str]) -> Path:
    """One point per mode (its mean paired delta vs fp32) with error bars spanning exactly its 95% interval,
    a line at zero (fp32), and a grey tick at the mode's tolerance. A mode with one seed has a point and
    no bars; one without a delta is named "no delta" in its slot, never drawn at 0."""
    shown = [v for v in verdicts if v.outcome != "reference"]
    fig = new_figure(4.0 if len(shown) <= 6 else 5.4)  # a dozen rotated "mode: verdict" labels take height
    ax = fig.add_subplot()
    tick = min(22.0, 200.0 / max(len(shown), 1))  # the tolerance mark: as wide as a mode's slot allows
    heights = [0.0]
    for i, v in enumerate(shown):
        d, style = v.delta, dict(color=mode_colour(v.mode), ls="--" if v.mode in emulated else "-")
        if d.mean is None:
            ax.text(i, 0, "no delta", rotation=90, ha="center", va="bottom", fontsize=MIN_FONT_PT, color="0.35")
            continue
        if d.ci_low is not None and d.ci_high is not None:
            bars = ax.errorbar([i], [d.mean], yerr=[[d.mean - d.ci_low], [d.ci_high - d.mean]], fmt="o", ms=6,
                               capsize=6, elinewidth=1.6, color=style["color"], label=f"interval:{v.mode}")  # fmt: skip
            bars[2][0].set_linestyle(style["ls"])
            heights += [d.ci_low, d.ci_high]
        else:
            ax.plot([i], [d.mean], "o", ms=6, mfc="white", color=style["color"], gid=f"interval:{v.mode}")
            heights.append(d.mean)
        if v.tolerance is not None:
            ax.plot([i], [v.tolerance.max_delta], marker="_", ms=tick, mew=2, color="0.45", gid=f"tolerance:{v.mode}")
            heights.append(v.tolerance.max_delta)
    ax.axhline(0, color=FP32_COLOUR, lw=0.8)
    lo, hi = min(heights), max(heights)
    pad = (hi - lo) * 0.12 or 0.01
    ax.set_ylim(lo - pad, hi + pad)
    labels = [f"{v.mode}{' (emulated)' if v.mode in emulated else ''}: {SHORT.get(v.outcome, v.outcome)}"
              + (" (better?)" if v.better else "") for v in shown]  # fmt: skip
    ax.set_xticks(range(len(shown)), labels, fontsize=MIN_FONT_PT, rotation=30, ha="right")
    ax.set_xlim(-0.5, max(len(shown), 1) - 0.5)
    ax.tick_params(axis="y", labelsize=9)
    ax.set_ylabel("final held-out loss - fp32's\n(nats/token, paired by seed)", fontsize=9)
    ax.set_title(textwrap.fill(title, TITLE_CHARS), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    handles = [
        Line2D([], [], marker="o", color="0.3", label="mean over seeds; bars: its 95% interval (Student t)"),
        Line2D([], [], marker="_", ms=14, mew=2, ls="none", color="0.45", label="the mode's tolerance"),
        Line2D([], [], color=FP32_COLOUR, lw=0.8, label="0: fp32"),
    ]
    if emulated:
        handles.append(emulated_handle())
    fig.legend(handles=handles, loc="outside lower center", fontsize=MIN_FONT_PT, ncol=1, frameon=False)
    return save(fig, path)


def _columns(curves: list[list[float]]) -> list[list[float]]:
    """Per step, the finite values of every curve that reaches it (a NaN is no value, not a 0)."""
    length = max((len(c) for c in curves), default=0)
    return [[c[s] for c in curves if s < len(c) and math.isfinite(c[s])] for s in range(length)]


def _band(ax: Any, curves: list[list[float]], colour: str, ls: str, label: str | None, gid: str) -> None:
    """The mean of `curves` per step as a line, their min..max as a band around it."""
    cols = _columns(curves)
    steps = [s + 1 for s, col in enumerate(cols) if col]
    mean = [sum(col) / len(col) for col in cols if col]
    ax.plot(steps, mean, color=colour, ls=ls, lw=1.2, label=label, gid=f"mean:{gid}")
    ax.fill_between(steps, [min(c) for c in cols if c], [max(c) for c in cols if c], color=colour, alpha=0.18,
                    lw=0, gid=f"band:{gid}")  # fmt: skip


def loss_band_chart(path: Path, title: str, records: list[dict[str, Any]]) -> Path:
    """Two panels like the single-seed loss chart: each mode's training loss as the mean over its seeds
    with a min..max band, and below it the paired difference to fp32 (same seed, same step), mean and band."""
    fig, ax, diff = loss_panels()
    ok = [r for r in records if r.get("status") == "ok" and r.get("loss_curve")]
    fp32 = {r.get("seed"): r["loss_curve"] for r in ok if r["mode"] == "fp32"}
    modes = list(dict.fromkeys(sorted((r["mode"] for r in ok), key=lambda m: m != "fp32")))
    emulated = {r["mode"] for r in ok if r.get("emulated")}
    counts = {m: sum(r["mode"] == m for r in ok) for m in modes}
    for mode in modes:
        mine = [r for r in ok if r["mode"] == mode]
        colour, ls = mode_colour(mode), "--" if mode in emulated else "-"
        label = mode + (" (emulated)" if mode in emulated else "")
        label += f", {len(mine)} seeds" if len(set(counts.values())) > 1 else ""  # else said once, on the axis
        _band(ax, [r["loss_curve"] for r in mine], colour, ls, label, mode)
        paired = [[a - b for a, b in zip(r["loss_curve"], fp32[r.get("seed")], strict=False)]
                  for r in mine if r.get("seed") in fp32]  # fmt: skip
        if mode != "fp32" and paired:
            _band(diff, paired, colour, ls, None, mode)
    ax.set_title(textwrap.fill(title, TITLE_CHARS), fontsize=9)
    n = f"{next(iter(counts.values()))} " if len(set(counts.values())) == 1 else ""
    ax.set_ylabel(f"loss (nats/token): mean,\nband {BAND} over {n}seeds", fontsize=9)
    diff_label = "loss - fp32 loss\n(same seed)" if fp32 else "no fp32 in these records"
    finish_loss_panels(fig, ax, diff, ok, diff_label, bool(emulated))
    return save(fig, path)
