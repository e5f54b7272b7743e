"""The page of an experiment folder: its results table, its plots, links to its cells.

An experiment folder holds ``results.md`` and/or ``results.json``, plots as ``*.png``,
and one run folder per cell (a sub-folder, at any depth, with a ``config.json``). The
page shows ``results.md`` as written (or ``results.json`` when there is no Markdown),
every plot inline, and one row per cell linking the cell's ``report.html`` by relative
path when it exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cnnkit.report import page

RESULTS = ("results.md", "results.json")
EXPERIMENT_SECTIONS = ("Results", "Plots", "Cells")


def is_experiment(folder: Path) -> bool:
    """True for a folder with results files and no run of its own (no ``config.json``)."""
    return (
        folder.is_dir()
        and not (folder / "config.json").exists()
        and any((folder / name).is_file() for name in RESULTS)
    )


def _cells(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.rglob("config.json") if p.parent != folder)


def experiment_html(folder: Path, out: Path) -> str:
    """The page of experiment ``folder``; links are relative to ``out``'s folder."""
    markdown, results = folder / "results.md", folder / "results.json"
    if markdown.is_file():
        table = page.pre(markdown.read_text(encoding="utf-8"))
    else:
        try:
            table = page.pre(json.dumps(json.loads(results.read_text(encoding="utf-8")), indent=2))
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(results)!r} is not valid JSON ({error})") from None
    plots = [
        page.png_image(path.read_bytes(), f"experiment plot {path.stem}")
        for path in sorted(folder.glob("*.png"))
    ]
    rows = []
    for cell in _cells(folder):
        name = cell.relative_to(folder).as_posix()
        report = cell / "report.html"
        if report.is_file():
            link = Path(os.path.relpath(report.resolve(), out.resolve().parent)).as_posix()
            rows.append(f'<li><a href="{page.escape(link)}">{page.escape(name)}</a></li>')
        else:
            rows.append(f"<li>{page.escape(name)} (no report.html yet)</li>")
    sections = [
        page.section("Results", "The experiment's table, as it wrote it.", table),
        page.section(
            "Plots",
            "The experiment's own figures." if plots else "The experiment has no plots.",
            *plots,
        ),
        page.section(
            "Cells",
            "One run per cell; each links its own report where one was written.",
            f"<ul>{''.join(rows)}</ul>" if rows else "<p>No cell run folders found.</p>",
        ),
    ]
    return page.document(f"cnnkit report: experiment {folder.name}", str(folder.name), sections)
