"""The report's first section: per mode, the three figures a reader looks for first.

Speed-up and loss delta are against the fp32 case of the same group; peak memory carries its
unit and source. A missing figure reads "not measured" with the record's reason as a footnote,
and a speed-up from too-spread step times is marked "(noisy)" (see table.NOISY_SPREAD).
"""

from __future__ import annotations

import html
from typing import Any

from suite.reporting import table

HEADERS = ["mode", "speed-up over fp32 (x)", "loss delta vs fp32 (nats/token)", "peak memory"]
ABOUT = (
    "Each mode against fp32 of the same case. (noisy): the step time's p10-p90 spread is over "
    f"{table.NOISY_SPREAD:.0%} of its median, too wide to support a speed-up. "
    "The tables below have every figure, with units and reasons."
)


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


def section(groups: list[tuple[str, list[dict[str, Any]]]]) -> tuple[str, str]:
    """The "At a glance" section (HTML, Markdown): a small table per group, titled when there are several."""
    notes, md_notes = table.Notes(), table.Notes()
    page = ["<h2>At a glance</h2>", f"<p>{html.escape(ABOUT)}</p>"]
    md = ["## At a glance", "", ABOUT]
    for title, group in groups:
        body = rows(group)
        if len(groups) > 1:
            page.append(f"<h4>{html.escape(title)}</h4>")
            md += ["", f"**{title}**"]
        page.append(table.to_html(body, notes, HEADERS))
        md += ["", table.to_markdown(body, md_notes, HEADERS)]
    page.append(table.notes_html(notes))
    md += ["", table.notes_markdown(md_notes)]
    return "".join(page), "\n".join(md)
