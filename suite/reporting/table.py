"""The per-mode table of a report: every figure with its unit, or "not measured" and the record's reason.

One `Cell` per figure keeps the raw value (for the CSV), the text shown (HTML, Markdown) and
the reason a figure is missing, taken from the record's `*_reason` field of its group.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from suite.policy import policy_note, recipe_note
from suite.records.checks import suspect_fields
from suite.records.noise import NOISY_SPREAD, noisy_step
from suite.records.store import REASON_FIELDS

NOT_MEASURED = "not measured"
NOISY = "noisy"  # after a step time or speed-up whose steps spread over NOISY_SPREAD (suite/records/noise.py)
# Figures whose reason field is not in results.REASON_FIELDS.
_REASONS = REASON_FIELDS | {"loss_delta_vs_fp32": "loss_delta_reason"}


@dataclass(frozen=True)
class Cell:
    """One figure: raw value (None if missing), its text, and why it is missing or why the case did not run."""

    value: Any
    text: str
    reason: str | None = None
    suspect: bool = False  # measured, but breaks a self-check rule (the reason says which)
    noisy: bool = False  # measured, but the step times spread too widely to support a speed-up

    @property
    def missing(self) -> bool:
        return self.value is None


def why(r: dict[str, Any], key: str, fallback: str | None = None) -> str:
    """The record's own reason for a missing figure; a case that did not finish gives its status and reason."""
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('reason') or 'no reason recorded'}"
    field = _REASONS.get(key)
    return (field and r.get(field)) or fallback or f"{key} was not recorded and the record gives no reason"


def _cell(value: Any, fmt: str, reason: Callable[[], str], suffix: str = "") -> Cell:
    if value is None:
        return Cell(None, NOT_MEASURED, reason())
    return Cell(value, format(value, fmt) + suffix)


def field(key: str, fmt: str, scale: float = 1.0, source: str | None = None) -> Callable[..., Cell]:
    """A column showing `key` (times `scale`), with `(source)` appended when a source field is given."""

    def column(r: dict[str, Any], ref: dict[str, Any] | None) -> Cell:
        value = r.get(key)
        src = f" ({r.get(source)})" if source and r.get(source) else ""
        return _cell(None if value is None else value * scale, fmt, lambda: why(r, key), src)

    return column


def noisy_note(r: dict[str, Any], ref: dict[str, Any] | None = None) -> str | None:
    """Why a step time (and, given fp32's record `ref`, a speed-up against it) is too noisy; None if it is not."""
    spreads = [f"{who} {s:.0%}" for who, x in (("this mode", r), ("fp32", ref)) if x and (s := noisy_step(x))]
    if not spreads:
        return None
    return (f"{NOISY}: step time p10-p90 over {NOISY_SPREAD:.0%} of the median ({', '.join(spreads)}): too "
            "spread to support a speed-up; rerun with more steps on a quiet machine")  # fmt: skip


def _spread(r: dict[str, Any], ref: dict[str, Any] | None) -> Cell:
    lo, hi = r.get("step_time_p10_ms"), r.get("step_time_p90_ms")
    if lo is None or hi is None:
        return Cell(None, NOT_MEASURED, why(r, "step_time_ms"))
    return Cell((lo, hi), f"{lo:.2f}-{hi:.2f}")


def speedup(r: dict[str, Any], ref: dict[str, Any] | None) -> Cell:
    """fp32's median step time over this mode's, both from the same group; none for emulated kernels."""
    step = r.get("step_time_ms")
    if step is None:
        return Cell(None, NOT_MEASURED, why(r, "step_time_ms"))
    if r.get("emulated"):
        return Cell(None, NOT_MEASURED, f"emulated kernels, the step time is not a speed: {r.get('emulated_reason')}")
    if ref is None or not ref.get("step_time_ms"):
        return Cell(None, NOT_MEASURED, "no ok fp32 case in this group to compare with")
    return _cell(ref["step_time_ms"] / step, ".2f", str)


def energy_per_token_mj(r: dict[str, Any], ref: dict[str, Any] | None = None) -> Cell:
    """Energy per step over tokens per step, in millijoules."""
    joules, tokens = r.get("energy_j_per_step"), r.get("tokens_per_step")
    value = joules / tokens * 1000 if joules is not None and tokens else None
    return _cell(value, ".4g", lambda: why(r, "energy_j_per_step"))


def _excess(r: dict[str, Any], ref: dict[str, Any] | None) -> Cell:
    fallback = None if r.get("final_loss") is None else "no loss floor: the training data is a file of unknown entropy"
    return _cell(r.get("excess_loss"), "+.4f", lambda: why(r, "excess_loss", fallback))


def mode_label(r: dict[str, Any]) -> str:
    """The mode's name, with its layer policy when that is not the mode's default ("fp8-tensorwise [keep
    last:1,lm_head]"): two policies of one mode are two rows that say which is which."""
    mode = r.get("mode")
    return f"{mode}{policy_note(mode, r.get('keep_high'), r.get('model'))}{recipe_note(mode, r.get('fp4_recipe'))}"


def mode_cell(r: dict[str, Any]) -> Cell:
    """The mode's name and policy (`mode_label`); "(emulated)" after it, with the reason, when it ran on emulated
    kernels."""
    if r.get("emulated"):
        return Cell(r.get("mode"), f"{mode_label(r)} (emulated)", r.get("emulated_reason") or "emulated kernels")
    return Cell(r.get("mode"), mode_label(r))


def _status(r: dict[str, Any], ref: dict[str, Any] | None) -> Cell:
    return Cell(r.get("status"), str(r.get("status")), None if r.get("status") == "ok" else why(r, "status"))


# (CSV name, header with unit, cell maker); the CSV holds raw values in the record's units.
COLUMNS: list[tuple[str, str, Callable[..., Cell]]] = [
    ("mode", "mode", lambda r, ref: mode_cell(r)),
    ("status", "status", _status),
    ("step_time_ms", "step time, median (ms)", field("step_time_ms", ".2f")),
    ("step_time_p10_p90_ms", "step time p10-p90 (ms)", _spread),
    ("speedup_vs_fp32", "speed-up over fp32 (x)", speedup),
    ("tokens_per_s", "tokens/s", field("tokens_per_s", ",.0f")),
    ("mfu_pct", "MFU (%)", field("mfu", ".1f", 100)),
    ("mfu_bf16_pct", "MFU vs bf16 peak (%)", field("mfu_bf16", ".1f", 100)),
    ("mamf_pct", "MAMF (%)", field("mamf", ".1f", 100)),
    ("tensor_core_util_pct", "tensor-core util (%) (source)",
     field("tensor_core_util", ".1f", 100, "tensor_core_util_source")),
    ("peak_mem_mb", "peak memory NVML/RSS (MiB) (source)", field("peak_mem_mb", ",.0f", source="peak_mem_source")),
    ("peak_mem_allocated_mb", "allocator peak (MiB)", field("peak_mem_allocated_mb", ",.0f")),
    ("energy_mj_per_token", "energy per token (mJ)", energy_per_token_mj),
    ("tokens_per_kj", "tokens per kJ", field("tokens_per_joule", ",.0f", 1000)),
    ("final_loss", "final loss (nats/token)", field("final_loss", ".4f")),
    ("loss_delta_vs_fp32", "delta vs fp32 (nats/token)", field("loss_delta_vs_fp32", "+.4f")),
    ("excess_loss", "excess over loss floor (nats/token)", _excess),
]  # fmt: skip
HEADERS = [header for _, header, _ in COLUMNS]


# The record fields behind each column: a column whose field the self-check (`suspect`) names is marked.
SUSPECT_FIELDS: dict[str, tuple[str, ...]] = {
    "step_time_ms": ("step_time_ms",), "step_time_p10_p90_ms": ("step_time_p10_ms", "step_time_p90_ms"),
    "speedup_vs_fp32": ("step_time_ms",), "tokens_per_s": ("tokens_per_s",),
    "mfu_pct": ("mfu", "achieved_flops"), "mfu_bf16_pct": ("achieved_flops",), "mamf_pct": ("mamf", "achieved_flops"),
    "tensor_core_util_pct": ("tensor_core_util",), "peak_mem_mb": ("peak_mem_mb",),
    "peak_mem_allocated_mb": ("peak_mem_allocated_mb",), "energy_mj_per_token": ("energy_j_per_step",),
    "tokens_per_kj": ("tokens_per_joule",),
}  # fmt: skip
SUSPECT = "suspect"


def _suspect(cell: Cell, entries: list[dict[str, Any]]) -> Cell:
    """A measured figure the self-check doubts: kept, marked, and its rules as the note."""
    if cell.missing or not entries:
        return cell
    note = "; ".join(dict.fromkeys(f"suspect ({e.get('rule')}): {e.get('note')}" for e in entries))
    return Cell(cell.value, f"{cell.text} ({SUSPECT})", note, suspect=True)


def _noisy(cell: Cell, note: str | None) -> Cell:
    """A measured step time (or speed-up) from too-spread steps: kept, marked, the spread as the note."""
    if cell.missing or not note:
        return cell
    reason = "; ".join(x for x in (cell.reason, note) if x)
    return Cell(cell.value, f"{cell.text} ({NOISY})", reason, cell.suspect, noisy=True)


def cells(r: dict[str, Any], ref: dict[str, Any] | None) -> list[Cell]:
    """Every column of one record; `ref` is the ok fp32 record of its group, if any."""
    bad = suspect_fields(r)
    noisy = {"step_time_ms": noisy_note(r), "speedup_vs_fp32": noisy_note(r, None if ref is r else ref)}
    return [
        _noisy(
            _suspect(make(r, ref), [e for key in SUSPECT_FIELDS.get(name, ()) for e in bad.get(key, [])]),
            noisy.get(name),
        )  # fmt: skip
        for name, _, make in COLUMNS
    ]


class Notes:
    """Numbered footnotes, one per distinct reason, so a reason shared by many cells is listed once."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def ref(self, reason: str) -> int:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return self.reasons.index(reason) + 1


# The figures in families, one small table each, side by side where the window allows: no table
# grows wider than a laptop screen however many figures the records gain. `mode` heads every
# table; a column named in no family (a new figure) joins OTHER until it is given one, and a
# family longer than MAX_COLUMNS is cut into parts.
FAMILIES: dict[str, tuple[str, ...]] = {
    "speed": ("status", "step_time_ms", "step_time_p10_p90_ms", "speedup_vs_fp32", "tokens_per_s"),
    "utilization": ("mfu_pct", "mfu_bf16_pct", "mamf_pct", "tensor_core_util_pct"),
    "memory": ("peak_mem_mb", "peak_mem_allocated_mb"),
    "energy": ("energy_mj_per_token", "tokens_per_kj"),
    "convergence": ("final_loss", "loss_delta_vs_fp32", "excess_loss"),
}
KEY_COLUMNS = ("mode",)
OTHER = "more figures"
MAX_COLUMNS = 6  # figures per table, besides the key


def families() -> list[tuple[str, list[int]]]:
    """(title, indexes into COLUMNS) of each table: key columns first, then the family's figures."""
    names = [name for name, _, _ in COLUMNS]
    placed = set(KEY_COLUMNS).union(*FAMILIES.values())
    groups = [(title, [n for n in members if n in names]) for title, members in FAMILIES.items()]
    groups.append((OTHER, [n for n in names if n not in placed]))
    key = [names.index(n) for n in KEY_COLUMNS]
    out = []
    for title, members in groups:
        parts = [members[i : i + MAX_COLUMNS] for i in range(0, len(members), MAX_COLUMNS)]
        for p, part in enumerate(parts, start=1):
            label = f"{title} ({p}/{len(parts)})" if len(parts) > 1 else title
            out.append((label, key + [names.index(n) for n in part]))
    return out


def unmeasured_line(title: str, rows: list[list[Cell]], columns: list[int], headers: list[str] | None) -> str | None:
    """One line in place of a family table none of whose figures was measured for any finished case
    (each reason once, after the figures it covers); None where some figure was measured or no case finished."""
    status = [name for name, _, _ in COLUMNS].index("status")
    ok = [row for row in rows if row[status].value == "ok"]
    figures = [i for i in columns if COLUMNS[i][0] not in KEY_COLUMNS]
    if headers is not None or not ok or any(not row[i].missing for row in ok for i in figures):
        return None
    covers: dict[str, list[str]] = {}  # reason -> the figures (names without units) it is given for
    for i in figures:
        for row in ok:
            names = covers.setdefault(row[i].reason or NOT_MEASURED, [])
            names += [] if COLUMNS[i][1].split(" (")[0] in names else [COLUMNS[i][1].split(" (")[0]]
    why = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in covers.items())
    return f"{title[:1].upper()}{title[1:]}: {NOT_MEASURED} on this device ({why})"


TEXT_COLUMNS = ("mode", "status")  # words: aligned left; figures align right


def _html_cell(cell: Cell, notes: Notes, words: bool) -> str:
    text = html.escape(cell.text)
    if cell.reason:
        cls = ' class="nm"' if cell.missing else ' style="color:#b00"' if cell.suspect or cell.noisy else ""
        title = html.escape(cell.reason, quote=True)
        text = f'<span{cls} title="{title}">{text} <sup>[{notes.ref(cell.reason)}]</sup></span>'
    return f'<td class="text">{text}</td>' if words else f"<td>{text}</td>"


def _tables(headers: list[str] | None) -> tuple[list[tuple[str, list[int]]], list[str], set[int]]:
    """(title and column indexes of each table, every header, the columns of words): the families
    of COLUMNS, or `headers` (key first) cut into parts of at most MAX_COLUMNS figures."""
    if headers is None:
        return families(), [h for _, h, _ in COLUMNS], {i for i, c in enumerate(COLUMNS) if c[0] in TEXT_COLUMNS}
    figures = list(range(1, len(headers)))
    parts = [figures[i : i + MAX_COLUMNS] for i in range(0, len(figures), MAX_COLUMNS)] or [[]]
    titled = [(f"part {p} of {len(parts)}" if len(parts) > 1 else "", [0, *part]) for p, part in enumerate(parts, 1)]
    return titled, headers, {0}


def to_html(rows: list[list[Cell]], notes: Notes, headers: list[str] | None = None) -> str:
    """One table per family (or `headers`, cut into parts); a "not measured" cell carries its
    reason as a tooltip and a footnote number."""
    tables, names, words = _tables(headers)
    out, lines = ['<div class="families">'], []
    for title, columns in tables:
        if (line := unmeasured_line(title, rows, columns, headers)) is not None:
            lines.append(f'<p class="nm">{html.escape(line)}</p>')
            continue
        out.append(f'<div class="family"><h4>{html.escape(title)}</h4><table><thead><tr>')
        out += [f"<th>{html.escape(names[i])}</th>" for i in columns]
        out.append("</tr></thead><tbody>")
        out += ["<tr>" + "".join(_html_cell(row[i], notes, i in words) for i in columns) + "</tr>" for row in rows]
        out.append("</tbody></table></div>")
    out.append("</div>")
    return "".join(out + lines)


def notes_html(notes: Notes) -> str:
    items = "".join(f"<li>[{i}] {html.escape(r)}</li>" for i, r in enumerate(notes.reasons, start=1))
    return f'<ul class="notes">{items}</ul>' if items else ""


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[list[Cell]], notes: Notes, headers: list[str] | None = None) -> str:
    """The same tables in Markdown, footnotes as [n] after "not measured"; list them with `notes_markdown`."""
    tables, names, _ = _tables(headers)
    lines: list[str] = []
    collapsed = []
    for title, columns in tables:
        if (line := unmeasured_line(title, rows, columns, headers)) is not None:
            collapsed.append(_md(line))
            continue
        lines += [*([""] if lines else []), f"**{title}**", ""] if title else ([""] if lines else [])
        lines += ["| " + " | ".join(names[i] for i in columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            texts = [_md(row[i].text + (f" [{notes.ref(row[i].reason)}]" if row[i].reason else "")) for i in columns]
            lines.append("| " + " | ".join(texts) + " |")
    return "\n".join(lines + ([""] if lines and collapsed else []) + collapsed)


def notes_markdown(notes: Notes) -> str:
    return "\n".join(f"- [{i}] {_md(r)}" for i, r in enumerate(notes.reasons, start=1))


def csv_row(r: dict[str, Any], row: list[Cell]) -> dict[str, Any]:
    """Raw values by CSV name, plus `not_measured`: "column: reason" for each missing figure."""
    named = [(name, cell) for (name, _, _), cell in zip(COLUMNS, row, strict=True)]
    out = {name: cell.value for name, cell in named if name != "step_time_p10_p90_ms"}
    out["step_time_p10_ms"], out["step_time_p90_ms"] = r.get("step_time_p10_ms"), r.get("step_time_p90_ms")
    out["tensor_core_util_source"], out["peak_mem_source"] = r.get("tensor_core_util_source"), r.get("peak_mem_source")
    if r.get("status") != "ok":  # one reason covers every figure of a case that did not run or finish
        out["not_measured"] = why(r, "status")
    else:
        out["not_measured"] = "; ".join(f"{name}: {cell.reason}" for name, cell in named if cell.missing)
    out["suspect"] = "; ".join(f"{name}: {cell.reason}" for name, cell in named if cell.suspect)
    out["noisy_step_time"] = noisy_note(r) or ""  # this record's own spread; the speed-up cell adds fp32's
    return out
