"""The summary table `mpbench run` prints: per mode, step time, speed-up, memory, loss.

Fitted to the terminal: a figure or a mode name is never shortened. On a narrow terminal whole
columns are left out (the least needed first) and a line under the table says which, and how to
see them; a left-out reason or suspect rule is printed under the table instead. In a pipe or a log
every column is printed, one line per row.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from suite.cli.progress import STYLE
from suite.records.checks import suspect_fields
from suite.records.noise import NOISY_SPREAD, noisy_step
from suite.text import Fit, fit_table, fmt, show

HEADER = ["mode", "model", "status", "step ms", "p10-p90 ms", "tokens/s", "x fp32", "MFU", "peak MiB",
          "final loss", "vs fp32", "suspect (!)", "reason"]  # fmt: skip
# Left out first to last on a narrow terminal; mode, status, step ms, x fp32 and vs fp32 always stay.
# The model goes early only when every row has the same one (it is then said under the table).
DROP = ["reason", "suspect (!)", "p10-p90 ms", "MFU", "tokens/s", "peak MiB", "final loss"]


def _label(r: dict) -> str:
    return r["mode"] + (" (emulated)" if r.get("emulated") else "")


def _mark(bad: dict[str, list], text: str, *keys: str) -> str:
    """`text` with a "!" when the self-check found any of `keys` suspect."""
    return f"{text}!" if text != "-" and any(k in bad for k in keys) else text


def _noisy(text: str, *records: dict | None) -> str:
    """`text` with a "~" when the step time of any of `records` is too noisy for a speed-up."""
    return f"{text}~" if text != "-" and any(r is not None and noisy_step(r) for r in records) else text


def summary(records: list[dict], width: int | None = None, ascii: bool = True) -> tuple[Fit, list[str]]:
    """The table fitted to `width` (None: every column), and the lines to print under it."""
    # fp32 of the same group, for the speed-up (the delta is in the record)
    ref = {
        (r["model"], r["batch_size"], r["seq_len"]): r for r in records if r["mode"] == "fp32" and r["status"] == "ok"
    }
    rows = []
    for r in records:
        base = ref.get((r["model"], r["batch_size"], r["seq_len"]))
        ok = r["status"] == "ok"
        speedup = base["step_time_ms"] / r["step_time_ms"] if ok and base and not r.get("emulated") else None
        spread = f"{r['step_time_p10_ms']:.2f}-{r['step_time_p90_ms']:.2f}" if ok else "-"
        bad = suspect_fields(r)  # a suspect figure reads "12.34!"; its rule is in the suspect column
        rows.append([
            _label(r), r["model"], Text(r["status"], style=STYLE.get(r["status"], "")),
            _mark(bad, _noisy(fmt(r["step_time_ms"], ".2f"), r), "step_time_ms"),
            _mark(bad, spread, "step_time_p10_ms", "step_time_p90_ms"),
            _mark(bad, fmt(r["tokens_per_s"], ",.0f"), "tokens_per_s"), _noisy(fmt(speedup, ".2f"), r, base),
            _mark(bad, fmt(r["mfu"], ".1%"), "mfu"), _mark(bad, fmt(r["peak_mem_mb"], ",.0f"), "peak_mem_mb"),
            fmt(r["final_loss"], ".4f"), fmt(r["loss_delta_vs_fp32"], "+.4f"),
            ",".join(dict.fromkeys(s["rule"] for s in r.get("suspect") or [])) or "-",
            r["reason"] or r.get("emulated_reason") or "",
        ])  # fmt: skip
    models = list(dict.fromkeys(r["model"] for r in records))
    drop = DROP[:3] + ["model"] + DROP[3:] if len(models) == 1 else DROP
    fit = fit_table(rows, HEADER, width, drop=drop, prose=["reason"], right=set(range(3, 11)), ascii=ascii)
    return fit, _notes(records, rows, fit, width)


def _notes(records: list[dict], rows: list[list], fit: Fit, width: int | None) -> list[str]:
    """The legend of the marks shown, and what a narrow terminal left out."""
    notes = []
    several = len({r["model"] for r in records}) > 1
    noisy = {_label(r) + (f" {r['model']}" if several else ""): s for r in records if (s := noisy_step(r))}
    if noisy:
        each = ", ".join(f"{label} {spread:.0%}" for label, spread in noisy.items())
        notes.append(f"~ noisy: p10-p90 spread over {NOISY_SPREAD:.0%} of the median step time ({each}), "
                     "speed-up not supported (a speed-up is marked when its mode or its fp32 is noisy)")  # fmt: skip
    if not fit.left_out:
        return notes
    notes.append(
        f"left out at {width} columns: {', '.join(fit.left_out)}; a terminal of {fit.full_width}+ columns shows "
        f"{'it' if len(fit.left_out) == 1 else 'them'}, and `mpbench report RECORDS` writes every figure"
    )
    if "model" in fit.left_out:
        notes.append(f"model: {records[0]['model']} (every row)")
    if "suspect (!)" in fit.left_out:
        notes += [f"! suspect, {row[0]}: {row[11]}" for row in rows if row[11] != "-"]
    if "reason" in fit.left_out:
        notes += [f"{row[0]}: {row[12]}" for row in rows if row[12]]
    return notes


def summary_table(records: list[dict], ascii: bool = True) -> Table:
    """Per-mode table with every column: step time with spread, speed-up, MFU, memory, loss and its
    delta vs fp32; the status coloured on a terminal (`ascii=False`)."""
    return summary(records, None, ascii)[0].table


def print_summary(done: list[dict], console: Console | None = None) -> None:
    """The summary table on stdout, fitted and coloured on a terminal, or why there is none."""
    out = console or Console(highlight=False)  # stdout
    if not done:
        print("nothing to run: every case already has a record", file=out.file)
        return
    width = out.width if out.is_terminal else None  # a pipe or a log gets every column
    fit, notes = summary(done, width, ascii=width is None)
    show(out, fit.table, notes)
