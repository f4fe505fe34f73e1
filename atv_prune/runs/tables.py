"""The one table writer: rows (dicts with the same keys) as CSV or Markdown, written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .export import write_text_atomic


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text (header from the first row's keys)."""
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def markdown_text(rows: list[dict[str, Any]], digits: int = 2) -> str:
    """Rows as a Markdown table: floats with ``digits`` decimals, missing values as an en dash."""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` atomically as CSV (``.csv``) or Markdown (``.md``)."""
    path = Path(path)
    formats = {".csv": csv_text, ".md": markdown_text}
    if path.suffix not in formats:
        raise ValueError(f"no table format for {path.suffix!r}: use .csv or .md")
    write_text_atomic(path, formats[path.suffix](rows))
