"""Text helpers: tables and numbers for the command line, file-name slugs, log lines."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text


def fmt(value: float | None, spec: str) -> str:
    """A number in `spec`, or '-' for a figure that was not measured."""
    return "-" if value is None else format(value, spec)


def _is_figure(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,.]+(e[-+]?\d+)?%?", text))


# a rule of dashes under the header and nothing else, as plain as a log wants it
DASHED = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


def _figures(cells: list[str]) -> bool:
    return bool(cells) and all(_is_figure(c) or c == "-" for c in cells) and any(_is_figure(c) for c in cells)


def rich_table(rows: list[list[object]], header: list[str], right: set[int] | None = None, ascii: bool = True) -> Table:
    """A rich table with a rule under the header (dashes, or a line on a terminal with `ascii=False`);
    columns of figures (or those in `right`) right-aligned. A figure never wraps and is never cut
    short: were its column squeezed, it folds onto a second line rather than end in an ellipsis."""
    return fit_table(rows, header, None, right=right, ascii=ascii).table


# A column of sentences (a reason) wraps at its words; narrower than this a reason of a line or two
# grows into a tall column, and it reads better left out of the table (the caller prints it below).
PROSE_MIN = 40
# Between two columns: one space of padding and the (blank) divider.
GAP = 2


@dataclass(frozen=True)
class Fit:
    """A table fitted to a width: the columns it left out, and the width that would show them all."""

    table: Table
    left_out: list[str]
    full_width: int


def _words(text: str) -> int:
    return max((cell_len(w) for w in text.split()), default=0)


def fit_table(rows: list[list[object]], header: list[str], width: int | None, drop: Sequence[str] = (),
              prose: Sequence[str] = (), right: set[int] | None = None, ascii: bool = True) -> Fit:  # fmt: skip
    """`rows` under `header` in at most `width` terminal columns (None: no limit).

    A figure or a name is never shortened: figure columns never wrap, name columns wrap only at
    spaces, so every column has a minimum width. When those minima do not fit, whole columns are
    left out, the names in `drop` first to go first; `prose` columns (sentences) wrap at words down
    to PROSE_MIN columns (a word longer than the column folds). What was left out is in
    `Fit.left_out`, for the caller to say so."""
    texts = [[c.plain if isinstance(c, Text) else str(c) for c in r] for r in rows]
    cols = [[r[i] for r in texts] for i in range(len(header))]
    figure = [right is not None and i in right or (right is None and _figures(cells)) for i, cells in enumerate(cols)]
    least, most = [], []
    for i, (name, cells) in enumerate(zip(header, cols, strict=True)):
        if figure[i]:  # a figure is one unbreakable word; the header may wrap above it
            low = max([cell_len(c) for c in cells] + [_words(name)])
        elif name in prose:
            low = max(min(PROSE_MIN, max([cell_len(c) for c in cells], default=0)), _words(name))
        else:  # a name (mode, model, status) breaks only at its spaces
            low = max([_words(c) for c in cells] + [_words(name)])
        least.append(max(low, 1))
        most.append(max([cell_len(c) for c in cells] + [cell_len(name)]))

    def need(keep: list[int]) -> int:
        return sum(least[i] for i in keep) + GAP * (len(keep) - 1)

    keep = list(range(len(header)))
    full_width = need(keep)
    for name in drop:
        if width is None or need(keep) <= width:
            break
        keep = [i for i in keep if header[i] != name]
    widths: dict[int, int | None] = dict.fromkeys(keep)
    # Fixed widths only where every kept minimum fits: on a terminal too narrow even for the columns that
    # always stay, rich squeezes them and a figure folds onto a second line (whole, never an ellipsis).
    if width is not None and need(keep) <= width < sum(most[i] for i in keep) + GAP * (len(keep) - 1):
        # fixed widths, so that rich never squeezes a column below its minimum: each column starts at
        # its minimum; the room left goes first to names and figures (in column order), then to prose
        spare = width - need(keep)
        order = [i for i in keep if header[i] not in prose] + [i for i in keep if header[i] in prose]
        for i in order:
            grow = max(0, min(spare, most[i] - least[i]))
            widths[i], spare = least[i] + grow, spare - grow

    t = Table(box=DASHED if ascii else box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
              header_style="bold")  # fmt: skip
    for i in keep:
        t.add_column(Text(header[i], no_wrap=False, overflow="fold"), justify="right" if figure[i] else "left",
                     no_wrap=figure[i], overflow="fold", width=widths[i])  # fmt: skip
    for r in rows:  # as Text: a '[' in a reason is text, never rich markup
        t.add_row(*(r[i] if isinstance(r[i], Text) else Text(str(r[i])) for i in keep))
    return Fit(t, [header[i] for i in range(len(header)) if i not in keep], full_width)


def render(renderable: object) -> str:
    """What `console().print` would write to a pipe, as a string, without trailing blanks."""
    buf = io.StringIO()
    Console(file=buf, width=100_000, no_color=True, highlight=False, color_system=None).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()).strip("\n")


def show(console: Console, table: Table, notes: Sequence[str] = ()) -> None:
    """`table` and the lines under it. On a terminal through `console`: coloured, the table as fitted,
    each note wrapped at its words. Elsewhere (a pipe, a log) plain text, one line per row and note."""
    if console.is_terminal:
        console.print(table)
        for line in notes:
            console.print(Text(line))
    else:
        print("\n".join([render(table), *notes]), file=console.file)


def table(rows: list[list[object]], header: list[str]) -> str:
    """Columns under a header and a rule, as plain text (rendered by rich)."""
    return render(rich_table(rows, header))


def slug(text: str) -> str:
    """Lower-case letters and digits joined by '-': a machine name fit for a file name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def shown(text: object) -> str:
    """`text` (a path, a file name) fit for any UTF-8 output: bytes of a name that are not UTF-8,
    which Python keeps as lone surrogates, read as backslash escapes instead of failing the write."""
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the name's own bytes back
    except UnicodeEncodeError:  # a surrogate that stands for no byte (a JSON \ud800 escape)
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def log_to_stderr(line: str) -> None:
    """Progress and status lines go to stderr, flushed, so stdout keeps the tables."""
    print(line, file=sys.stderr, flush=True)
