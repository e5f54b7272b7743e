"""A study's results: ``results.csv`` (one row per cell), ``results.json`` (rows, tables,
notes, findings) and ``results.md`` (the tables as Markdown), all written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnkit._files import write_atomic
from cnnkit.training.run_folder import write_json


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """``rows`` as CSV with exactly ``columns``, in that order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    write_atomic(path, buffer.getvalue())


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def write_results(
    folder: Path,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    summary: Mapping[str, Any],
    markdown: str,
) -> list[Path]:
    """Write the three result files into ``folder``; return their paths."""
    paths = [folder / "results.csv", folder / "results.json", folder / "results.md"]
    clean = [{c: row[c] for c in columns} for row in rows]
    write_csv(paths[0], clean, columns)
    write_json(paths[1], {**summary, "rows": clean})
    write_atomic(paths[2], markdown.rstrip() + "\n")
    return paths
