"""The weight-sharing study: convolutional, locally connected and fully connected networks
trained on stratified subsets of growing size, tested on one fixed test set.

The lecture's Section 4 says that a fully connected first layer has so many weights that
it overfits, while a convolution's few weights do not depend on the image's size. The
study measures both: accuracy on the same held-out images for every family, size and
seed (``accuracy.png``), and the first layer's weights against the input's side,
computed from the formulas (``weights.png``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnkit.experiments.cells import Cell, open_experiment, run_cells
from cnnkit.experiments.families import FAMILIES, families, first_layer_weights
from cnnkit.experiments.plots import accuracy_plot, weights_plot
from cnnkit.experiments.results import markdown_table, percent, write_results
from cnnkit.experiments.subsets import check_sizes, study_images, write_subset
from cnnkit.models.presets import from_name
from cnnkit.models.spec import ArchitectureSpec
from cnnkit.training import TrainConfig

DEFAULT_SIZES: tuple[int | None, ...] = (250, 500, 1000, 2000, None)  # None: all of it
QUICK_SIZES: tuple[int | None, ...] = (250, 1000, None)
DEFAULT_SEEDS, QUICK_SEEDS = 3, 2
DEFAULT_EPOCHS, QUICK_EPOCHS = 15, 8
MIN_STEPS = 150
"""A small subset trains for more epochs, so that every cell takes at least this many
optimizer steps (250 images at batch 64 are only 4 steps an epoch)."""
INPUT_SIDES = (28, 56, 83, 128, 256, 512, 1000)
COLUMNS = (
    "family",
    "size",
    "seed",
    "weights",
    "train_accuracy",
    "test_accuracy",
    "gap",
    "seconds",
    "run",
)
# The training options of every cell unless ``training`` says otherwise: no random
# shifts, so that the only prior knowledge a network gets is its architecture.
STUDY_TRAINING = {"augment": "none"}


def epochs_for(size: int, epochs: int, batch_size: int, min_steps: int = MIN_STEPS) -> int:
    """``epochs``, or more for a small subset: at least ``min_steps`` steps in all."""
    fitted = size - max(1, round(0.2 * size))  # about what the validation split leaves
    steps = math.ceil(fitted / batch_size)
    return max(epochs, math.ceil(min_steps / steps))


def sharing(
    out: str | Path,
    *,
    data: str = "digits",
    spec: ArchitectureSpec | str = "digits28",
    sizes: Sequence[int] | None = None,
    seeds: int | None = None,
    epochs: int | None = None,
    quick: bool = False,
    min_steps: int = MIN_STEPS,
    jobs: int = 1,
    training: Mapping[str, Any] | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the weight-sharing study into the folder ``out``; return ``results.json``'s data.

    ``spec`` is a preset name or a spec (the convolutional family); ``sizes`` the
    training-subset sizes (default 250, 500, 1000, 2000 and all, clipped to the training
    split; ``quick``: 250, 1000, all); ``seeds`` how many seeds (3; quick 2); ``epochs``
    the epochs of a cell (15; quick 8), raised for a small subset to make at least
    ``min_steps`` optimizer steps (150; :func:`epochs_for`; 0 turns that off);
    ``training`` other :class:`~cnnkit.training.TrainConfig` options for every cell.
    A finished cell is not trained again; an interrupted one continues.
    """
    out = Path(out)
    base = from_name(spec) if isinstance(spec, str) else spec
    seeds = seeds if seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS)
    epochs = epochs if epochs is not None else (QUICK_EPOCHS if quick else DEFAULT_EPOCHS)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
    images = study_images(data, (base.input.height, base.input.width))
    base = base.with_classes(images.train.num_classes)
    chosen = check_sizes(
        None if sizes is None else list(sizes),
        list(QUICK_SIZES if quick else DEFAULT_SIZES),
        len(images.train),
        images.train.num_classes,
    )
    options = {**STUDY_TRAINING, **dict(training or {})}
    batch = options.get("batch_size", 64)
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"--min-steps must be an integer >= 0, got {min_steps!r}")
    trio = families(base)
    notes = [f.note for f in trio if f.note]
    open_experiment(
        out,
        "sharing",
        {
            "data": images.source,
            "spec": base.to_dict(),
            "sizes": chosen,
            "seeds": seeds,
            "epochs": epochs,
            "min_steps": min_steps,
            "training": options,
        },
    )
    cells = []
    for size in chosen:
        for seed in range(seeds):
            subset = write_subset(images, size, seed, out / "data")
            for family in trio:
                config = TrainConfig(
                    **{
                        **options,
                        "seed": seed,
                        "epochs": epochs_for(size, epochs, batch, min_steps),
                    }
                )
                labels = {"family": family.name, "size": size, "seed": seed}
                name = f"{family.name}-{size}-seed{seed}"
                cells.append(Cell(name, labels, family.spec, config, subset))
    if report is not None:
        for note in notes:
            report(note)
    rows = run_cells(out, cells, jobs=jobs, report=report)
    weights = {f.name: next(r["weights"] for r in rows if r["family"] == f.name) for f in trio}
    curves: dict[str, dict[int, list[float]]] = {f: {} for f in FAMILIES}
    for row in rows:
        curves[row["family"]].setdefault(row["size"], []).append(row["test_accuracy"])
    sides = [s for s in INPUT_SIDES if s >= base.stages[0].filters.kernel]
    counts = {f: {s: first_layer_weights(f, base, s) for s in sides} for f in FAMILIES}
    table = _table(rows, chosen)
    summary = {
        **images.summary_head("sharing", base.name, "training_split"),
        "sizes": chosen,
        "seeds": seeds,
        "epochs": {str(s): epochs_for(s, epochs, batch, min_steps) for s in chosen},
        "notes": notes,
        "table": table,
        "first_layer_weights": {f: {str(s): n for s, n in c.items()} for f, c in counts.items()},
    }
    write_results(out, rows, COLUMNS, summary, _markdown(summary, weights))
    accuracy_plot(
        out / "accuracy.png",
        curves,
        weights,
        f"{base.name} on {Path(images.source).name}: test accuracy on {len(images.test)} images",
    )
    weights_plot(
        out / "weights.png",
        counts,
        f"first layer of {base.name}'s three families against the input's size",
    )
    return summary


def _table(rows: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Per family and size: weights and the seeds' mean accuracies, gap and seconds."""
    table = []
    for family in FAMILIES:
        for size in sizes:
            mine = [r for r in rows if r["family"] == family and r["size"] == size]
            if not mine:
                continue
            test = [r["test_accuracy"] for r in mine]
            table.append(
                {
                    "family": family,
                    "size": size,
                    "weights": mine[0]["weights"],
                    "train_accuracy": sum(r["train_accuracy"] for r in mine) / len(mine),
                    "test_accuracy": sum(test) / len(test),
                    "test_min": min(test),
                    "test_max": max(test),
                    "gap": sum(r["gap"] for r in mine) / len(mine),
                    "seconds": sum(r["seconds"] for r in mine) / len(mine),
                    "seeds": len(mine),
                }
            )
    return table


def _markdown(summary: Mapping[str, Any], weights: Mapping[str, int]) -> str:
    body = [
        [
            t["family"].replace("_", " "),
            f"{t['size']:,}",
            f"{t['weights']:,}",
            percent(t["train_accuracy"]),
            percent(t["test_accuracy"])
            + (f" ({percent(t['test_min'])}–{percent(t['test_max'])})" if t["seeds"] > 1 else ""),
            f"{100 * t['gap']:.1f}",
            f"{t['seconds']:.0f}",
        ]
        for t in summary["table"]
    ]
    header = ["family", "images", "weights", "train", "test (seed range)", "gap (points)", "s"]
    sides = summary["first_layer_weights"]
    side_body = [
        [f"{side}×{side}"] + [f"{sides[f][side]:,}" for f in FAMILIES]
        for side in sides["convolutional"]
    ]
    lines = [
        f"# Weight sharing: {summary['preset']} on {summary['data']}",
        "",
        f"Test set: {summary['test_images']} images ({summary['test_set']}); training "
        f"subsets of {', '.join(f'{s:,}' for s in summary['sizes'])} images (20% of each "
        f"kept to choose the best epoch), {summary['seeds']} seed(s). Accuracies are the "
        "means over seeds; gap = train − test.",
        "",
        markdown_table(header, body),
        "",
        "Weights into the first hidden layer (computed, not trained):",
        "",
        markdown_table(["input", *[f.replace("_", " ") for f in FAMILIES]], side_body),
    ]
    for note in summary["notes"]:
        lines += ["", f"Note: {note}."]
    return "\n".join(lines)
