"""Plain-text tables for the command line."""

from __future__ import annotations


def fmt(value: float | None, spec: str) -> str:
    """A number in `spec`, or '-' for a figure that was not measured."""
    return "-" if value is None else format(value, spec)


def table(rows: list[list[object]], header: list[str]) -> str:
    """Left-aligned columns with a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
