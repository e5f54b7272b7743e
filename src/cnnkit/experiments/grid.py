"""Custom grids from a TOML file: a base network, training options, and lists of values
for named fields; every combination (the cross product) is one cell.

::

    preset = "digits28"          # or spec = "net.toml" (relative to this file)
    data = "digits"              # optional, default the bundled digits
    size = 1000                  # optional: a stratified subset of the training split
    seeds = 1                    # optional

    [training]                   # options of every cell (cnnkit.training.TrainConfig)
    epochs = 3

    [grid]                       # field = [values, ...]
    weight_sharing = ["shared", "none"]
    "stages.1.filters.maps" = [8, 16]    # stage numbers start at 1, as in stage1.filters
    "stages.*.pool.kind" = ["avg", "max"]  # * changes every stage
    "training.lr" = [0.01, 0.05]

A field is a path through the spec's sections (``input``, ``stages.N``, ``filters``,
``norm``, ``pool``, ``classifier``) to one value, or ``training.NAME``. Every cell is
built and checked before anything trains, so a misspelt field or a value its field
rejects stops the grid at once with a message naming both.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnkit.experiments.cells import Cell, open_experiment, run_cells
from cnnkit.experiments.plots import bar_plot
from cnnkit.experiments.results import markdown_table, percent, write_results
from cnnkit.experiments.subsets import check_sizes, study_images, write_subset
from cnnkit.models.presets import from_name
from cnnkit.models.spec import ArchitectureSpec
from cnnkit.training import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEYS = ("preset", "spec", "data", "size", "seeds", "training", "grid")
RESULT_COLUMNS = ("seed", "weights", "train_accuracy", "test_accuracy", "gap", "seconds", "run")


@dataclasses.dataclass(frozen=True)
class Grid:
    """A parsed grid file: the base spec, fixed options and the fields to vary."""

    path: Path
    spec: ArchitectureSpec
    data: str
    size: int | None
    seeds: int
    training: dict[str, Any]
    fields: dict[str, list[Any]]

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination of the fields' values, the first field varying slowest."""
        names = list(self.fields)
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(self.fields[n] for n in names))
        ]

    def cell(self, choice: Mapping[str, Any]) -> tuple[ArchitectureSpec, dict[str, Any]]:
        """The spec and training options of one combination (checked)."""
        spec, training = self.spec, dict(self.training)
        for field, value in choice.items():
            where = f"grid {self.path}: {field} = {value!r}"
            if field.startswith("training."):
                training[field.removeprefix("training.")] = value
                continue
            try:
                spec = _set_field(spec, field.split("."), value, field)
            except KeyError as error:
                raise ValueError(f"grid {self.path}: {error.args[0]}") from None
            except (ValueError, TypeError) as error:
                raise ValueError(f"{where}: {error}") from None
        try:
            TrainConfig(**training)
        except (ValueError, TypeError) as error:
            named = ", ".join(f"{k} = {v!r}" for k, v in choice.items() if k.startswith("train"))
            raise ValueError(f"grid {self.path}: {named or 'training'}: {error}") from None
        return spec, training


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (module docstring); errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"grid {path}: not valid TOML: {error}") from None
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise ValueError(f"grid {path}: unknown key {unknown[0]!r}; expected {', '.join(KEYS)}")
    if "preset" in data and "spec" in data:
        raise ValueError(f"grid {path}: give preset or spec, not both")
    if "spec" in data:
        spec = ArchitectureSpec.load(str(path.parent / str(data["spec"])))
    else:
        spec = from_name(str(data.get("preset", "digits28")))
    size = data.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"grid {path}: size must be an integer >= 1, got {size!r}")
    seeds = data.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"grid {path}: seeds must be an integer >= 1, got {seeds!r}")
    training = data.get("training", {})
    if not isinstance(training, dict):
        raise ValueError(f"grid {path}: [training] must be a table of options")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in training:
        if name not in known:
            raise ValueError(
                f"grid {path}: training option {name!r} does not exist; "
                f"expected one of {', '.join(sorted(known))}"
            )
    fields = data.get("grid")
    if not isinstance(fields, dict) or not fields:
        raise ValueError(f"grid {path}: [grid] must list at least one field = [values]")
    for field, values in fields.items():
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"grid {path}: {field} must be a non-empty list of values, got {values!r}"
            )
        if field.startswith("training."):
            if field.removeprefix("training.") not in known:
                raise ValueError(
                    f"grid {path}: field {field!r} does not exist; training options are "
                    f"{', '.join(sorted(known))}"
                )
        elif field.split(".")[0] == "training":
            raise ValueError(f"grid {path}: field {field!r} must name a training option")
    grid = Grid(path, spec, str(data.get("data", "digits")), size, seeds, training, fields)
    for choice in grid.combinations():
        grid.cell(choice)  # every cell is checked before anything trains
    return grid


def _set_field(part: Any, names: Sequence[str], value: Any, field: str) -> Any:
    """``part`` (a spec dataclass) with the value at the path ``names`` replaced."""
    name = names[0]
    if not dataclasses.is_dataclass(part):
        raise KeyError(f"field {field!r} does not exist: it goes below a value")
    known = [f.name for f in dataclasses.fields(part)]
    if name not in known:
        what = type(part).__name__.removesuffix("Spec").lower() or "spec"
        raise KeyError(
            f"field {field!r} does not exist: {what} has no {name!r} (it has {', '.join(known)})"
        )
    current = getattr(part, name)
    if name == "stages":
        if len(names) < 3:
            raise KeyError(f"field {field!r} must name a stage and one of its fields")
        number = names[1]
        if number == "*":
            chosen = range(len(current))
        elif re.fullmatch(r"[1-9][0-9]*", number) and int(number) <= len(current):
            chosen = [int(number) - 1]
        else:
            raise KeyError(
                f"field {field!r} does not exist: stage {number!r} is not 1..{len(current)} or *"
            )
        stages = list(current)
        for index in chosen:
            stages[index] = _set_field(stages[index], names[2:], value, field)
        return dataclasses.replace(part, stages=tuple(stages))
    if len(names) == 1:
        if dataclasses.is_dataclass(current):
            raise KeyError(f"field {field!r} is a section; name one of its fields")
        return dataclasses.replace(part, **{name: value})
    if current is None:
        raise KeyError(f"field {field!r} does not exist: the spec has no {name} there")
    return dataclasses.replace(part, **{name: _set_field(current, names[1:], value, field)})


def _label(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(value)).strip("_") or "x"


def grid(
    path: str | Path,
    out: str | Path,
    *,
    jobs: int = 1,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the grid file ``path`` into the folder ``out``; return ``results.json``'s data."""
    out = Path(out)
    parsed = load_grid(path)
    images = study_images(parsed.data, (parsed.spec.input.height, parsed.spec.input.width))
    classes = images.train.num_classes
    size = check_sizes(
        None if parsed.size is None else [parsed.size], [None], len(images.train), classes
    )[0]
    training = {"augment": "none", **parsed.training}
    open_experiment(
        out,
        "grid",
        {
            "data": images.source,
            "spec": parsed.spec.to_dict(),
            "size": size,
            "seeds": parsed.seeds,
            "training": training,
            "grid": parsed.fields,
        },
    )
    cells = []
    for seed in range(parsed.seeds):
        subset = write_subset(images, size, seed, out / "data")
        for number, choice in enumerate(parsed.combinations(), start=1):
            spec, options = parsed.cell(choice)
            options = {**training, **options, "seed": seed}
            name = f"{number:03d}-" + "-".join(_label(v) for v in choice.values())
            labels = {**choice, "seed": seed}
            cell = Cell(
                f"{name}-seed{seed}",
                labels,
                spec.with_classes(classes),
                TrainConfig(**options),
                subset,
            )
            cells.append(cell)
    rows = run_cells(out, cells, jobs=jobs, report=report)
    columns = [*parsed.fields, *RESULT_COLUMNS]
    summary = {
        "study": "grid",
        "grid": str(parsed.path),
        "data": images.source,
        "test_set": images.test_note,
        "test_images": len(images.test),
        "training_images": size,
        "preset": parsed.spec.name,
        "seeds": parsed.seeds,
        "fields": parsed.fields,
    }
    header = [*parsed.fields, "weights", "train", "test", "gap (points)"]
    body = [
        [
            *(f"`{r[f]}`" for f in parsed.fields),
            f"{r['weights']:,}",
            percent(r["train_accuracy"]),
            percent(r["test_accuracy"]),
            f"{100 * r['gap']:.1f}",
        ]
        for r in rows
    ]
    text = "\n".join(
        [
            f"# Grid {parsed.path.name}: {parsed.spec.name} on {images.source}",
            "",
            f"Test accuracy on {len(images.test)} images ({images.test_note}); "
            f"{size:,} training images (20% kept to choose the best epoch).",
            "",
            markdown_table(
                ["seed", *header] if parsed.seeds > 1 else header,
                [
                    [r["seed"], *b] if parsed.seeds > 1 else b
                    for r, b in zip(rows, body, strict=True)
                ],
            ),
        ]
    )
    write_results(out, rows, columns, summary, text)
    labels = [", ".join(f"{k.split('.')[-1]}={r[k]}" for k in parsed.fields) for r in rows]
    bar_plot(
        out / "grid.png",
        labels,
        {"test": [r["test_accuracy"] for r in rows]},
        f"grid {parsed.path.name}",
    )
    return summary
