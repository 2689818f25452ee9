"""Plain-text tables for the terminal and numbers in SI form: the one formatter every command prints with."""

from __future__ import annotations

from collections.abc import Sequence


def si_format(value: float | None) -> str:
    """``11689512 -> "11.69M"``, ``1.8e9 -> "1.80G"``; ``None -> "-"`` (a count a failed run does not have)."""
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def format_table(rows: Sequence[Sequence[str]], *, left: int = 1, rule: bool = False, free_last: bool = False) -> str:
    """``rows`` (the first is the header) as aligned text, columns two spaces apart: the first ``left`` columns
    left-aligned (names), the others right-aligned (numbers); ``rule`` draws a line of dashes under the header;
    ``free_last`` prints the last column unpadded (a note of any length)."""
    aligned = len(rows[0]) - free_last
    widths = [max(len(row[i]) for row in rows) for i in range(aligned)]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(w) if i < left else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row[:aligned], widths, strict=True))]
        return "  ".join([*cells, *row[aligned:]])

    lines = [line(row) for row in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
