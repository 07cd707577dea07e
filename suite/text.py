"""Text helpers: tables and numbers for the command line, file-name slugs, log lines."""

from __future__ import annotations

import io
import re
import sys

from rich import box
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


def rich_table(rows: list[list[object]], header: list[str], right: set[int] | None = None, ascii: bool = True) -> Table:
    """A rich table with a rule under the header (dashes, or a line on a terminal with `ascii=False`);
    columns of figures (or those in `right`) right-aligned."""
    t = Table(box=DASHED if ascii else box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
              header_style="bold")  # fmt: skip
    for i, name in enumerate(header):
        cells = [str(r[i]) for r in rows]
        figures = right is not None and i in right or (right is None and cells and all(
            _is_figure(c) or c == "-" for c in cells) and any(_is_figure(c) for c in cells))  # fmt: skip
        t.add_column(name, justify="right" if figures else "left")
    for r in rows:  # as Text: a '[' in a reason is text, never rich markup
        t.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in r))
    return t


def render(renderable: object) -> str:
    """What `console().print` would write to a pipe, as a string, without trailing blanks."""
    buf = io.StringIO()
    Console(file=buf, width=100_000, no_color=True, highlight=False, color_system=None).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()).strip("\n")


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
