"""The summary table `mpbench run` prints: per mode, step time, speed-up, memory, loss.

Fitted to the terminal: a figure or a mode name is never shortened. On a narrow terminal whole
columns are left out (the least needed first) and a line under the table says which, and how to
see them; a left-out reason or suspect rule is printed under the table instead. In a pipe or a log
every column is printed, one line per row.
"""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table
from rich.text import Text

from suite.cli.progress import STYLE
from suite.records.cases import pair_key
from suite.records.checks import suspect_fields
from suite.records.noise import NOISY_SPREAD, noisy_step
from suite.reporting import numerics_table
from suite.reporting.convergence import REFERENCE, TOLERANCES
from suite.reporting.seeds import SEEDS_CAP, ModeVerdict, judge, noise_floors
from suite.reporting.table import mode_label
from suite.text import Fit, fit_table, fmt, show

HEADER = ["mode", "model", "status", "step ms", "p10-p90 ms", "tokens/s", "x fp32", "meas/pred", "x bf16 (pred)",
          "MFU", "peak MiB", "final loss", "vs fp32", "suspect (!)", "reason"]  # fmt: skip
# Left out first to last on a narrow terminal; mode, status, step ms, x fp32 and vs fp32 always stay.
# The model goes early only when every row has the same one (it is then said under the table).
DROP = ["reason", "x bf16 (pred)", "suspect (!)", "p10-p90 ms", "meas/pred", "MFU", "tokens/s", "peak MiB",
        "final loss"]  # fmt: skip


def _beat_bound(r: dict | None) -> bool:
    """Whether the self-check found the record's step faster than its roofline bound (rule roofline_bound)."""
    return r is not None and any(s.get("rule") == "roofline_bound" for s in r.get("suspect") or [])


def _versus_roofline(r: dict, bf16: dict | None) -> tuple[str, str]:
    """("meas/pred": the measured step over the roofline's lower bound, "!" when the self-check found it
    below the bound; "x bf16 (pred)": the measured speed-up vs the run's bf16 record of the same case beside
    the one the roofline predicts, "!" when either step beat its own bound. Not when the measured speed-up merely
    exceeds the predicted one: that is a ratio of two lower bounds, no bound on a ratio of two times (a mode that
    gets closer to its bound than bf16 does beats it with nothing wrong: fp32 and tf32 on a GPU, say)."""
    step, bound = r.get("step_time_ms"), r.get("predicted_step_ms")
    ratio = "-"
    if r["status"] == "ok" and step and bound and not r.get("emulated"):
        ratio = f"{step / bound:.2f}" + ("!" if _beat_bound(r) else "")
    predicted = r.get("predicted_speedup_vs_bf16")
    ok = r["status"] == "ok" and bf16 is not None and step and not r.get("emulated")
    measured = bf16["step_time_ms"] / step if ok else None
    if measured is None and predicted is None:
        return ratio, "-"
    mark = "!" if measured and (_beat_bound(r) or _beat_bound(bf16)) else ""
    return ratio, f"{fmt(measured, '.2f')}{mark} ({fmt(predicted, '.2f')})"


def _label(r: dict, seeds: bool = False) -> str:
    """The mode with its layer policy where that is not the mode's default (two policies: two rows that say which
    is which), marked when emulated; with its seed when the run had several."""
    emulated = " (emulated)" if r.get("emulated") else ""
    return mode_label(r) + emulated + (f" seed {r.get('seed')}" if seeds else "")


def _several_seeds(records: list[dict]) -> bool:
    return len({r.get("seed") for r in records}) > 1


def _mark(bad: dict[str, list], text: str, *keys: str) -> str:
    """`text` with a "!" when the self-check found any of `keys` suspect."""
    return f"{text}!" if text != "-" and any(k in bad for k in keys) else text


def _noisy(text: str, *records: dict | None) -> str:
    """`text` with a "~" when the step time of any of `records` is too noisy for a speed-up."""
    return f"{text}~" if text != "-" and any(r is not None and noisy_step(r) for r in records) else text


def summary(records: list[dict], width: int | None = None, ascii: bool = True) -> tuple[Fit, list[str]]:
    """The table fitted to `width` (None: every column), and the lines to print under it."""
    # fp32 of the same case and seed, for the speed-up (the delta is in the record)
    ref = {pair_key(r): r for r in records if r["mode"] == REFERENCE and r["status"] == "ok"}
    bf16 = {pair_key(r): r for r in records if r["mode"] == "bf16" and r["status"] == "ok"}
    seeds = _several_seeds(records)
    rows = []
    for r in records:
        base = ref.get(pair_key(r))
        ok = r["status"] == "ok"
        speedup = base["step_time_ms"] / r["step_time_ms"] if ok and base and not r.get("emulated") else None
        spread = f"{r['step_time_p10_ms']:.2f}-{r['step_time_p90_ms']:.2f}" if ok else "-"
        bad = suspect_fields(r)  # a suspect figure reads "12.34!"; its rule is in the suspect column
        ratio, vs_bf16 = _versus_roofline(r, bf16.get(pair_key(r)))
        rows.append([
            _label(r), r["model"], Text(r["status"], style=STYLE.get(r["status"], "")),
            _mark(bad, _noisy(fmt(r["step_time_ms"], ".2f"), r), "step_time_ms"),
            _mark(bad, spread, "step_time_p10_ms", "step_time_p90_ms"),
            _mark(bad, fmt(r["tokens_per_s"], ",.0f"), "tokens_per_s"), _noisy(fmt(speedup, ".2f"), r, base),
            ratio, vs_bf16,
            _mark(bad, fmt(r["mfu"], ".1%"), "mfu"), _mark(bad, fmt(r["peak_mem_mb"], ",.0f"), "peak_mem_mb"),
            fmt(r["final_loss"], ".4f"), fmt(r["loss_delta_vs_fp32"], "+.4f"),
            ",".join(dict.fromkeys(s["rule"] for s in r.get("suspect") or [])) or "-",
            r["reason"] or r.get("emulated_reason") or "",
        ])  # fmt: skip
    models = list(dict.fromkeys(r["model"] for r in records))
    drop = DROP[:3] + ["model"] + DROP[3:] if len(models) == 1 else DROP
    header, right = HEADER, set(range(3, 13))
    roofline = any(r.get("predicted_step_ms") is not None for r in records)
    if not roofline:  # no record has a roofline (not calibrated, say): its columns would say nothing
        header, right = [h for i, h in enumerate(HEADER) if i not in (7, 8)], set(range(3, 11))
        rows = [row[:7] + row[9:] for row in rows]
    if seeds:  # which seed a row is: a column of its own, after the mode, never left out
        rows = [[row[0], str(r.get("seed")), *row[1:]] for row, r in zip(rows, records, strict=True)]
        header, right = [header[0], "seed", *header[1:]], {1} | {i + 1 for i in right}
    fit = fit_table(rows, header, width, drop=drop, prose=["reason"], right=right, ascii=ascii)
    notes = _notes(records, rows, fit, width, roofline) + convergence_block(records, width, ascii)
    return fit, notes + numerics_block(records, width, ascii)


CONVERGENCE_HEADER = ["mode", "model", "seeds", "mean delta", "95% interval", "sd", "tol", "verdict"]


def _verdict_text(v: ModeVerdict) -> str:
    if v.outcome == "inconclusive":
        if v.seeds_needed:
            return f"inconclusive: {v.seeds_needed} seeds"
        on = v.tolerance is not None and v.delta.mean == v.tolerance.max_delta
        return "inconclusive: mean on the tolerance" if on else f"inconclusive: over {SEEDS_CAP} seeds"
    return v.outcome + ("; better than fp32: look" if v.better else "")


def convergence_block(records: list[dict], width: int | None, ascii: bool = True) -> list[str]:
    """With several seeds: per mode, the mean paired delta vs fp32 with its 95% interval, sd and verdict,
    then the noise floor of each group; [] for a one-seed run (its deltas are in the table)."""
    verdicts = [v for v in judge(records, TOLERANCES) if v.mode != REFERENCE and v.delta.n >= 2]
    if not verdicts:
        return []
    several = len({v.model for v in verdicts}) > 1
    rows = [
        [v.mode, v.model, str(v.delta.n), fmt(v.delta.mean, "+.4f"), f"{v.delta.ci_low:+.4f}..{v.delta.ci_high:+.4f}",
         fmt(v.delta.sd, ".4f"), fmt(v.tolerance and v.tolerance.max_delta, ".3f"), _verdict_text(v)]
        for v in verdicts
    ]  # fmt: skip
    drop = ["model", "tol"] if not several else ["tol"]
    fit = fit_table(rows, CONVERGENCE_HEADER, width, drop=drop, right={2, 3, 4, 5, 6}, ascii=ascii)
    lines = ["", "over seeds: delta = final held-out loss - the same seed's fp32's, nats/token"]
    lines += _lines(fit, width)
    if "tol" in fit.left_out:
        lines.append("tol left out: `mpbench check RECORDS` shows each mode's tolerance and the verdict's detail")
    for f in noise_floors(records):
        where = f" ({f.model})" if several else ""
        paired = f"; paired deltas' sd {f.delta_sd:.4f}" if f.delta_sd is not None else ""
        lines.append(f"noise floor{where}, {len(f.seeds)} seeds: fp32's final loss sd {f.fp32_final.sd:.4f}{paired}")
    lines.append(
        "(paired deltas' sd: the median over modes.) An interval that holds 0: no difference from fp32 shows on "
        "these seeds. Each verdict's detail and tolerance: mpbench check RECORDS"
    )
    return lines


NUMERICS_HEADER = ["mode", "layer", "role", "format", "SQNR dB", "step"]


def numerics_block(records: list[dict], width: int | None, ascii: bool = True) -> list[str]:
    """Per mode run with --numerics: the three (layer, role) with the worst SQNR (a tensor holding inf or nan
    first, then the lowest finite) in the mode's own
    format at its last sampled step, worst first; [] when no record has numerics (or none can be read)."""
    seeds, rows = _several_seeds(records), []
    for r in records:
        cells, _ = numerics_table.read(r, "numerics")  # a field that cannot be read: the report says why
        for i, c in enumerate(numerics_table.worst(cells)):
            sqnr = numerics_table.sqnr_text(c).removesuffix(" dB")
            rows.append([_label(r, seeds) if i == 0 else "", c.layer, c.role, c.format, sqnr, str(c.step)])
    if not rows:
        return []
    fit = fit_table(rows, NUMERICS_HEADER, width, drop=["step", "format"], right={4, 5}, ascii=ascii)
    lines = [
        "",
        "numerics: the 3 worst SQNR (dB) per mode, in its own format, last sampled step",
        "(higher is better; inf/nan: the tensor overflowed; left out: exact round trips",
        "and tensors that arrived in their format; every tensor: mpbench report)",
    ]
    lines += _lines(fit, width)
    if fit.left_out:
        lines.append(f"left out at {width} columns: {', '.join(fit.left_out)}")
    return lines


def _lines(fit: Fit, width: int | None) -> list[str]:
    """A fitted table as plain lines no wider than `width` (None: as wide as its rows)."""
    buf = io.StringIO()
    Console(file=buf, width=width or 100_000, no_color=True, highlight=False, color_system=None).print(fit.table)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


def _notes(records: list[dict], rows: list[list], fit: Fit, width: int | None, roofline: bool = False) -> list[str]:
    """The legend of the marks shown, and what a narrow terminal left out."""
    notes = []
    if roofline and not {"meas/pred", "x bf16 (pred)"} <= set(fit.left_out):
        notes.append("meas/pred: measured step / the roofline's lower bound (1.00 = at the bound; below 1 with ! is "
                     "suspect); x bf16 (pred): measured speed-up vs bf16 (predicted), ! when either step beat its "
                     "bound; see docs/roofline.md")  # fmt: skip
    several = len({r["model"] for r in records}) > 1
    seeds = _several_seeds(records)
    noisy = {_label(r, seeds) + (f" {r['model']}" if several else ""): s for r in records if (s := noisy_step(r))}
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
        notes += [
            f"! suspect, {_label(r, seeds)}: {row[-2]}" for r, row in zip(records, rows, strict=True) if row[-2] != "-"
        ]
    if "reason" in fit.left_out:
        notes += [f"{_label(r, seeds)}: {row[-1]}" for r, row in zip(records, rows, strict=True) if row[-1]]
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
