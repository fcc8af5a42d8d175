"""The two renderings every inference report prints: a rich table for the terminal, Markdown for files."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table


def rich_rows(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
              left: Sequence[str] = ()) -> Table:
    """A rich Table; columns named in ``left`` are left-aligned, the others (numbers) right-aligned."""
    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    for row in rows:
        t.add_row(*row)
    return t


def markdown_rows(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, one line per entry (header, rule, rows)."""
    return ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]
