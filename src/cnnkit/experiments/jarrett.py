"""Jarrett, Kavukcuoglu, Ranzato and LeCun (ICCV 2009), "What is the best multi-stage
architecture for object recognition?", as an ablation grid on any data.

Every cell is the preset with its filter banks learned or random and frozen (only the
classifier trains), its non-linearity none, ``|x|`` or ReLU, contrast normalization on or
off, average or max pooling, and one or two stages. The paper's three findings are then
checked against the measured test accuracies (:func:`findings`).

Architecture codes follow the paper's letters: ``F`` a filter bank, ``R_abs`` / ``R_relu``
a rectification, ``N`` local contrast normalization, ``P_A`` / ``P_M`` average or max
pooling; ``×2`` two such stages.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnkit.experiments.cells import Cell, open_experiment, run_cells
from cnnkit.experiments.plots import bar_plot
from cnnkit.experiments.results import markdown_table, percent, write_results
from cnnkit.experiments.subsets import study_images, write_subset
from cnnkit.models.presets import from_name
from cnnkit.models.spec import ArchitectureSpec, NormSpec
from cnnkit.training import TrainConfig

AXES: dict[str, tuple[Any, ...]] = {
    "filters": ("random", "learned"),
    "nonlinearity": ("none", "abs", "relu"),
    "normalization": ("off", "on"),
    "pooling": ("avg", "max"),
    "stages": (1, 2),
}
QUICK_AXES: dict[str, tuple[Any, ...]] = {
    "filters": ("random", "learned"),
    "nonlinearity": ("none", "abs"),
    "normalization": ("off", "on"),
    "pooling": ("max",),
    "stages": (1, 2),
}
DEFAULT_EPOCHS, QUICK_EPOCHS = 10, 8
COLUMNS = (
    "filters",
    "nonlinearity",
    "normalization",
    "pooling",
    "stages",
    "seed",
    "weights",
    "train_accuracy",
    "test_accuracy",
    "seconds",
    "run",
)
STUDY_TRAINING = {"augment": "none"}


def code(nonlinearity: str, normalization: str, pooling: str, stages: int) -> str:
    """The paper's letters for one stage, e.g. ``F-R_abs-N-P_M``, and ``×2`` for two."""
    parts = ["F"]
    if nonlinearity != "none":
        parts.append(f"R_{nonlinearity}")
    if normalization == "on":
        parts.append("N")
    parts.append({"avg": "P_A", "max": "P_M"}[pooling])
    return "-".join(parts) + (f" ×{stages}" if stages > 1 else "")


def cell_spec(
    base: ArchitectureSpec,
    filters: str,
    nonlinearity: str,
    normalization: str,
    pooling: str,
    stages: int,
) -> ArchitectureSpec:
    """``base`` cut to ``stages`` stages with the cell's choices in every stage.

    Normalization "on" keeps a stage's own normalization (or adds the default contrast
    normalization); pooling changes only the kind of a stage's pooling.
    """
    if stages > len(base.stages):
        raise ValueError(f"stages: {base.name!r} has {len(base.stages)} stages, not {stages}")
    changed = []
    for stage in base.stages[:stages]:
        changed.append(
            dataclasses.replace(
                stage,
                filters=dataclasses.replace(stage.filters, trainable=filters == "learned"),
                nonlinearity=(nonlinearity,),
                norm=(stage.norm or NormSpec()) if normalization == "on" else None,
                pool=None if stage.pool is None else dataclasses.replace(stage.pool, kind=pooling),
            )
        )
    return dataclasses.replace(base, stages=tuple(changed))


def jarrett(
    out: str | Path,
    *,
    data: str = "digits",
    spec: ArchitectureSpec | str = "digits28",
    seeds: int = 1,
    epochs: int | None = None,
    quick: bool = False,
    jobs: int = 1,
    axes: Mapping[str, Sequence[Any]] | None = None,
    training: Mapping[str, Any] | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the ablation grid into ``out`` on all of the training split; return
    ``results.json``'s data.

    The grid is :data:`AXES` (48 cells), :data:`QUICK_AXES` with ``quick`` (16 cells), or
    ``axes``. ``epochs`` defaults to 10 (quick: 8); ``training`` holds other
    :class:`~cnnkit.training.TrainConfig` options.
    """
    out = Path(out)
    base = from_name(spec) if isinstance(spec, str) else spec
    grid = dict(axes if axes is not None else (QUICK_AXES if quick else AXES))
    for name, values in grid.items():
        if name not in AXES:
            raise ValueError(f"axes: unknown axis {name!r}; expected one of {', '.join(AXES)}")
        for value in values:
            if value not in AXES[name]:
                raise ValueError(f"axes: {name} cannot be {value!r}; expected one of {AXES[name]}")
    epochs = epochs if epochs is not None else (QUICK_EPOCHS if quick else DEFAULT_EPOCHS)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
    images = study_images(data, (base.input.height, base.input.width))
    base = base.with_classes(images.train.num_classes)
    options = {**STUDY_TRAINING, **dict(training or {}), "epochs": epochs}
    open_experiment(
        out,
        "jarrett",
        {
            "data": images.source,
            "spec": base.to_dict(),
            "axes": {k: list(v) for k, v in grid.items()},
            "seeds": seeds,
            "training": options,
        },
    )
    keys = list(AXES)
    cells = []
    for seed in range(seeds):
        subset = write_subset(images, len(images.train), seed, out / "data")
        for values in itertools.product(*(grid[k] for k in keys)):
            choice = dict(zip(keys, values, strict=True))
            cell = cell_spec(base, **choice)
            name = "-".join(str(v) for v in values) + f"-seed{seed}"
            config = TrainConfig(**{**options, "seed": seed})
            cells.append(Cell(name, {**choice, "seed": seed}, cell, config, subset))
    rows = run_cells(out, cells, jobs=jobs, report=report)
    table = _table(rows, grid)
    summary = {
        **images.summary_head("jarrett", base.name, "training_images"),
        "axes": {k: list(v) for k, v in grid.items()},
        "seeds": seeds,
        "epochs": epochs,
        "table": table,
        "findings": findings(rows),
    }
    write_results(out, rows, COLUMNS, summary, _markdown(summary))
    labels = [t["code"] for t in table]
    bar_plot(
        out / "jarrett.png",
        labels,
        {f: [t[f] if t[f] is not None else 0.0 for t in table] for f in grid["filters"]},
        f"{base.name} on {Path(images.source).name}: random (frozen) against learned filters",
    )
    return summary


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, ...], float]:
    """Test accuracy averaged over seeds, keyed by the cell's five choices."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in AXES), []).append(row["test_accuracy"])
    return {key: sum(v) / len(v) for key, v in groups.items()}


def _table(rows: Sequence[Mapping[str, Any]], grid: Mapping[str, Sequence[Any]]):
    means = _means(rows)
    weights = {tuple(r[k] for k in AXES): r["weights"] for r in rows}
    table = []
    for stages, pooling, normalization, nonlinearity in itertools.product(
        grid["stages"], grid["pooling"], grid["normalization"], grid["nonlinearity"]
    ):
        entry: dict[str, Any] = {
            "code": code(nonlinearity, normalization, pooling, stages),
            "nonlinearity": nonlinearity,
            "normalization": normalization,
            "pooling": pooling,
            "stages": stages,
        }
        for filters in AXES["filters"]:
            key = (filters, nonlinearity, normalization, pooling, stages)
            entry[filters] = means.get(key)
            entry[f"{filters}_weights"] = weights.get(key)
        table.append(entry)
    return table


def _effect(means: Mapping[tuple[Any, ...], float], axis: str, low: set, high: set):
    """Mean test-accuracy change from a ``low`` to a ``high`` level of ``axis``, over the
    cells that agree on every other axis; ``None`` if no such pair was run."""
    where = list(AXES).index(axis)
    changes = []
    for key, value in means.items():
        if key[where] not in high:
            continue
        for other in low:
            twin = key[:where] + (other,) + key[where + 1 :]
            if twin in means:
                changes.append(value - means[twin])
    return sum(changes) / len(changes) if changes else None


def _gap(means: Mapping[tuple[Any, ...], float], rectified: bool, normalized: bool):
    """Mean learned − random accuracy over the cells with (or without) R and N."""
    gaps = []
    for key, value in means.items():
        filters, nonlinearity, normalization = key[:3]
        if filters != "learned":
            continue
        if (nonlinearity != "none") != rectified or (normalization == "on") != normalized:
            continue
        twin = ("random", *key[1:])
        if twin in means:
            gaps.append(value - means[twin])
    return sum(gaps) / len(gaps) if gaps else None


def findings(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's three findings, each with ``holds`` (True, False or None: not tested)
    and a sentence giving the numbers it was decided on.

    1. Rectification and normalization matter most: the change from neither to both
       (same filters, pooling, stages) is positive and larger than the change from
       average to max pooling and from one stage to two.
    2. With them, random filters come close to learned ones: the learned − random gap
       with R and N is below the gap without either, and at most 5 points.
    3. Two stages beat one: the mean change from one stage to two is positive.
    """
    means = _means(rows)
    both: list[float] = []
    for key, value in means.items():
        if key[1] != "none" and key[2] == "on":
            twin = (key[0], "none", "off", *key[3:])
            if twin in means:
                both.append(value - means[twin])
    rn = sum(both) / len(both) if both else None
    pooling = _effect(means, "pooling", {"avg"}, {"max"})
    stages = _effect(means, "stages", {1}, {2})
    others = [abs(e) for e in (pooling, stages) if e is not None]
    if rn is None:
        first = (None, "the grid lacks cells with neither and with both")
    else:
        parts = [f"adding R and N changes test accuracy by {100 * rn:+.1f} points"]
        if pooling is not None:
            parts.append(f"max instead of average pooling by {100 * pooling:+.1f}")
        if stages is not None:
            parts.append(f"two stages instead of one by {100 * stages:+.1f}")
        first = (rn > 0 and all(rn > e for e in others), "; ".join(parts))
    with_rn, without = _gap(means, True, True), _gap(means, False, False)
    if with_rn is None or without is None:
        second = (None, "it needs random and learned cells with and without R and N")
    else:
        second = (
            with_rn < without and with_rn <= 0.05,
            f"learned − random: {100 * with_rn:+.1f} points with R and N, "
            f"{100 * without:+.1f} points without",
        )
    if stages is None:
        third = (None, "the grid has one stage count")
    else:
        third = (stages > 0, f"two stages instead of one: {100 * stages:+.1f} points on average")
    names = (
        "rectification and normalization matter most",
        "random filters come close to learned ones with R and N",
        "two stages beat one",
    )
    return [
        {"finding": name, "holds": holds, "evidence": evidence}
        for name, (holds, evidence) in zip(names, (first, second, third), strict=True)
    ]


def _markdown(summary: Mapping[str, Any]) -> str:
    filters = summary["axes"]["filters"]
    header = ["architecture", *[f"{f} filters" for f in filters]]
    body = []
    for t in summary["table"]:
        cells = [percent(t[f]) if t[f] is not None else "–" for f in filters]
        body.append([f"`{t['code']}`", *cells])
    verdict = {True: "holds", False: "does not hold", None: "not tested"}
    lines = [
        f"# Jarrett et al.'s grid: {summary['preset']} on {summary['data']}",
        "",
        f"Test accuracy on {summary['test_images']} images ({summary['test_set']}) after "
        f"{summary['epochs']} epoch(s) on {summary['training_images']:,} training images "
        f"(20% kept to choose the best epoch); mean of {summary['seeds']} seed(s).",
        "",
        markdown_table(header, body),
        "",
        "Legend: `F` filter bank; `R_abs` rectification |x|, `R_relu` max(0, x); `N` local "
        "contrast normalization; `P_A` average pooling, `P_M` max pooling; `×2` two such "
        "stages. Random filters are drawn at the start and frozen: only the classifier "
        "trains.",
        "",
        "Findings of the paper, checked on these numbers:",
        "",
    ]
    for f in summary["findings"]:
        lines.append(f"- {f['finding']}: **{verdict[f['holds']]}** ({f['evidence']}).")
    return "\n".join(lines)
