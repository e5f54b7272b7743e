"""Specs as plain data: nested dicts, TOML and JSON text, files.

This half of spec serialization knows dataclasses in general but no spec class in
particular, so :mod:`cnnkit.models.spec` can use it without importing
:mod:`cnnkit.models.serialize` (which imports the spec classes). A field left at
``None`` is omitted, since TOML has no null; :func:`build` checks every key, so a
misspelt option is an error naming it, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from cnnkit._files import write_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def plain(part: Any) -> dict[str, Any]:
    """A frozen spec dataclass as a dict of plain values (``None`` fields left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = plain(value)
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[f.name] = value
    return out


def build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` after checking that ``data`` is a table of known keys;
    every error is prefixed with ``where``."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table of keys, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ValueError(f"{where}: unknown key {key!r} (allowed: {allowed})")
    try:
        return cls(**data)
    except TypeError as error:
        if "missing" in str(error):
            required = [
                f.name
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            missing = [name for name in required if name not in data]
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}") from None
        raise TypeError(f"{where}: {_own_message(error)}") from None
    except ValueError as error:
        raise ValueError(f"{where}: {_own_message(error)}") from None


def _own_message(error: Exception) -> str:
    """The error's text without the part's own prefix (``pool: `` or the ``pool.`` of a
    field's dotted name), which ``where`` replaces."""
    message = str(error)
    for part in ("filters", "norm", "pool", "stage", "input", "classifier"):
        for prefix in (f"{part}: ", f"{part}."):
            if message.startswith(prefix):
                return message[len(prefix) :]
    return message


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml_table(header: str, table: dict[str, Any]) -> list[str]:
    lines = [f"[{header}]"] if header else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    return lines


def dict_to_toml(data: dict[str, Any]) -> str:
    """A spec's :func:`plain` dict as a TOML document (``[[stages]]`` tables in order)."""
    top = {k: v for k, v in data.items() if k not in ("input", "stages", "classifier")}
    lines = _toml_table("", top) + [""] + _toml_table("input", data["input"])
    for stage in data["stages"]:
        lines += ["", "[[stages]]"] + _toml_table("", stage)
        for part in ("filters", "norm", "pool"):
            if part in stage:
                lines += _toml_table(f"stages.{part}", stage[part])
    lines += [""] + _toml_table("classifier", data["classifier"])
    return "\n".join(lines) + "\n"


def dict_to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def parse_toml(text: str) -> Any:
    """Parse TOML text; a syntax error names its line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"spec is not valid TOML: {error}") from None


def parse_json(text: str) -> Any:
    """Parse JSON text; a syntax error names its line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"spec is not valid JSON: {error}") from None


def spec_file_suffix(path: str | Path) -> str:
    """``".toml"`` or ``".json"`` (lower case) for a spec file name, else ValueError."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ValueError(f"spec file {str(path)!r} must end in .toml or .json")
    return suffix


def read_spec_file(path: str | Path) -> tuple[str, str]:
    """(suffix, text) of an existing ``.toml`` or ``.json`` spec file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    return spec_file_suffix(path), text


def write_spec_file(path: str | Path, data: dict[str, Any]) -> None:
    """Write a :func:`plain` spec dict as TOML or JSON (by the suffix), atomically."""
    suffix = spec_file_suffix(path)
    write_atomic(Path(path), dict_to_toml(data) if suffix == ".toml" else dict_to_json(data))
