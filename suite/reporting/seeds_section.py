"""The report's "Convergence over seeds" section, shown when some case ran on two seeds or more.

Per case: the noise floor in words, one row per mode (the mean paired delta vs fp32 with its 95%
interval, the verdict against the mode's tolerance, the last-quarter delta, steps and seconds to
fp32's target loss with their spread, the excess loss as a fraction of fp32's), the deltas as
error bars and the loss curves as a mean over seeds with a band. The verdicts are seeds.judge's.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite.reporting import table
from suite.reporting.seed_charts import BAND, interval_chart, loss_band_chart
from suite.reporting.seed_groups import SeedSet, interval, noise_words, spread, verdict_text
from suite.reporting.seeds import ModeVerdict, SeedStats
from suite.text import slug

TITLE = "Convergence over seeds"
HEADERS = [
    "mode", "seeds", "final loss - fp32 (nats), mean [95% CI]", "sd over seeds (nats)", "tolerance (nats)",
    "verdict", "last-quarter delta (nats), mean [95% CI]", "steps to target, mean +- sd (range)",
    "seconds to target, mean +- sd (range)", "excess loss / fp32's, mean [95% CI]",
]  # fmt: skip
ABOUT = (
    "Each seed's fp32 is that seed's reference (same weights, same batches), so the deltas are paired. "
    "pass: the whole 95% interval of the mean delta (Student t) lies at or below the mode's tolerance; "
    "FAIL: it lies above; inconclusive: it straddles the tolerance (more seeds would settle it). "
    "A mode whose interval lies wholly below 0 is better than fp32 beyond noise: flagged for a look, never "
    "failed. Target loss: 90% of the way from fp32's start to its end, per seed; seconds only on real kernels."
)
CHARTS = (
    ("delta over seeds", "each mode's mean final-loss delta vs fp32, bars: its 95% interval; grey tick: the "
     "mode's tolerance; line at 0: fp32"),
    ("loss curves over seeds", f"training loss per step (nats/token): the mean over seeds, band {BAND} over "
     "seeds; below, minus the same seed's fp32"),
)  # fmt: skip
Img = Callable[[Path, str], str]


def _reason(records: list[dict[str, Any]], mode: str, field: str, fallback: str) -> str:
    """A record's own `*_reason` for a figure of this mode, else `fallback`."""
    mine = [r for r in records if r.get("mode") == mode]
    found = [str(r[f"{field}_reason"]) for r in mine if r.get(f"{field}_reason")]
    return "; ".join(dict.fromkeys(found)) or fallback


def _stat(s: SeedStats | None, text: Callable[[SeedStats], str], why: Callable[[], str]) -> table.Cell:
    if s is None or s.mean is None:
        return table.Cell(None, table.NOT_MEASURED, why())
    return table.Cell(s.mean, text(s))


def rows(s: SeedSet) -> list[list[table.Cell]]:
    """One row per mode (fp32 first), the figures of HEADERS."""
    return [_row(s, v) for v in s.verdicts]


def _row(s: SeedSet, v: ModeVerdict) -> list[table.Cell]:
    ref, tol, sd = v.outcome == "reference", v.tolerance, v.delta.sd
    mine = [r for r in s.records if r.get("mode") == v.mode]
    emulated = any(r.get("emulated") for r in mine)

    def why(field: str, fallback: str) -> Callable[[], str]:
        return lambda: _reason(s.records, v.mode, field, fallback)

    none = table.Cell(None, "-")  # the reference's delta figures: nothing to compare with itself
    no_seconds = "emulated kernels: a time, not a speed" if emulated else "not reached, or no step time"
    delta = table.Cell(0.0, "0 (the reference)") if ref else _stat(v.delta, interval, why("loss_delta", v.detail))
    if ref:
        sd_cell = none
    else:
        sd_cell = table.Cell(sd, f"{sd:.4f}") if sd is not None else table.Cell(None, table.NOT_MEASURED, "one seed")
    lag = " (expected to lag)" if tol is not None and tol.expected_to_lag else ""
    tol_cell = none if tol is None else table.Cell(tol.max_delta, f"{tol.max_delta:.3f}{lag}")
    last = none if ref else _stat(v.last_quarter, interval, why("loss_delta_last_quarter", "no paired loss curve"))
    reached = lambda x: spread(x, ".0f") + _reached(x, len(mine))  # noqa: E731
    steps = _stat(v.steps_to_target, reached, why("steps_to_target", "not reached"))
    return [
        # a non-default layer policy or 4-bit recipe is a seed set of its own: its label says which
        table.Cell(v.mode, (table.mode_label(mine[0]) if mine else v.mode) + (" (emulated)" if emulated else "")),
        table.Cell(len(v.seeds), str(len(v.seeds))),
        delta,
        sd_cell,
        tol_cell,
        table.Cell(v.outcome, verdict_text(v), v.detail or None, suspect=v.outcome == "FAIL" or v.better),
        last,
        steps,
        _stat(v.seconds_to_target, lambda x: spread(x, ".2f"), why("seconds_to_target", no_seconds)),
        _stat(v.excess_fraction, lambda x: interval(x, ".3f"), why("excess_fraction", "no loss floor known")),
    ]


def _reached(s: SeedStats, total: int) -> str:
    """', 3 of 5 seeds' when some seed never reached the target (its steps are not in the mean)."""
    return f", {s.n} of {total} seeds" if s.n < total else ""


def title(s: SeedSet) -> str:
    r = s.records[0]
    shown = ", ".join(map(str, s.seeds))
    schedule = f", lr {r.get('lr_schedule')}" if r.get("lr_schedule") else ""
    return (f"{r.get('model')}, batch {r.get('batch_size')} x {r.get('seq_len')}, {r.get('steps')} steps"
            f"{schedule}, seeds {shown} ({len(s.seeds)})")  # fmt: skip


def section(sets: list[tuple[str, SeedSet]], out_dir: Path, img: Img) -> tuple[str, str, dict[str, Path]]:
    """(HTML, Markdown, PNGs by file name) of the section; ('', '', {}) when no case has 2 seeds or more."""
    if not sets:
        return "", "", {}
    page = [f"<h2>{TITLE}</h2>", f"<p>{html.escape(ABOUT)}</p>"]
    md = [f"## {TITLE}", "", ABOUT]
    written: dict[str, Path] = {}
    for n, (machine, s) in enumerate(sets, start=1):
        heading = f"{machine}: {title(s)}"
        notes, md_notes = table.Notes(), table.Notes()
        body = rows(s)
        words = noise_words(s.floor)
        page += [f"<h3>{html.escape(heading)}</h3>", f"<p>{html.escape(words)}</p>",
                 table.to_html(body, notes, HEADERS), table.notes_html(notes)]  # fmt: skip
        md += ["", f"### {heading}", "", words, "", table.to_markdown(body, md_notes, HEADERS), "",
               table.notes_markdown(md_notes)]  # fmt: skip
        stem = f"seeds{n}-{slug(str(s.records[0].get('model')))}"
        emulated = {str(r["mode"]) for r in s.records if r.get("emulated")}
        paths = [interval_chart(out_dir / f"{stem}-delta.png", f"delta vs fp32 over seeds: {heading}", s.verdicts,
                                emulated),
                 loss_band_chart(out_dir / f"{stem}-loss.png", f"loss over seeds: {heading}", s.records)]  # fmt: skip
        images = []
        for path, (name, caption) in zip(paths, CHARTS, strict=True):
            written[path.name] = path
            images.append(img(path, f"{name} ({caption})"))
            md.append(f"- {name}: ![{name}]({path.name}) {caption}")
        page.append(f'<div class="charts">{"".join(images)}</div>')
    return "".join(page), "\n".join(md), written
