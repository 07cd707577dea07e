"""The report's first section: per mode, the three figures a reader looks for first.

Speed-up and loss delta are against the fp32 case of the same group; peak memory carries its
unit and source. A missing figure reads "not measured" with the record's reason as a footnote,
and a speed-up from too-spread step times is marked "(noisy)" (see table.NOISY_SPREAD).
"""

from __future__ import annotations

import html
import statistics
from typing import Any

from suite.reporting import table
from suite.reporting.seed_groups import SeedSet, interval, verdict_text

HEADERS = ["mode", "speed-up over fp32 (x)", "loss delta vs fp32 (nats/token)", "peak memory"]
ABOUT = (
    "Each mode against fp32 of the same case. (noisy): the step time's p10-p90 spread is over "
    f"{table.NOISY_SPREAD:.0%} of its median, too wide to support a speed-up. "
    "The tables below have every figure, with units and reasons."
)
SINGLE_SEED = (
    'Single seed: a table above without "over seeds" has each loss delta from one seed, which seed noise alone '
    "can move; `mpbench run --seeds 5` judges each mode over seeds, with a 95% interval and a verdict."
)
SEED_HEADERS = [
    "mode",
    "speed-up over fp32 (x), median over seeds",
    "loss delta vs fp32 over seeds (nats/token): mean [95% CI], verdict",
    "peak memory, largest over seeds",
]


def reference(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ok fp32 record of a group, which speed-ups and loss deltas are against."""
    return next((r for r in group if r.get("mode") == "fp32" and r.get("status") == "ok"), None)


def _memory(r: dict[str, Any], cell: table.Cell) -> table.Cell:
    """Peak memory with its unit and source in the cell: "312 MiB (rss)"."""
    if cell.missing:
        return cell
    source = f" ({r['peak_mem_source']})" if r.get("peak_mem_source") else ""
    return table.Cell(cell.value, f"{cell.value:,.0f} MiB{source}", cell.reason, cell.suspect)


def rows(group: list[dict[str, Any]]) -> list[list[table.Cell]]:
    """One row per record of a group: mode, speed-up, loss delta, peak memory."""
    names = [name for name, _, _ in table.COLUMNS]
    ref = reference(group)
    out = []
    for r in group:
        by_name = dict(zip(names, table.cells(r, ref), strict=True))
        loss = by_name["loss_delta_vs_fp32"]
        if r is ref and not loss.missing:
            loss = table.Cell(loss.value, "0 (the reference)")
        out.append([by_name["mode"], by_name["speedup_vs_fp32"], loss, _memory(r, by_name["peak_mem_mb"])])
    return out


def seed_rows(s: SeedSet) -> list[list[table.Cell]]:
    """One row per mode of a case run on several seeds: the median speed-up over seeds (each seed against
    its own fp32), the verdict over seeds with the mean delta and its interval, the largest peak memory."""
    names = [name for name, _, _ in table.COLUMNS]
    refs = {r.get("seed"): r for r in s.records if r.get("mode") == "fp32" and r.get("status") == "ok"}
    out = []
    for v in s.verdicts:
        mine = [dict(zip(names, table.cells(r, refs.get(r.get("seed"))), strict=True)) for r in s.records
                if r.get("mode") == v.mode]  # fmt: skip
        ups = [c["speedup_vs_fp32"] for c in mine]
        values = [c.value for c in ups if c.value is not None]
        noisy = next((c.reason for c in ups if c.noisy), None)
        speed = (table.Cell(statistics.median(values), f"{statistics.median(values):.2f} ({len(values)} seeds)"
                            + (f" ({table.NOISY})" if noisy else ""), noisy, noisy=bool(noisy)) if values
                 else next((c for c in ups), table.Cell(None, table.NOT_MEASURED, "no record")))  # fmt: skip
        if v.outcome == "reference":
            loss = table.Cell(0.0, "0 (the reference)")
        elif v.delta.mean is None:
            loss = table.Cell(None, f"{table.NOT_MEASURED}: {verdict_text(v)}", v.detail or None)
        else:
            loss = table.Cell(v.delta.mean, f"{interval(v.delta)}: {verdict_text(v)}", suspect=v.outcome == "FAIL")
        peaks = [(c["peak_mem_mb"], r) for c, r in zip(mine, [r for r in s.records if r.get("mode") == v.mode],
                                                       strict=True)]  # fmt: skip
        measured = [(c, r) for c, r in peaks if not c.missing]
        memory = _memory(*max(measured, key=lambda cr: cr[0].value)[::-1]) if measured else peaks[0][0]
        out.append([mine[0]["mode"], speed, loss, memory])
    return out


def section(
    groups: list[tuple[str, list[dict[str, Any]]]], seeded: list[tuple[str, SeedSet]] | None = None
) -> tuple[str, str]:
    """The "At a glance" section (HTML, Markdown): a small table per group, titled when there are several;
    a case run on several seeds (`seeded`) is one table over its seeds, with each mode's verdict."""
    notes, md_notes = table.Notes(), table.Notes()
    page = ["<h2>At a glance</h2>", f"<p>{html.escape(ABOUT)}</p>"]
    md = ["## At a glance", "", ABOUT]
    tables = [(t, rows(g), HEADERS) for t, g in groups] + [(t, seed_rows(s), SEED_HEADERS) for t, s in seeded or []]
    for title, body, headers in tables:
        if len(tables) > 1:
            page.append(f"<h4>{html.escape(title)}</h4>")
            md += ["", f"**{title}**"]
        page.append(table.to_html(body, notes, headers))
        md += ["", table.to_markdown(body, md_notes, headers)]
    if groups and any(r.get("loss_delta_vs_fp32") is not None for _, g in groups for r in g):
        page.append(f"<p>{html.escape(SINGLE_SEED)}</p>")
        md += ["", SINGLE_SEED]
    page.append(table.notes_html(notes))
    md += ["", table.notes_markdown(md_notes)]
    return "".join(page), "\n".join(md)
