"""Saving specs to TOML and JSON and loading them back, exactly.

A spec becomes a nested dict of plain values (keys equal to the dataclass fields; a
field left at ``None`` is omitted, since TOML has no null). Loading checks every key,
so a misspelt option is an error naming it, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from cnnkit._files import write_atomic
from cnnkit.models.spec import (
    ArchitectureSpec,
    ClassifierSpec,
    FilterBankSpec,
    InputSpec,
    NormSpec,
    PoolSpec,
    StageSpec,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def _plain(part: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = _plain(value)
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[f.name] = value
    return out


def spec_to_dict(spec: ArchitectureSpec) -> dict[str, Any]:
    """The spec as nested dicts and lists of str/int/float/bool."""
    data = _plain(spec)
    data["stages"] = [_plain(stage) for stage in spec.stages]
    return data


def _build(cls: type, data: Any, where: str) -> Any:
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
    """The error's text without the part's own prefix, which ``where`` replaces."""
    message = str(error)
    for part in ("filters", "norm", "pool", "stage", "input", "classifier"):
        if message.startswith(f"{part}: "):
            return message[len(part) + 2 :]
    return message


def spec_from_dict(data: dict[str, Any]) -> ArchitectureSpec:
    """Rebuild a spec from :func:`spec_to_dict`'s output, checking every key."""
    if not isinstance(data, dict):
        raise ValueError(f"spec: expected a table of keys, got {type(data).__name__}")
    data = dict(data)
    for key in ("name", "input", "stages", "classifier"):
        if key not in data:
            raise ValueError(f"spec: missing key {key!r}")
    if not isinstance(data["stages"], list):
        raise ValueError(f"spec: stages must be a list of stage tables, got {data['stages']!r}")
    stages = []
    for number, raw in enumerate(data["stages"], start=1):
        where = f"stage {number}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a table of keys, got {raw!r}")
        raw = dict(raw)
        if "filters" not in raw:
            raise ValueError(f"{where}: missing key 'filters'")
        raw["filters"] = _build(FilterBankSpec, raw["filters"], f"{where} filters")
        if "norm" in raw:
            raw["norm"] = _build(NormSpec, raw["norm"], f"{where} norm")
        if "pool" in raw:
            raw["pool"] = _build(PoolSpec, raw["pool"], f"{where} pool")
        stages.append(_build(StageSpec, raw, where))
    data["input"] = _build(InputSpec, data["input"], "input")
    data["classifier"] = _build(ClassifierSpec, data["classifier"], "classifier")
    data["stages"] = tuple(stages)
    known = {f.name for f in dataclasses.fields(ArchitectureSpec)}
    for key in data:
        if key not in known:
            raise ValueError(f"spec: unknown key {key!r} (allowed: {', '.join(sorted(known))})")
    return ArchitectureSpec(**data)


# --------------------------------------------------------------------------------------
# TOML
# --------------------------------------------------------------------------------------


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


def spec_to_toml(spec: ArchitectureSpec) -> str:
    """The spec as a TOML document (``[[stages]]`` tables in order)."""
    data = spec_to_dict(spec)
    top = {k: v for k, v in data.items() if k not in ("input", "stages", "classifier")}
    lines = _toml_table("", top) + [""] + _toml_table("input", data["input"])
    for stage in data["stages"]:
        lines += ["", "[[stages]]"] + _toml_table("", stage)
        for part in ("filters", "norm", "pool"):
            if part in stage:
                lines += _toml_table(f"stages.{part}", stage[part])
    lines += [""] + _toml_table("classifier", data["classifier"])
    return "\n".join(lines) + "\n"


def spec_from_toml(text: str) -> ArchitectureSpec:
    """Parse a TOML spec; a syntax error names its line and column."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"spec is not valid TOML: {error}") from None
    return spec_from_dict(data)


def spec_to_json(spec: ArchitectureSpec) -> str:
    return json.dumps(spec_to_dict(spec), indent=2) + "\n"


def spec_from_json(text: str) -> ArchitectureSpec:
    """Parse a JSON spec; a syntax error names its line and column."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"spec is not valid JSON: {error}") from None
    return spec_from_dict(data)


def load_spec(path: str | Path) -> ArchitectureSpec:
    """Read a ``.toml`` or ``.json`` spec file; errors are prefixed with the file name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ValueError(f"spec file {str(path)!r} must end in .toml or .json")
    try:
        return spec_from_toml(text) if suffix == ".toml" else spec_from_json(text)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def save_spec(spec: ArchitectureSpec, path: str | Path) -> None:
    """Write ``spec`` to a ``.toml`` or ``.json`` file atomically."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        write_atomic(path, spec_to_json(spec))
    elif path.suffix.lower() == ".toml":
        write_atomic(path, spec_to_toml(spec))
    else:
        raise ValueError(f"spec file {str(path)!r} must end in .toml or .json")
