"""Saving specs to TOML and JSON and loading them back, exactly, as plain functions.

A spec becomes a nested dict of plain values (keys equal to the dataclass fields; a
field left at ``None`` is omitted, since TOML has no null). Loading checks every key,
so a misspelt option is an error naming it, never silently ignored. Each function here
is the same door as a method of :class:`~cnnkit.models.spec.ArchitectureSpec`; the
class-free work lives in :mod:`cnnkit.models._codec`, so this module imports the spec
and the spec never imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.models.spec import ArchitectureSpec


def spec_to_dict(spec: ArchitectureSpec) -> dict[str, Any]:
    """The spec as nested dicts and lists of str/int/float/bool."""
    return spec.to_dict()


def spec_from_dict(data: dict[str, Any]) -> ArchitectureSpec:
    """Rebuild a spec from :func:`spec_to_dict`'s output, checking every key."""
    return ArchitectureSpec.from_dict(data)


def spec_to_toml(spec: ArchitectureSpec) -> str:
    """The spec as a TOML document (``[[stages]]`` tables in order)."""
    return spec.to_toml()


def spec_from_toml(text: str) -> ArchitectureSpec:
    """Parse a TOML spec; a syntax error names its line and column."""
    return ArchitectureSpec.from_toml(text)


def spec_to_json(spec: ArchitectureSpec) -> str:
    return spec.to_json()


def spec_from_json(text: str) -> ArchitectureSpec:
    """Parse a JSON spec; a syntax error names its line and column."""
    return ArchitectureSpec.from_json(text)


def load_spec(path: str | Path) -> ArchitectureSpec:
    """Read a ``.toml`` or ``.json`` spec file; errors are prefixed with the file name."""
    return ArchitectureSpec.load(path)


def save_spec(spec: ArchitectureSpec, path: str | Path) -> None:
    """Write ``spec`` to a ``.toml`` or ``.json`` file atomically."""
    spec.save(path)
