"""The report's "Where each format loses information" section, shown when some record has numerics.

Per record of a training run with `mpbench run --numerics` (field `numerics`): the SQNR heatmap of the
mode's own formats at the last sampled step, and each layer's amax (and scale, where the format has one)
over the sampled steps. Per what-if record (`mpbench numerics`, field `numerics_whatif`): one heatmap per
format, all on the same fp32 tensors. A field that cannot be read is named with why, never drawn in part.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite.reporting import numerics_charts as charts
from suite.reporting import numerics_table as nt
from suite.text import slug

TITLE = "Where each format loses information"
ANCHOR = "numerics"
ABOUT = (
    "SQNR: signal to quantization-noise ratio of a tensor's round trip through a format, in dB (6 dB is a bit; "
    "higher is better). Layers run down in model order, a Linear's four tensors across (input, weight, "
    "grad_output, grad_weight). " + charts.LEGEND + " How the figures are taken: docs/numerics.md."
)
HEATMAP_ALT = "SQNR heatmap"  # every heatmap's alt text starts so (the render test finds them by it)
Img = Callable[[Path, str], str]


class _Part:
    """The HTML, Markdown and PNGs of the section, filled record by record."""

    def __init__(self, out_dir: Path, img: Img) -> None:
        self.out_dir, self.img = out_dir, img
        self.page: list[str] = []
        self.md: list[str] = []
        self.written: dict[str, Path] = {}

    def heading(self, text: str) -> None:
        self.page.append(f"<h3>{html.escape(text)}</h3>")
        self.md += ["", f"### {text}", ""]

    def charts(self, charts_: list[tuple[Path, str]]) -> None:
        images = []
        for path, caption in charts_:
            self.written[path.name] = path
            images.append(self.img(path, caption))
            self.md.append(f"- ![{caption}]({path.name}) {caption}")
        self.page.append(f'<div class="charts">{"".join(images)}</div>')

    def notes(self, lines: list[str]) -> None:
        if lines:
            self.page.append(f'<ul class="skipped">{"".join(f"<li>{html.escape(x)}</li>" for x in lines)}</ul>')
            self.md += [f"- {x}" for x in lines]


LABEL_CHARS = 13  # a heatmap column is ~85 px wide: 13 characters at 8 pt


def _column_label(role: str, cells: list[nt.Cell]) -> str:
    """A role and the format(s) its tensors are in (a mode may keep some layers in another format), the
    format broken after its hyphens where it is wider than a column ("e4m3-rowwise-" / "pow2")."""
    formats = nt.formats([c for c in cells if c.role == role])
    lines = [""]
    for part in (formats[0] if len(formats) == 1 else "mixed formats").split("-"):
        piece = part if lines[-1] == "" else f"-{part}"
        if lines[-1] and len(lines[-1]) + len(piece) > LABEL_CHARS:
            lines[-1] += "-"
            lines.append(part)
        else:
            lines[-1] += piece
    return "\n".join([role, *lines])


def _grid(cells: list[nt.Cell]) -> dict[tuple[str, str], nt.Cell]:
    grid: dict[tuple[str, str], nt.Cell] = {}
    for c in cells:
        grid.setdefault((c.layer, c.role), c)
    return grid


def _per_step(cells: list[nt.Cell], value: Callable[[nt.Cell], float | None]) -> dict[str, dict[str, list]]:
    """role -> layer -> [(step, value)] in step order, for the over-steps charts."""
    panels: dict[str, dict[str, list]] = {}
    for c in sorted(cells, key=lambda c: c.step):
        v = value(c)
        if v is not None:
            points = panels.setdefault(c.role, {}).setdefault(c.layer, [])
            if not points or points[-1][0] != c.step:  # one point per step and tensor
                points.append((c.step, v))
    return {role: panels[role] for role in nt.roles(cells) if role in panels}


def _training(part: _Part, stem: str, heading: str, r: dict[str, Any], cells: list[nt.Cell]) -> None:
    step, steps = nt.last_step(cells), sorted({c.step for c in cells})
    mode, layers, roles = str(r.get("mode")), nt.layers(cells), nt.roles(cells)
    last = nt.at_step(cells, step)
    part.heading(f"{heading}: {mode}, in its own formats, step {step} (the last of {len(steps)} sampled)")
    title = f"{HEATMAP_ALT}: {mode}, its own formats, step {step}"
    labels = [_column_label(role, last) for role in roles]
    made = [(charts.heatmap(part.out_dir / f"{stem}-sqnr.png", title, layers, roles, labels, _grid(last)),
             f"{title} (layers down, roles across)")]  # fmt: skip
    amax = _per_step(cells, lambda c: c.amax)
    path = charts.over_steps(part.out_dir / f"{stem}-amax.png", f"amax over the sampled steps: {mode}",
                             "amax (max |x|, log)", layers, amax)  # fmt: skip
    made.append((path, f"amax per layer over steps {steps}"))
    scaled = {c.role for c in cells if c.scale is not None and c.scale != 1.0}  # 1.0: a plain cast, no scale
    if scaled:
        scale = {role: s for role, s in _per_step(cells, lambda c: c.scale).items() if role in scaled}
        path = charts.over_steps(part.out_dir / f"{stem}-scale.png", f"scale over the sampled steps: {mode}",
                                 "scale (log)", layers, scale)  # fmt: skip
        made.append((path, f"scale per layer over steps {steps}"))
    part.charts(made)
    if r.get("numerics_reason"):  # some statistics were not taken (their cells read "-"): why
        part.notes([f"{mode}: statistics not taken: {r['numerics_reason']}"])


def _whatif(part: _Part, stem: str, heading: str, r: dict[str, Any], cells: list[nt.Cell]) -> None:
    step = nt.last_step(cells)
    last = nt.at_step(cells, step)
    layers, roles = nt.layers(cells), nt.roles(cells)
    mode = r.get("mode")  # `step`: the step of the weights whose next step's tensors were taken
    part.heading(f"{heading}: what-if, every format on the tensors of {mode}'s weights after step {step}")
    made = []
    for fmt in nt.formats(last):
        title = f"{HEATMAP_ALT}: {fmt}, what-if, {mode} weights after step {step}"
        mine = [c for c in last if c.format == fmt]
        path = charts.heatmap(part.out_dir / f"{stem}-{slug(fmt)}.png", title, layers, roles, roles, _grid(mine))
        made.append((path, f"{title} (layers down, roles across)"))
    part.charts(made)
    skipped = r.get("numerics_skipped")
    if isinstance(skipped, dict):
        part.notes([f"{fmt}: not computed here: {why}" for fmt, why in skipped.items()])


def section(records: list[tuple[str, dict[str, Any]]], out_dir: Path, img: Img) -> tuple[str, str, dict[str, Path]]:
    """(HTML, Markdown, PNGs by file name) of the section for (heading, record) pairs; ('', '', {}) when no
    record has numerics. A field that cannot be read is a line saying why, never an exception."""
    part, problems = _Part(out_dir, img), []
    for n, (heading, r) in enumerate(records, start=1):
        mode = str(r.get("mode"))
        for field, draw in (("numerics", _training), ("numerics_whatif", _whatif)):
            cells, why = nt.read(r, field)
            if why:
                problems.append(f"{heading}: {mode}: not drawn: {why}")
            elif cells:
                draw(
                    part, f"numerics{n}-{slug(mode)}-{'train' if field == 'numerics' else 'whatif'}", heading, r, cells
                )
    if not part.page and not problems:
        return "", "", {}
    has = [any(nt.present(r, f) for f in nt.FIELDS) for _, r in records]
    drawn = {heading for (heading, _), h in zip(records, has, strict=True) if h}
    missing = [f"{heading}: {r.get('mode')}: no numerics: {r['numerics_reason']}"
               for (heading, r), h in zip(records, has, strict=True)
               if heading in drawn and not h and r.get("numerics_reason")]  # fmt: skip
    part.notes(problems + missing)
    page = f'<h2 id="{ANCHOR}">{TITLE}</h2><p>{html.escape(ABOUT)}</p>' + "".join(part.page)
    md = "\n".join([f"## {TITLE}", "", ABOUT, *part.md])
    return page, md, part.written
