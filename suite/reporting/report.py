"""A self-contained report of result records: one HTML page, its PNG charts, Markdown and CSV summaries.

Records are grouped by machine (GPU name, else CPU) and then by case (model, sizes, steps,
seed, data, run), so that a speed-up or a loss delta is always against the fp32 case of the
same run. The page embeds its images as data URIs and has no script and no external URL: it
opens from disk and can be attached to a ticket as one file.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from suite.records.cases import latest
from suite.reporting import glance, numerics_section, procurement, seed_groups, seeds_section
from suite.reporting import sensitivity as sensitivity
from suite.reporting import sensitivity_section as sensitivity_section
from suite.reporting import table as table
from suite.reporting.charts import bar_chart, layer_chart
from suite.reporting.convergence import Tolerances
from suite.reporting.fidelity_table import FIDELITY_CSV, FIDELITY_HEADERS, FIDELITY_NOTE, fidelity_cells
from suite.reporting.plots import plot_loss_curves
from suite.reporting.procurement import records_of
from suite.text import shown, slug

if TYPE_CHECKING:
    import pandas

REPORT_FILES = ("index.html", "summary.md", "summary.csv")  # and a PNG per chart
GROUP_KEYS = ("model", "batch_size", "seq_len", "steps", "warmup", "seed", "compile", "data", "data_sha256", "run_id")
ENVIRONMENT = (
    ("GPU", "gpu_name"), ("GPU memory (MiB)", "gpu_memory_mb"), ("GPU count", "gpu_count"), ("driver", "driver"),
    ("CUDA", "cuda"), ("torch", "torch"), ("Python", "python"), ("CPU", "cpu"), ("CPU cores", "cpu_count"),
    ("torch threads", "torch_threads"), ("host", "hostname"), ("platform", "platform"), ("git commit", "git_commit"),
)  # fmt: skip
CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1800px}
h1{font-size:22px}h2{font-size:18px;border-bottom:2px solid #446;margin-top:32px}h3{font-size:15px;margin-top:24px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#eef;vertical-align:bottom}
.scroll{overflow-x:auto}.nm{color:#888;font-style:italic}.notes{font-size:12px;color:#555}
.env td,td.text{text-align:left}.skipped{color:#855;font-size:12px}
.families{display:flex;flex-wrap:wrap;gap:4px 20px;align-items:flex-start}
h4{font-size:13px;margin:8px 0 0;color:#446}
.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.charts img{max-width:100%;height:auto}
"""


def machine_of(r: dict[str, Any]) -> str:
    """The machine a record ran on: its GPU, else its CPU."""
    return r.get("gpu_name") or f"CPU: {r.get('cpu') or 'unknown'}"


def _groups(records: list[dict[str, Any]]) -> dict[str, dict[tuple, list[dict[str, Any]]]]:
    """machine -> case -> records, in the order the records came."""
    out: dict[str, dict[tuple, list[dict[str, Any]]]] = {}
    for r in records:
        out.setdefault(machine_of(r), {}).setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
    return out


def _group_title(r: dict[str, Any]) -> str:
    data = f", data {r['data']}" if r.get("data") else ""
    compiled = ", compiled" if r.get("compile") else ""
    return (
        f"{r.get('model')}, batch {r.get('batch_size')} x {r.get('seq_len')}, {r.get('steps')} steps "
        f"({r.get('warmup')} warm-up), seed {r.get('seed')}{compiled}{data}, run {r.get('run_id')}"
    )


def _environment(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each environment field with every distinct value seen on this machine."""
    rows = []
    for label, key in ENVIRONMENT:
        values = []
        for r in records:
            v = r.get(key)
            if key == "git_commit" and v and r.get("git_dirty"):
                v = f"{v} (uncommitted changes)"
            if v is not None and str(v) not in values:
                values.append(str(v))
        gpu_field = key in ("gpu_name", "gpu_memory_mb", "driver", "cuda")
        empty = "none (CPU run)" if gpu_field and not any(r.get("gpu_name") for r in records) else "not recorded"
        rows.append((label, ", ".join(values) or empty))
    return rows


Chart = tuple[str, Path | None, str]  # (name, PNG or None, caption or why it was skipped)


def _charts(
    group: list[dict[str, Any]], rows: list[list[table.Cell]], stem: str, out_dir: Path, seeded: bool = False
) -> tuple[list[Chart], list[str]]:
    """The loss curves and each bar chart of one group, and a line for each series a chart leaves
    out because no finished mode has it (on a CPU: the allocator peak), said once instead of per bar."""
    modes, emulated = [str(r["mode"]) for r in group], [bool(r.get("emulated")) for r in group]
    col = {header: [row[i] for row in rows] for i, header in enumerate(table.HEADERS)}
    ok = [i for i, r in enumerate(group) if r.get("status") == "ok"]  # a skipped case explains nothing here

    def values(header: str) -> list[float | None]:
        return [c.value for c in col[header]]

    def absent(header: str) -> list[str]:
        """What a chart writes where a mode has no bar: its status, "emulated" or "not measured"."""
        return [str(r["status"]) if r.get("status") != "ok" else "emulated"
                if r.get("emulated") and (c.reason or "").startswith("emulated") else table.NOT_MEASURED
                for r, c in zip(group, col[header], strict=True)]  # fmt: skip

    def reasons(headers: list[str]) -> str:
        return "; ".join(sorted({col[h][i].reason or "" for h in headers for i in ok} - {""}))

    title = f"{machine_of(group[0])}: {_group_title(group[0])}"
    charts: list[Chart] = []
    if seeded:  # one seed of several: its curves are drawn once, as a mean with a band over the seeds
        charts.append(("loss curves", None, f"drawn over every seed of this case in '{seeds_section.TITLE}'"))
    elif any(r.get("loss_curve") for r in group):
        path = plot_loss_curves(group, out_dir / f"{stem}-loss.png", title=title)
        charts.append(("loss curves", path, "training loss per step (nats/token) and minus fp32's"))
    else:
        charts.append(("loss curves", None, "no record of this group has a loss curve"))
    if any(r.get("fidelity_layers") for r in group):
        charts.append(_layer_chart(group, title, out_dir / f"{stem}-fidelity-layers.png"))
    sources = sorted({str(r["peak_mem_source"]) for r in group if r.get("peak_mem_source")})
    memory = {f"peak ({', '.join(sources) or 'NVML/RSS'})": "peak memory NVML/RSS (MiB) (source)",
              "allocator peak": "allocator peak (MiB)"}  # fmt: skip
    specs = [
        ("step time", "step time, median (ms)", {"median": "step time, median (ms)"}, None),
        ("speed-up", "speed-up over fp32 (x), same group", {"speed-up": "speed-up over fp32 (x)"}, 1.0),
        ("peak memory", "peak memory (MiB)", memory, None),
        ("energy per token", "energy per token (mJ)", {"energy": "energy per token (mJ)"}, None),
    ]  # fmt: skip
    lines = []
    for name, ylabel, series, hline in specs:
        errors = None
        if name == "step time":
            errors = ([r.get("step_time_p10_ms") for r in group], [r.get("step_time_p90_ms") for r in group])
        if all(v is None for header in series.values() for v in values(header)):
            why = reasons(list(series.values())) or "no case of this group finished"
            charts.append((name, None, f"no mode has this figure: {why}"))
            continue
        note = f"whiskers: p10-p90; noisy: p10-p90 over {table.NOISY_SPREAD:.0%} of the median" if errors else None
        for label, header in list(series.items()):
            if len(series) > 1 and ok and all(values(header)[i] is None for i in ok):
                del series[label]  # e.g. no allocator peak on a CPU: one line, not a "not measured" per mode
                note = f"{label}: {table.NOT_MEASURED} for any mode (see below the charts)"
                lines.append(f"{name} chart: {label} {table.NOT_MEASURED} for any mode: {reasons([header])}")
        flags = [("(noisy)" if c.noisy else "") for c in col[next(iter(series.values()))]]
        path = out_dir / f"{stem}-{slug(name)}.png"
        bar_chart(path, f"{name}: {title}", ylabel, modes, {k: values(h) for k, h in series.items()},
                  {k: absent(h) for k, h in series.items()}, emulated, errors, hline, flags, note)  # fmt: skip
        charts.append((name, path, ylabel))
    return charts, lines


def _layer_chart(group: list[dict[str, Any]], title: str, path: Path) -> Chart:
    """Relative error vs float64 by tensor (model order), one line per mode, log scale; last step compared."""
    last = {r["mode"]: [x for x in r["fidelity_layers"] if x["step"] == max(y["step"] for y in r["fidelity_layers"])]
            for r in group if r.get("fidelity_layers")}  # fmt: skip
    tensors = list(dict.fromkeys(x["tensor"] for rows in last.values() for x in rows))
    panels = {}
    for key, label in (("grad_rel_err", "gradient rel. L2 error vs fp64"), ("update_rel_err", "update rel. error")):
        panels[label] = {mode: [{x["tensor"]: x.get(key) for x in rows}.get(t) for t in tensors]
                         for mode, rows in last.items()}  # fmt: skip
    layer_chart(path, f"fidelity by tensor: {title}", tensors, panels, {r["mode"] for r in group if r.get("emulated")})
    return "fidelity by tensor", path, "relative error vs float64 per parameter tensor (log); a gap: 0 or not compared"


def _img(path: Path, alt: str) -> str:
    """The PNG inline, at most its own pixel size (the charts' fonts are sized for that)."""
    data = path.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    return (f'<img alt="{html.escape(alt, quote=True)}" width="{width}" height="{height}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')  # fmt: skip


class _Document:
    """The page, the Markdown and the CSV rows, filled machine by machine and group by group."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.page: list[str] = []
        self.md: list[str] = []
        self.csv_rows: list[dict[str, Any]] = []
        self.written: dict[str, Path] = {}

    def machine(self, name: str, records: list[dict[str, Any]]) -> None:
        env = _environment(records)
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in env)
        self.page.append(f"<h2>{html.escape(name)}</h2><table class='env'>{rows}</table>")
        self.md += ["", f"## {name}", "", "| environment | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env)]

    def group(self, machine: str, stem: str, group: list[dict[str, Any]], seeded: bool = False) -> None:
        """The table of one group (footnotes numbered within it), its CSV rows and its charts."""
        ref = glance.reference(group)
        rows = [table.cells(r, ref) for r in group]
        for r, row in zip(group, rows, strict=True):
            case = {k: r.get(k) for k in GROUP_KEYS}
            fid = {k: r.get(k) for k in FIDELITY_CSV}
            self.csv_rows.append(
                {"machine": machine, **case, "source": r.get("source"), **table.csv_row(r, row), **fid}
            )
        title = _group_title(group[0])
        notes, md_notes = table.Notes(), table.Notes()
        self.page += [f"<h3>{html.escape(title)}</h3>", table.to_html(rows, notes)]
        self.page.append(table.notes_html(notes))
        self.md += ["", f"### {title}", "", table.to_markdown(rows, md_notes), "", table.notes_markdown(md_notes)]
        if any(r.get("fidelity_layers") for r in group):
            self._fidelity(group)
        images, skipped = [], []
        charts, lines = _charts(group, rows, stem, self.out_dir, seeded)
        for name, path, caption in charts:
            if path is None:  # said on the page, so a missing chart is never mistaken for a lost one
                skipped.append(f"<li>{html.escape(name)} chart skipped: {html.escape(caption)}</li>")
                self.md.append(f"- {name} chart skipped: {caption}")
                continue
            self.written[path.name] = path
            images.append(_img(path, f"{name} ({caption})"))
            self.md.append(f"- {name}: ![{name}]({path.name}) {caption}")
        self.page.append(f'<div class="charts">{"".join(images)}</div>')
        skipped += [f"<li>{html.escape(line)}</li>" for line in lines]
        self.md += [f"- {line}" for line in lines]
        if skipped:
            self.page.append(f'<ul class="skipped">{"".join(skipped)}</ul>')

    def _fidelity(self, group: list[dict[str, Any]]) -> None:
        """The float64 comparison's table, for a group where some record has one."""
        rows = [fidelity_cells(r) for r in group]
        notes, md_notes = table.Notes(), table.Notes()
        heads = FIDELITY_HEADERS
        body = table.to_html(rows, notes, heads)
        self.page += [
            f"<p>{html.escape(FIDELITY_NOTE)}</p>",
            f'<div class="scroll">{body}</div>',
            table.notes_html(notes),
        ]
        self.md += ["", FIDELITY_NOTE, "", table.to_markdown(rows, md_notes, heads), "", table.notes_markdown(md_notes)]

    def save(self) -> dict[str, Path]:
        doc = (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>mpbench report</title>'
            f"<style>{CSS}</style></head><body>{''.join(self.page)}</body></html>\n"
        )
        table_csv = io.StringIO(newline="")
        writer = csv.DictWriter(table_csv, fieldnames=list(self.csv_rows[0]))
        writer.writeheader()
        writer.writerows(self.csv_rows)
        texts = dict(zip(REPORT_FILES, (doc, "\n".join(self.md) + "\n", table_csv.getvalue()), strict=True))
        contents = {name: shown(text).encode("utf-8") for name, text in texts.items()}  # all before any is written
        paths = {name: self.out_dir / name for name in REPORT_FILES}
        for name, data in contents.items():
            paths[name].write_bytes(data)
        return self.written | paths


def build_report(
    df: pandas.DataFrame,
    out_dir: Path,
    prices: dict[str, float] | None = None,
    target_loss: float | None = None,
    tolerances: Tolerances | None = None,
) -> dict[str, Path]:
    """Write index.html, summary.md, summary.csv and the chart PNGs into `out_dir`; returns them by file name.
    A case run on 2 seeds or more is judged over its seeds against `tolerances` (default: the documented table)."""
    everything = records_of(df)
    if not everything:
        raise ValueError("records: nothing to report; load at least one record")
    records = latest(everything)  # a case retried in its run (--retry-failed) shows its retry
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = _Document(out_dir)
    sources = sorted({str(r.get("source")) for r in records if r.get("source")})
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (
        f"{len(records)} records from {', '.join(sources) or 'memory'}; generated {now}. "
        "Speed-up and loss deltas are against the fp32 case of the same group. "
        'A figure that could not be measured reads "not measured", with its reason as a tooltip and a footnote.'
    )
    if len(records) < len(everything):
        intro += f" {len(everything) - len(records)} earlier record(s) of cases run again in the same run are left out."
    doc.page.append(f"<h1>mpbench report</h1><p>{html.escape(intro)}</p>")
    doc.md += ["# mpbench report", "", intro]
    machines = _groups(records)
    sets = [(machine, s) for machine, groups in machines.items()
            for s in seed_groups.judged([r for g in groups.values() for r in g], tolerances)]  # fmt: skip
    in_sets = {id(r) for _, s in sets for r in s.records}
    single = [(f"{machine}: {_group_title(g[0])}", g) for machine, groups in machines.items() for g in groups.values()
              if not all(id(r) in in_sets for r in g)]  # fmt: skip
    glance_html, glance_md = glance.section(single, [(f"{m}: {seeds_section.title(s)}", s) for m, s in sets])
    doc.page.append(glance_html)  # first: what a reader came for, before the environment and every figure
    doc.md += ["", glance_md]
    seeds_html, seeds_md, pngs = seeds_section.section(sets, out_dir, _img)
    doc.page.append(seeds_html)  # the verdicts over seeds next: the convergence a single seed cannot show
    doc.md += ["", seeds_md] if seeds_md else []
    doc.written |= pngs
    sweeps = [(machine, s) for machine, groups in machines.items()
              for s in sensitivity.sweeps([r for g in groups.values() for r in g])]  # fmt: skip
    sweep_html, sweep_md, pngs = sensitivity_section.section(sweeps, out_dir, _img)
    doc.page.append(sweep_html)  # a layer-policy sweep's ranking (mpbench sensitivity), beside the verdicts
    doc.md += ["", sweep_md] if sweep_md else []
    doc.written |= pngs
    for m, (machine, groups) in enumerate(machines.items(), start=1):
        doc.machine(machine, [r for g in groups.values() for r in g])
        for g, group in enumerate(groups.values(), start=1):
            seeded = all(id(r) in in_sets for r in group)
            doc.group(machine, f"m{m}-g{g}-{slug(str(group[0].get('model')))}", group, seeded)
    numerics = [(f"{machine}: {_group_title(g[0])}", r) for machine, groups in machines.items()
                for g in groups.values() for r in g]  # fmt: skip
    numerics_html, numerics_md, pngs = numerics_section.section(numerics, out_dir, _img)
    doc.page.append(numerics_html)  # after every group: where each mode's format loses what it loses
    doc.md += ["", numerics_md] if numerics_md else []
    doc.written |= pngs
    if prices or target_loss is not None:
        section_html, section_md = procurement.section(df, prices, target_loss)
        doc.page.append(section_html)
        doc.md += ["", section_md]
    return doc.save()
