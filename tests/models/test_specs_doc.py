"""docs/specs.md lists every field of the spec dataclasses, with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cnnkit.models import spec as specs

DOC = Path(__file__).resolve().parents[2] / "docs" / "specs.md"

SECTIONS = {
    "Top level": specs.ArchitectureSpec,
    "`[input]`": specs.InputSpec,
    "`[[stages]]` (one per stage, in order)": specs.StageSpec,
    "`[stages.filters]`": specs.FilterBankSpec,
    "`[stages.norm]`": specs.NormSpec,
    "`[stages.pool]`": specs.PoolSpec,
    "`[classifier]`": specs.ClassifierSpec,
}


def documented() -> dict[str, dict[str, str]]:
    """section title -> {key: default cell}."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            tables[section] = {}
        elif section and re.match(r"\| `\w+` \|", line):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[section][cells[0].strip("`")] = cells[2]
    return tables


def toml_text(value: object) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    return f"`{value}`"


@pytest.mark.parametrize("title", list(SECTIONS))
def test_every_field_is_documented_with_its_default(title: str) -> None:
    rows = documented()[title]
    fields = dataclasses.fields(SECTIONS[title])
    assert sorted(rows) == sorted(f.name for f in fields)
    for field in fields:
        cell = rows[field.name]
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            assert cell == "*required*", field.name
        elif field.default is None:
            assert cell.startswith("none"), field.name
        else:
            default = field.default
            assert cell == toml_text(default), (field.name, cell)


def test_the_examples_parse() -> None:
    """The examples of one section, together, are a valid table of that kind."""
    import tomllib

    for title, kind in SECTIONS.items():
        rows = DOC.read_text(encoding="utf-8").split(f"## {title}\n", 1)[1].split("\n## ")[0]
        examples = re.findall(r"\| `(\w+ = [^`]+)` \|$", rows, flags=re.M)
        values = tomllib.loads("\n".join(examples))
        names = {f.name for f in dataclasses.fields(kind)}
        assert set(values) <= names, title
