"""A layer-sensitivity sweep shown: the table (console and report), its chart, and the report's section.

The report shows the section when its records hold several keep_high values of one mode beside fp32 records of the
same settings (what `mpbench sensitivity` writes); the figures and verdicts are suite/reporting/sensitivity.py's.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Callable
from pathlib import Path

from matplotlib.lines import Line2D

from suite.reporting import table
from suite.reporting.charts import FP32_COLOUR, MIN_FONT_PT, TITLE_CHARS, mode_colour, new_figure, save
from suite.reporting.seed_groups import interval
from suite.reporting.sensitivity import NONE, Row, Sensitivity, conclusion, gap_words, stability_words
from suite.text import slug

TITLE = "Which layers to keep high"
HEADERS = ["policy kept in bf16", "seeds", "final loss, mean", "recovered vs none (nats), mean [95% CI]",
           "sd over seeds", "share of the gap", "per seed", "verdict"]  # fmt: skip
ABOUT = (
    "Each policy trains the mode with those layers kept in bf16, on the same weights and batches as fp32 and as "
    "none (every layer the mode can convert converted). Per seed the gap is none's final held-out loss minus "
    "fp32's, and a policy's recovery is none's minus its own. Over seeds: the mean with its 95% Student t interval; "
    "a recovery whose interval holds 0 is inconclusive (the same as none within the noise), never a win."
)
Img = Callable[[Path, str], str]


def _per_seed(values: dict[int, float]) -> str:
    return ", ".join(f"{s}: {v:+.4f}" for s, v in values.items()) or "-"


def _name(r: Row) -> str:
    return r.policy + (" (mode default)" if r.default else "")


def cells(s: Sensitivity) -> list[list[table.Cell]]:
    """fp32 first (it recovers the whole gap by definition), then the candidates ranked, none last."""
    g = s.gap
    out = [[table.Cell("fp32", "fp32 (reference)"), table.Cell(g.n, str(g.n)),
            _figure(s.fp32.mean, ".4f", "fp32 did not finish"), _figure(g.mean, "", "no gap", interval(g)),
            _figure(g.sd, ".4f", "one seed"),
            _figure(1.0 if s.rows[-1].share is not None else None, ".0%", "no gap beyond the noise"),
            table.Cell(g.mean, _per_seed(s.gap_by_seed)),
            table.Cell(s.gap_verdict, f"the gap: {s.gap_verdict}")]]  # fmt: skip
    for r in s.rows:
        x = r.recovered
        out.append([table.Cell(r.policy, _name(r)), table.Cell(x.n, str(x.n)),
                    _figure(r.loss.mean, ".4f", "no finished seed"), _figure(x.mean, "", r.detail, interval(x)),
                    _figure(x.sd, ".4f", "one seed") if r.policy != NONE else table.Cell(None, "-"),
                    _figure(r.share, ".0%", "no gap beyond the noise to take a share of"),
                    table.Cell(x.mean, _per_seed(r.by_seed)),
                    table.Cell(r.verdict, r.verdict, r.detail or None)])  # fmt: skip
    return out


def _figure(value: float | None, spec: str, why: str, text: str | None = None) -> table.Cell:
    if value is None:  # a share of no gap is not a measurement that failed: a dash, with why
        return table.Cell(None, "-" if spec == ".0%" else table.NOT_MEASURED, why)
    return table.Cell(value, text if text is not None else format(value, spec))


def plain_rows(s: Sensitivity) -> list[list[str]]:
    """The table's text, for the console."""
    return [[c.text for c in row] for row in cells(s)]


def title(s: Sensitivity) -> str:
    z = s.settings
    return (f"{s.mode} on {s.model}, batch {z.get('batch_size')} x {z.get('seq_len')}, {z.get('steps')} steps, "
            f"{z.get('device')}, seeds {', '.join(map(str, sorted(s.gap_by_seed))) or '-'}")  # fmt: skip


def chart(s: Sensitivity, path: Path) -> Path:
    """One slot per candidate (ranked): its mean recovery with bars over its 95% interval and each seed as a small
    mark; a dashed line at the mean gap (what fp32 recovers), a line at 0 (none)."""
    rows = [r for r in s.rows if r.policy != NONE]
    fig = new_figure(4.2 if len(rows) <= 6 else 5.4)
    ax = fig.add_subplot()
    heights = [0.0]
    colour = mode_colour(s.mode)
    for i, r in enumerate(rows):
        x = r.recovered
        if x.mean is None:
            ax.text(i, 0, "no figure", rotation=90, ha="center", va="bottom", fontsize=MIN_FONT_PT, color="0.35")
            continue
        if x.ci_low is not None and x.ci_high is not None:
            ax.errorbar([i], [x.mean], yerr=[[x.mean - x.ci_low], [x.ci_high - x.mean]], fmt="o", ms=6, capsize=6,
                        elinewidth=1.6, color=colour, gid=f"recovered:{r.policy}")  # fmt: skip
            heights += [x.ci_low, x.ci_high]
        else:
            ax.plot([i], [x.mean], "o", ms=6, color=colour, gid=f"recovered:{r.policy}")
        seeds = list(r.by_seed.values())
        ax.plot([i + 0.15] * len(seeds), seeds, "x", ms=5, color="0.4", gid=f"seeds:{r.policy}")
        heights += [x.mean, *seeds]
    if s.gap.mean is not None:
        ax.axhline(s.gap.mean, color=FP32_COLOUR, ls="--", lw=0.9)
        heights.append(s.gap.mean)
    ax.axhline(0, color="0.5", lw=0.8)
    lo, hi = min(heights), max(heights)
    pad = (hi - lo) * 0.12 or 0.01
    ax.set_ylim(lo - pad, hi + pad)
    labels = [f"{_name(r)}: {r.verdict}" for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=MIN_FONT_PT, rotation=30, ha="right")
    ax.set_xlim(-0.5, max(len(rows), 1) - 0.5)
    ax.tick_params(axis="y", labelsize=9)
    ax.set_ylabel("loss recovered vs none\n(nats/token, paired by seed)", fontsize=9)
    ax.set_title(textwrap.fill(f"layer sensitivity: {title(s)}", TITLE_CHARS), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    handles = [
        Line2D([], [], marker="o", color=colour, label="mean over seeds; bars: its 95% interval (Student t)"),
        Line2D([], [], marker="x", ls="none", color="0.4", label="each seed"),
        Line2D([], [], color=FP32_COLOUR, ls="--", lw=0.9, label=f"the gap (fp32 recovers it all): {_gap(s)}"),
        Line2D([], [], color="0.5", lw=0.8, label="0: none (every layer converted)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", fontsize=MIN_FONT_PT, ncol=1, frameon=False)
    return save(fig, path)


def _gap(s: Sensitivity) -> str:
    return f"{s.gap.mean:+.4f} nats, {s.gap_verdict}" if s.gap.mean is not None else "not measured"


def words(s: Sensitivity) -> list[str]:
    """The conclusion, the gap and the ranking's stability, each verdict's detail once (naming its policies), and a
    line per case that did not finish."""
    details: dict[str, list[str]] = {}
    for r in s.rows:
        if r.detail and r.policy != NONE:
            details.setdefault(r.detail, []).append(r.policy)
    return [conclusion(s), gap_words(s), stability_words(s), *(f"{', '.join(p)}: {d}" for d, p in details.items()),
            *(f"not in the figures: {n}" for n in s.notes)]  # fmt: skip


def section(sweeps: list[tuple[str, Sensitivity]], out_dir: Path, img: Img) -> tuple[str, str, dict[str, Path]]:
    """(HTML, Markdown, PNGs by file name) of the section; ('', '', {}) without a sweep."""
    if not sweeps:
        return "", "", {}
    page = [f"<h2>{TITLE}</h2>", f"<p>{html.escape(ABOUT)}</p>"]
    md = [f"## {TITLE}", "", ABOUT]
    written: dict[str, Path] = {}
    for n, (machine, s) in enumerate(sweeps, start=1):
        heading = f"{machine}: {title(s)}"
        notes, md_notes = table.Notes(), table.Notes()
        body = cells(s)
        lines = words(s)
        strong = f"<p><strong>{html.escape(lines[0])}</strong></p>"
        page += [f"<h3>{html.escape(heading)}</h3>", strong, *(f"<p>{html.escape(x)}</p>" for x in lines[1:]),
                 table.to_html(body, notes, HEADERS), table.notes_html(notes)]  # fmt: skip
        md += ["", f"### {heading}", "", f"**{lines[0]}**", "", *(f"{x}\n" for x in lines[1:]),
               table.to_markdown(body, md_notes, HEADERS), "", table.notes_markdown(md_notes)]  # fmt: skip
        path = chart(s, out_dir / f"sensitivity{n}-{slug(s.mode)}-{slug(s.model)}.png")
        written[path.name] = path
        caption = "loss each policy recovers against none, mean and 95% interval over seeds; dashed: the gap"
        page.append(f'<div class="charts">{img(path, f"layer sensitivity ({caption})")}</div>')
        md.append(f"- layer sensitivity: ![layer sensitivity]({path.name}) {caption}")
    return "".join(page), "\n".join(md), written
