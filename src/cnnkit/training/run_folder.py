"""The run folder: one training run's files, and reading and writing them atomically.

::

    runs/001/
      spec.toml          the exact architecture (written before the first step)
      config.json        every option, the data source and its digest, versions (idem)
      classes.json       the class names, in label order
      metrics.csv        one row per completed epoch (columns: METRICS_COLUMNS)
      last.safetensors   weights + optimizer state, end of every epoch and every ~2 min
      last.json          its sidecar: epoch, step, position in the epoch, scalars
      best.safetensors   weights of the epoch with the best validation accuracy
      best.json          its sidecar
      methods.json       the implementation choices used (cnnkit.kernels.tuning)

Every file is replaced atomically (:func:`cnnkit._files.write_atomic`); temporary files
left by a killed process (``.*.tmp``) are deleted when a run starts or resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cnnkit._files import remove_leftovers, write_atomic
from cnnkit.models.spec import ArchitectureSpec

METRICS_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "lr",
    "images_per_s",
    "seconds",
)
CHECKPOINTS = ("best", "last")
CONFIG_FORMAT = "cnnkit-run/1"


class RunFolder:
    """Paths of one run's files; ``RunFolder(path).config`` is ``path/config.json`` etc."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.spec = self.path / "spec.toml"
        self.config = self.path / "config.json"
        self.classes = self.path / "classes.json"
        self.metrics = self.path / "metrics.csv"
        self.methods = self.path / "methods.json"

    def checkpoint(self, which: str) -> Path:
        """``best`` or ``last`` -> the path of that ``.safetensors`` file."""
        if which not in CHECKPOINTS:
            allowed = ", ".join(repr(c) for c in CHECKPOINTS)
            raise ValueError(f"checkpoint must be one of {allowed}, got {which!r}")
        return self.path / f"{which}.safetensors"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"


# --------------------------------------------------------------------------------------
# Creating and opening
# --------------------------------------------------------------------------------------


def new_run_folder(root: str | os.PathLike[str] = "runs") -> Path:
    """Create and return the next numbered folder ``root/001``, ``root/002``, ...

    Numbers continue after the highest existing one; creation is exclusive, so two
    runs started at once never share a folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in root.iterdir() if re.fullmatch(r"\d+", p.name)]
    number = max(taken, default=0) + 1
    while True:
        path = root / f"{number:03d}"
        try:
            path.mkdir()
        except FileExistsError:
            number += 1
            continue
        return path


def prepare_new_run(out: str | os.PathLike[str] | None) -> RunFolder:
    """The folder a new run writes to: ``out`` (created, must not hold a run) or the next
    numbered folder under ``runs/``."""
    if out is None:
        return RunFolder(new_run_folder())
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {str(path)!r} exists and is not a folder")
    if (path / "config.json").exists():
        raise ValueError(
            f"--out {str(path)!r} already holds a run; continue it with --resume {path} "
            "or choose another folder"
        )
    path.mkdir(parents=True, exist_ok=True)
    return RunFolder(path)


def open_run(path: str | os.PathLike[str]) -> RunFolder:
    """An existing run folder (one with a config.json); a clear error if it is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"run folder {str(path)!r} is not a folder")
    run = RunFolder(path)
    if not run.config.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a run folder: it has no config.json")
    return run


def clean_leftovers(run: RunFolder) -> list[Path]:
    """Delete temporary files a killed write left behind; return what was removed."""
    return remove_leftovers(run.path)


# --------------------------------------------------------------------------------------
# config.json and classes.json
# --------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of the software that shapes a run's numbers."""
    import numpy
    import torch

    from cnnkit import __version__

    return {
        "cnnkit": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({error})") from None


def read_methods(run: RunFolder) -> dict[str, str]:
    """The implementation choices the run has used (:mod:`cnnkit.kernels.tuning`), case
    by case; none for a run that recorded none."""
    if not run.methods.exists():
        return {}
    methods = read_json(run.methods, "methods file")
    if not isinstance(methods, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in methods.items()
    ):
        raise ValueError(
            f"methods file {str(run.methods)!r} must map each case to a method, got "
            f"{type(methods).__name__}"
        )
    return methods


def record_methods(run: RunFolder, methods: Mapping[str, str]) -> None:
    """Add ``methods`` to the run's methods file (cases already there keep theirs)."""
    recorded = read_methods(run)
    merged = {**methods, **recorded}
    if merged != recorded:
        write_json(run.methods, merged)


def read_config(run: RunFolder) -> dict[str, Any]:
    """The run's ``config.json``, checked for the keys every verb relies on."""
    config = read_json(run.config, "run config")
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"{str(run.config)!r} is not a cnnkit run config")
    for key in ("training", "data", "model"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"run config {str(run.config)!r} lacks its {key!r} section")
    return config


def spec_digest(text: str) -> str:
    """sha256 of a ``spec.toml``'s text, recorded in ``config.json`` as ``spec_sha256``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_run_spec(run: RunFolder, config: Mapping[str, Any]) -> ArchitectureSpec | None:
    """The architecture a run trained, from its ``spec.toml``, checked against
    ``config.json``; ``None`` for a run of a custom module (it has no spec).

    A missing ``spec.toml``, or one that is not the file the run started with (another
    network's, or a ``config.json`` edited to name another network), is an error
    saying which file disagrees with which.
    """
    recorded = config["model"]
    name = recorded.get("name")
    if recorded.get("spec") is None and not run.spec.exists():
        return None
    where = f"run {str(run.path)!r}"
    if not run.spec.is_file():
        raise FileNotFoundError(
            f"{where} lacks its spec.toml (config.json says it trained {name!r}); "
            "restore the file from a copy of the run"
        )
    text = run.spec.read_text(encoding="utf-8")
    spec = ArchitectureSpec.from_toml(text)
    digest = recorded.get("spec_sha256")
    if spec.name != name:
        raise ValueError(
            f"{where}: spec.toml describes {spec.name!r} but config.json says the run "
            f"trained {name!r}; one of the two files was replaced"
        )
    if digest is not None and spec_digest(text) != digest:
        raise ValueError(
            f"{where}: spec.toml is not the file the run started with (its sha256 differs "
            "from the one config.json records); restore it from a copy of the run"
        )
    return spec


def require_run_spec(
    run: RunFolder, config: Mapping[str, Any], verb: str, function: str
) -> ArchitectureSpec:
    """:func:`read_run_spec`, for a caller that must build the network itself: a run of
    a custom module is an error saying how to ``verb`` it with ``function(model=...)``."""
    spec = read_run_spec(run, config)
    if spec is None:
        raise ValueError(
            f"run {str(run.path)!r} trained a custom module (it has no spec.toml); "
            f"{verb} it from Python with {function}(..., model=that module)"
        )
    return spec


def utc_now() -> str:
    """The time now, as config.json and the checkpoints' sidecars record it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_classes(run: RunFolder, class_names: Sequence[str]) -> None:
    write_json(run.classes, list(class_names))


def read_classes(run: RunFolder) -> list[str]:
    names = read_json(run.classes, "class list")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"class list {str(run.classes)!r} must be a JSON list of names")
    return names


# --------------------------------------------------------------------------------------
# metrics.csv
# --------------------------------------------------------------------------------------


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "epoch":
        return str(int(value))
    if column in ("images_per_s", "seconds"):
        return f"{float(value):.2f}"
    return repr(float(value))  # round-trips exactly


def metrics_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """The CSV text of ``rows`` (dicts keyed by :data:`METRICS_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRICS_COLUMNS)
    for row in rows:
        writer.writerow([_cell(c, row.get(c)) for c in METRICS_COLUMNS])
    return buffer.getvalue()


def write_metrics(run: RunFolder, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``metrics.csv`` with ``rows`` (the file is small; rewriting keeps it atomic)."""
    write_atomic(run.metrics, metrics_text(rows))


def read_metrics(run: RunFolder) -> list[dict[str, float | int | None]]:
    """Rows of ``metrics.csv`` as dicts; empty cells become ``None``."""
    if not run.metrics.is_file():
        return []
    with run.metrics.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != METRICS_COLUMNS:
            raise ValueError(
                f"{str(run.metrics)!r} does not have the columns {','.join(METRICS_COLUMNS)}"
            )
        rows: list[dict[str, float | int | None]] = []
        for line, raw in enumerate(reader, start=2):
            try:
                rows.append(
                    {
                        c: (
                            None
                            if raw[c] in ("", None)
                            else int(raw[c])
                            if c == "epoch"
                            else float(raw[c])
                        )
                        for c in METRICS_COLUMNS
                    }
                )
            except (TypeError, ValueError):
                raise ValueError(f"{str(run.metrics)!r} line {line} is not a metrics row") from None
    return rows
