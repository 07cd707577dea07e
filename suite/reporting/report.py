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
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from suite.records.cases import latest
from suite.reporting import table as table
from suite.reporting.charts import bar_chart, layer_chart
from suite.reporting.plots import plot_loss_curves
from suite.reporting.procurement import procurement_table, records_of
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
.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.charts img{width:calc(50% - 12px);min-width:480px}
"""
FIDELITY_CSV = ("grad_cos_vs_fp64", "grad_rel_err_vs_fp64", "grad_max_abs_err_vs_fp64", "update_cos_vs_fp64",
                "update_rel_err_vs_fp64", "grad_underflow_frac", "scaled_grad_underflow_frac", "grad_overflow_frac",
                "fidelity_loss_diff", "fidelity_loss_scale")  # fmt: skip
FIDELITY_NOTE = (
    "Against float64: each mode's gradients (as its optimizer applies them) and update (weights after minus "
    "before) against a float64 step from the same weights and batch, at the last step compared; see README "
    "'Fidelity'. Underflow: gradient elements that are 0 in the mode and not in float64."
)
PROCUREMENT_HEADERS = {
    "gpu": "GPU", "mode": "mode", "model": "model", "tokens_per_s": "tokens/s",
    "price_per_hour": "price (USD/GPU-h)", "tokens_per_dollar": "tokens per USD", "tokens_per_kj": "tokens per kJ",
    "time_to_target_s": "time to target (s)", "cost_to_target_usd": "cost to target (USD)",
    "gpu_memory_mb": "GPU memory (MiB)", "peak_mem_mb": "peak memory (MiB)",
    "memory_headroom_mb": "memory headroom (MiB)", "max_batch": "max batch", "notes": "notes",
}  # fmt: skip


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


def _charts(
    group: list[dict[str, Any]], rows: list[list[table.Cell]], stem: str, out_dir: Path
) -> list[tuple[str, Path | None, str]]:
    """(name, path or None, caption or skip reason) for the loss curves and each bar chart of one group."""
    labels = [r["mode"] + (" (emulated)" if r.get("emulated") else "") for r in group]
    absent = [r["status"] if r.get("status") != "ok" else "emulated" if r.get("emulated") else table.NOT_MEASURED
              for r in group]  # fmt: skip
    col = {header: [row[i] for row in rows] for i, header in enumerate(table.HEADERS)}

    def values(header: str) -> list[float | None]:
        return [c.value for c in col[header]]

    title = f"{machine_of(group[0])}: {_group_title(group[0])}"
    charts: list[tuple[str, Path | None, str]] = []
    if any(r.get("loss_curve") for r in group):
        path = plot_loss_curves(group, out_dir / f"{stem}-loss.png", title=textwrap.fill(title, 80))
        charts.append(("loss curves", path, "training loss per step (nats/token) and minus fp32's"))
    else:
        charts.append(("loss curves", None, "no record of this group has a loss curve"))
    if any(r.get("fidelity_layers") for r in group):
        charts.append(_layer_chart(group, title, out_dir / f"{stem}-fidelity-layers.png"))
    sources = sorted({str(r["peak_mem_source"]) for r in group if r.get("peak_mem_source")})
    memory = {
        f"peak ({', '.join(sources) or 'NVML/RSS'})": values("peak memory NVML/RSS (MiB) (source)"),
        "allocator peak": values("allocator peak (MiB)"),
    }
    specs = [
        ("step time", "step time, median (ms)", "step time (ms): median, whiskers p10-p90",
         {"median": values("step time, median (ms)")}, None),
        ("speed-up", "speed-up over fp32 (x)", "speed-up over fp32 (x), same group",
         {"speed-up": values("speed-up over fp32 (x)")}, 1.0),
        ("peak memory", "peak memory NVML/RSS (MiB) (source)", "peak memory (MiB)", memory, None),
        ("energy per token", "energy per token (mJ)", "energy per token (mJ)",
         {"energy": values("energy per token (mJ)")}, None),
    ]  # fmt: skip
    for name, header, ylabel, series, hline in specs:
        if all(v is None for vals in series.values() for v in vals):
            ok = [i for i, r in enumerate(group) if r.get("status") == "ok"]  # a skipped case explains nothing here
            reasons = sorted({col[h][i].reason or "" for h in _chart_headers(header, series) for i in ok} - {""})
            why = "; ".join(reasons) or "no case of this group finished"
            charts.append((name, None, f"no mode has this figure: {why}"))
            continue
        errors = None
        if name == "step time":
            errors = ([r.get("step_time_p10_ms") for r in group], [r.get("step_time_p90_ms") for r in group])
        path = out_dir / f"{stem}-{slug(name)}.png"
        bar_chart(path, f"{name}: {title}", ylabel, labels, series, absent, errors, hline)
        charts.append((name, path, ylabel))
    return charts


def _layer_chart(group: list[dict[str, Any]], title: str, path: Path) -> tuple[str, Path, str]:
    """Relative error vs float64 by tensor (model order), one line per mode, log scale; last step compared."""
    last = {r["mode"]: [x for x in r["fidelity_layers"] if x["step"] == max(y["step"] for y in r["fidelity_layers"])]
            for r in group if r.get("fidelity_layers")}  # fmt: skip
    tensors = list(dict.fromkeys(x["tensor"] for rows in last.values() for x in rows))
    panels = {}
    for key, label in (("grad_rel_err", "gradient rel. L2 error vs fp64"), ("update_rel_err", "update rel. error")):
        panels[label] = {mode: [{x["tensor"]: x.get(key) for x in rows}.get(t) for t in tensors]
                         for mode, rows in last.items()}  # fmt: skip
    layer_chart(path, f"fidelity by tensor: {title}", tensors, panels)
    return "fidelity by tensor", path, "relative error vs float64 per parameter tensor (log); a gap: 0 or not compared"


def _chart_headers(header: str, series: dict[str, list[float | None]]) -> list[str]:
    """The table columns a chart draws from, to collect the reasons it was skipped."""
    return [header, "allocator peak (MiB)"] if len(series) > 1 else [header]


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any, key: str) -> str:
    """A procurement figure: money to the cent or finer, large counts in full, others to 4 digits."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if key in ("price_per_hour", "cost_to_target_usd"):
        return f"{value:.4g}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _procurement(df: pandas.DataFrame, prices: dict[str, float] | None, target: float | None) -> tuple[str, str]:
    """The procurement section as HTML and Markdown."""
    t = procurement_table(df, prices or {}, target)
    priced = ", ".join(f"{k} = {v:g} USD/GPU-hour" for k, v in (prices or {}).items()) or "no prices given"
    about = (
        f"Prices: {priced}. Target loss: {f'{target:g} nats/token' if target is not None else 'none given'}. "
        "Time to target = first step at which the mean training loss of the last 5 steps is at or below the target, "
        "times the median step time: warm-up and compilation time are not included. n/a: see notes."
    )
    heads = [PROCUREMENT_HEADERS[c] for c in t.columns]
    records = t.to_dict(orient="records")
    body = [[_fmt(v, k) for k, v in row.items()] for row in records]
    h = ["<h2>Procurement</h2>", f"<p>{html.escape(about)}</p>", '<div class="scroll"><table><thead><tr>']
    h += [f"<th>{html.escape(x)}</th>" for x in heads] + ["</tr></thead><tbody>"]
    for row, cells in zip(records, body, strict=True):
        kinds = ["text" if isinstance(v, str) else "num" for v in row.values()]  # words left, figures right
        tds = (f'<td class="{k}">{html.escape(c)}</td>' for k, c in zip(kinds, cells, strict=True))
        h.append(f"<tr>{''.join(tds)}</tr>")
    h.append("</tbody></table></div>")
    md = ["## Procurement", "", about, "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "".join(h), "\n".join(md)


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

    def group(self, machine: str, stem: str, group: list[dict[str, Any]]) -> None:
        """The table of one group (footnotes numbered within it), its CSV rows and its charts."""
        ref = next((r for r in group if r.get("mode") == "fp32" and r.get("status") == "ok"), None)
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
        for name, path, caption in _charts(group, rows, stem, self.out_dir):
            if path is None:  # said on the page, so a missing chart is never mistaken for a lost one
                skipped.append(f"<li>{html.escape(name)} chart skipped: {html.escape(caption)}</li>")
                self.md.append(f"- {name} chart skipped: {caption}")
                continue
            self.written[path.name] = path
            images.append(_img(path, f"{name} ({caption})"))
            self.md.append(f"- {name}: ![{name}]({path.name}) {caption}")
        self.page.append(f'<div class="charts">{"".join(images)}</div>')
        if skipped:
            self.page.append(f'<ul class="skipped">{"".join(skipped)}</ul>')

    def _fidelity(self, group: list[dict[str, Any]]) -> None:
        """The float64 comparison's table, for a group where some record has one."""
        rows = [table.fidelity_cells(r) for r in group]
        notes, md_notes = table.Notes(), table.Notes()
        heads = table.FIDELITY_HEADERS
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
    df: pandas.DataFrame, out_dir: Path, prices: dict[str, float] | None = None, target_loss: float | None = None
) -> dict[str, Path]:
    """Write index.html, summary.md, summary.csv and the chart PNGs into `out_dir`; returns them by file name."""
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
    for m, (machine, groups) in enumerate(_groups(records).items(), start=1):
        doc.machine(machine, [r for g in groups.values() for r in g])
        for g, group in enumerate(groups.values(), start=1):
            doc.group(machine, f"m{m}-g{g}-{slug(str(group[0].get('model')))}", group)
    if prices or target_loss is not None:
        section_html, section_md = _procurement(df, prices, target_loss)
        doc.page.append(section_html)
        doc.md += ["", section_md]
    return doc.save()
