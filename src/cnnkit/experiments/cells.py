"""Running a study's cells: each one an ordinary run folder, skipped when done, resumed
when killed, several at once with ``jobs``.

An experiment folder holds::

    experiment.json        the study, its options, its cells (written first)
    data/size<N>-seed<s>.npz   the images each cell trains on (see subsets)
    cells/<name>/          one run folder per cell (``cnnkit evaluate/curves/filters/show``)
    cells/<name>.json      the cell's result, written when its training is over
    results.csv/.json/.md  and the study's PNG plots

A cell with a result file is finished and is not trained again; a cell whose run folder
exists without one was interrupted and continues from its ``last`` checkpoint with
:func:`cnnkit.training.resume` (exactly where it stopped, as a resumed ``cnnkit train``).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.data import load
from cnnkit.experiments.subsets import VAL_FRACTION
from cnnkit.kernels import tuning
from cnnkit.models.spec import ArchitectureSpec
from cnnkit.training import TrainConfig, evaluate, fit, load_run, read_metrics, resume
from cnnkit.training.run_folder import RunFolder, read_json, write_json

EXPERIMENT_FORMAT = "cnnkit-experiment/1"
MARKER = "experiment.json"


@dataclass(frozen=True)
class Cell:
    """One training run of a study.

    ``name`` is its folder under ``cells/``; ``labels`` are the columns that say which
    cell it is in the results (family, size, seed; or the grid's fields).
    """

    name: str
    labels: Mapping[str, Any]
    spec: ArchitectureSpec
    config: TrainConfig
    data: Path
    notes: tuple[str, ...] = field(default=())


def open_experiment(folder: Path, study: str, options: Mapping[str, Any]) -> None:
    """Create ``folder`` for ``study`` or check that it already holds the same experiment.

    Refuses a folder made by another command (a run folder, another study, other options)
    with a message naming the difference.
    """
    marker = folder / MARKER
    options = json.loads(json.dumps(dict(options)))  # as JSON reads it back: lists, not tuples
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {str(folder)!r} exists and is not a folder")
    if marker.is_file():
        recorded = read_json(marker, "experiment file")
        if recorded.get("format") != EXPERIMENT_FORMAT:
            raise ValueError(f"{marker} is not a cnnkit experiment file")
        if recorded.get("study") != study:
            raise ValueError(
                f"--out {str(folder)!r} holds a `cnnkit experiment {recorded.get('study')}` "
                f"experiment, not {study}; choose another --out"
            )
        before = recorded.get("options", {})
        for key in sorted(set(before) | set(options)):
            if before.get(key) != options.get(key):
                raise ValueError(
                    f"--out {str(folder)!r} holds this study run with {key} = "
                    f"{before.get(key)!r}, not {options.get(key)!r}; rerun with the same "
                    "options to continue it, or choose another --out"
                )
        return
    if (folder / "config.json").is_file():
        raise ValueError(
            f"--out {str(folder)!r} is a run folder (made by `cnnkit train`), not an "
            "experiment folder; choose another --out"
        )
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(
            f"--out {str(folder)!r} is not empty and is not an experiment folder (no "
            f"{MARKER}); choose another --out"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"format": EXPERIMENT_FORMAT, "study": study, "options": options})


def _result_path(folder: Path, cell: Cell) -> Path:
    return folder / "cells" / f"{cell.name}.json"


def run_cell(folder: Path, cell: Cell, threads: int | None = None) -> dict[str, Any]:
    """Train (or continue) one cell and return its result row; see the module docstring.

    The row holds the cell's labels, ``weights`` (trainable parameters), ``train_accuracy``
    and ``test_accuracy`` of its best checkpoint (by validation accuracy) on the images
    it fitted and on the test set, ``gap`` (their difference), ``seconds`` (training and
    per-epoch evaluation, summed over ``metrics.csv``), ``run`` (the run folder, relative
    to the experiment folder) and ``trained`` (whether this call trained anything).
    """
    result = _result_path(folder, cell)
    if result.is_file():
        return {**read_json(result, "cell result"), "trained": False}
    run_dir = folder / "cells" / cell.name
    data = load(
        cell.data,
        (cell.spec.input.height, cell.spec.input.width),
        val_fraction=VAL_FRACTION,
        seed=cell.config.seed,
    )
    if RunFolder(run_dir).config.is_file():
        resume(run_dir, data=data, threads=threads)
    else:
        config = cell.config
        if threads is not None:
            config = TrainConfig(**{**config.to_dict(), "threads": threads})
        fit(cell.spec, data, config, out=run_dir)
    loaded = load_run(run_dir, "best")
    fitted = evaluate(loaded.model, data.train, batch_size=256)
    tested = evaluate(loaded.model, data.test, batch_size=256)
    row = {
        **cell.labels,
        "weights": loaded.config["model"]["parameters"],
        "train_accuracy": fitted.accuracy,
        "test_accuracy": tested.accuracy,
        "gap": fitted.accuracy - tested.accuracy,
        "seconds": sum(r["seconds"] for r in read_metrics(RunFolder(run_dir))),
        "run": str(run_dir.relative_to(folder)),
    }
    write_json(result, row)
    return {**row, "trained": True}


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def describe(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A cell's progress line after the bar: its labels, accuracies, weights and time."""
    what = ", ".join(f"{k} {row[k]}" for k in keys)
    state = "" if row.get("trained", True) else " (done before)"
    return (
        f"{what}: test {100 * row['test_accuracy']:.1f}%, train "
        f"{100 * row['train_accuracy']:.1f}%, {row['weights']:,} weights, "
        f"{row['seconds']:.0f} s{state}"
    )


def run_cells(
    folder: Path,
    cells: Sequence[Cell],
    *,
    jobs: int = 1,
    report: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell (``jobs`` at a time, each with ``cpus // jobs`` threads) and return
    their rows in the order of ``cells``; ``report`` gets one line per finished cell."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError("two cells of the study have the same name")
    rows: dict[str, dict[str, Any]] = {}
    total = len(cells)
    start = time.monotonic()

    def finished(cell: Cell, row: dict[str, Any]) -> None:
        rows[cell.name] = row
        if report is not None:
            elapsed = time.monotonic() - start
            report(f"{_bar(len(rows), total)} {elapsed:.0f} s  {describe(row, list(cell.labels))}")

    if jobs == 1 or total <= 1:
        for cell in cells:
            finished(cell, run_cell(folder, cell))
        return [rows[n] for n in names]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_as_worker
    ) as pool:
        futures = {pool.submit(run_cell, folder, cell, threads): cell for cell in cells}
        for future in concurrent.futures.as_completed(futures):
            finished(futures[future], future.result())
    return [rows[n] for n in names]


def _as_worker() -> None:
    """A worker process reads the machine's kept choices but measures none."""
    os.environ.update(tuning.worker_environment(os.environ))


def mean_and_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, min, max)`` of ``values``."""
    return (math.fsum(values) / len(values), min(values), max(values))
