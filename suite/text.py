"""Text helpers: tables and numbers for the command line, file-name slugs, log lines."""

from __future__ import annotations

import re
import sys


def fmt(value: float | None, spec: str) -> str:
    """A number in `spec`, or '-' for a figure that was not measured."""
    return "-" if value is None else format(value, spec)


def table(rows: list[list[object]], header: list[str]) -> str:
    """Left-aligned columns with a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def slug(text: str) -> str:
    """Lower-case letters and digits joined by '-': a machine name fit for a file name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def log_to_stderr(line: str) -> None:
    """Progress and status lines go to stderr, flushed, so stdout keeps the tables."""
    print(line, file=sys.stderr, flush=True)
