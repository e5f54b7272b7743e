"""Reading a finished (or running) run back: ``load_run``, ``evaluate_run``, ``predict``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit._validation import check_choice, check_positive_int
from cnnkit.data.images import InputTransform, load_image
from cnnkit.data.splits import DataSplits, ImageSet
from cnnkit.models.spec import ArchitectureSpec
from cnnkit.training.checkpoint import load_model_state, read_checkpoint
from cnnkit.training.config import DTYPES
from cnnkit.training.device import resolve_device
from cnnkit.training.evaluation import Evaluation, evaluate
from cnnkit.training.run_folder import (
    open_run,
    read_classes,
    read_config,
    read_metrics,
    require_run_spec,
)


@dataclass
class LoadedRun:
    """A run read back from its folder, ready to classify images.

    Attributes:
        path: the run folder.
        model: the network with the checkpoint's weights, in eval mode.
        spec: its architecture (``None`` for a custom module).
        class_names: name of each output, in order.
        transform: image (file contents, PIL image or array) -> ``(maps, H, W)`` input,
            prepared exactly as the training images were.
        config: the run's ``config.json``.
        checkpoint: which checkpoint was loaded (``"best"`` or ``"last"``).
        metadata: the checkpoint's JSON metadata (epoch, step, scalars, ...).
        metrics: the rows of ``metrics.csv``.
    """

    path: Path
    model: nn.Module
    spec: ArchitectureSpec | None
    class_names: list[str]
    transform: InputTransform
    config: dict[str, Any]
    checkpoint: str
    metadata: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, classes)`` for prepared inputs ``(N, maps, H, W)``."""
        self.model.eval()
        dtype = next(self.model.parameters()).dtype
        return torch.softmax(self.model(images.to(self.device, dtype)).float(), dim=1).cpu()


def load_run(
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
    *,
    device: str = "cpu",
    model: nn.Module | None = None,
) -> LoadedRun:
    """Load a run's network with the weights of its ``best`` or ``last`` checkpoint.

    The checkpoint is verified (digest, tensor names and shapes against ``spec.toml``)
    before its weights are copied; anything wrong is a ``ValueError`` naming the file.
    ``model`` is needed only for runs of a custom module (no ``spec.toml``); it is
    converted in place to the run's dtype (``float64`` for a run trained so).
    """
    run = open_run(run_dir)
    path = run.checkpoint(checkpoint)
    if not path.exists():
        if checkpoint == "best":
            raise FileNotFoundError(
                f"run {str(run.path)!r} has no best checkpoint yet (no epoch has finished)"
            )
        raise FileNotFoundError(f"run {str(run.path)!r} has no {checkpoint} checkpoint yet")
    config = read_config(run)
    class_names = read_classes(run)
    spec = None
    if model is None:
        spec = require_run_spec(run, config, "load", "load_run")
        from cnnkit.models import build

        if spec.classifier.classes != len(class_names):
            raise ValueError(
                f"run {str(run.path)!r}: spec.toml has {spec.classifier.classes} classes "
                f"but classes.json names {len(class_names)}"
            )
        model = build(spec)
    dtype = check_choice("the run's dtype", config["training"].get("dtype", "float32"), DTYPES)
    model.to(dtype=getattr(torch, dtype))
    saved = read_checkpoint(path)
    load_model_state(model, saved)
    model.to(resolve_device(device)).eval()
    transform = InputTransform.from_dict(config["data"]["transform"])
    return LoadedRun(
        path=run.path,
        model=model,
        spec=spec,
        class_names=class_names,
        transform=transform,
        config=config,
        checkpoint=checkpoint,
        metadata=saved.meta,
        metrics=read_metrics(run),
    )


# --------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunEvaluation:
    """An :class:`~cnnkit.training.evaluation.Evaluation` with what was evaluated on what."""

    run: Path
    checkpoint: str
    epoch: int | None
    source: str
    split: str
    result: Evaluation

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": str(self.run),
            "checkpoint": self.checkpoint,
            "epoch": self.epoch,
            "data": self.source,
            "split": self.split,
            **self.result.to_dict(),
        }

    def to_text(self) -> str:
        """Accuracy, per-class accuracy and the confusion matrix as aligned text."""
        r = self.result
        names = r.class_names
        lines = [
            f"run {self.run}, checkpoint {self.checkpoint} (epoch {self.epoch}), "
            f"data {self.source}, {self.split} split: {r.images} images",
            f"accuracy {100 * r.accuracy:.2f}% ({r.correct}/{r.images}), loss {r.loss:.4f}",
            "",
            "per-class accuracy:",
        ]
        width = max(len(n) for n in names)
        for c, name in enumerate(names):
            total = sum(r.confusion[c])
            share = r.per_class[name]
            text = "–" if share is None else f"{100 * share:6.2f}%"
            lines.append(f"  {name:>{width}}  {text}  ({r.confusion[c][c]}/{total})")
        lines += ["", "confusion matrix (rows: true class, columns: predicted class):"]
        cell = max(width, len(str(max(max(row) for row in r.confusion))))
        lines.append(" " * (width + 2) + " ".join(f"{n:>{cell}}" for n in names))
        for name, row in zip(names, r.confusion, strict=True):
            lines.append(f"  {name:>{width}}" + "".join(f" {v:>{cell}}" for v in row))
        return "\n".join(lines)


def _relabel(images: ImageSet, class_names: Sequence[str], source: str) -> ImageSet:
    """Map ``images``' labels onto the run's classes, by name."""
    if list(images.class_names) == list(class_names):
        return images
    index = {name: k for k, name in enumerate(class_names)}
    unknown = [n for n in images.class_names if n not in index]
    if unknown:
        raise ValueError(
            f"data {source!r} has classes the run never saw: {', '.join(map(repr, unknown[:5]))}"
        )
    mapping = torch.tensor([index[n] for n in images.class_names], dtype=torch.int64)
    return ImageSet(images.images, mapping[images.labels], list(class_names))


def evaluation_images(
    loaded: LoadedRun, data: str | os.PathLike[str] | DataSplits | None = None
) -> tuple[str, str, ImageSet]:
    """``(source, split, images)``: the images :func:`evaluate_run` evaluates ``loaded`` on.

    ``data`` defaults to the run's own data source, whose test split is used, or its
    validation split when it has none (image folders). Another source (a folder, a
    ``.npz``, ``"digits"``) is fitted to the network's input, its class names are mapped
    onto the run's by name, and its test split is used, or all its images when it has
    none.
    """
    recorded = loaded.config["data"]
    if data is None or isinstance(data, (str, os.PathLike)):
        from cnnkit.data import load

        source = recorded["source"] if data is None else data
        splits = load(
            source,
            loaded.transform.input_hw,
            val_fraction=recorded.get("val_fraction") or 0.2,
            seed=recorded.get("seed") or 0,
        )
    elif isinstance(data, DataSplits):
        splits = data
    else:
        raise TypeError(f"data must be a source path or DataSplits, got {type(data).__name__}")
    if splits.test is not None:
        split, images = "test", splits.test
    elif data is None:
        split, images = "val", splits.val
    else:  # another source without a test split: none of it was trained on
        split = "all"
        images = ImageSet(
            torch.cat([splits.train.images, splits.val.images]),
            torch.cat([splits.train.labels, splits.val.labels]),
            list(splits.class_names),
        )
    return str(splits.source), split, _relabel(images, loaded.class_names, str(splits.source))


def evaluate_loaded(loaded: LoadedRun, source: str, split: str, images: ImageSet) -> RunEvaluation:
    """Evaluate a loaded run on ``images`` (from :func:`evaluation_images`)."""
    result = evaluate(loaded.model, images, device=loaded.device)
    epoch = loaded.metadata.get("epoch")
    return RunEvaluation(loaded.path, loaded.checkpoint, epoch, source, split, result)


def evaluate_run(
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
    *,
    data: str | os.PathLike[str] | DataSplits | None = None,
    device: str = "cpu",
) -> RunEvaluation:
    """Accuracy, per-class accuracy and confusion matrix of a run's checkpoint, on the
    images that :func:`evaluation_images` chooses for ``data``."""
    loaded = load_run(run_dir, checkpoint, device=device)
    return evaluate_loaded(loaded, *evaluation_images(loaded, data))


# --------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """Top classes of one image, best first, or why the image could not be read."""

    path: str
    top: list[tuple[str, float]]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": [{"class": c, "probability": p} for c, p in self.top]}

    def to_text(self) -> str:
        if self.error is not None:
            return f"{self.path}: error: {self.error}"
        return f"{self.path}: " + ", ".join(f"{c} {p:.3f}" for c, p in self.top)


def predict(
    run: LoadedRun, images: Sequence[str | os.PathLike[str]], *, top_k: int = 3
) -> list[Prediction]:
    """The ``top_k`` most probable classes for each image file, with probabilities.

    A file that cannot be read or decoded gives a :class:`Prediction` with ``error`` set;
    the others are still classified.
    """
    top_k = min(check_positive_int("top_k", top_k), len(run.class_names))
    prepared: list[tuple[int, torch.Tensor]] = []
    results: list[Prediction | None] = [None] * len(images)
    for i, path in enumerate(images):
        try:
            prepared.append((i, run.transform(load_image(path))))
        except (OSError, ValueError) as error:
            results[i] = Prediction(str(path), [], error=str(error))
    if prepared:
        batch = torch.stack([x for _, x in prepared])  # (N, maps, H, W)
        probs = run.probabilities(batch)
        values, indices = probs.topk(top_k, dim=1)
        for (i, _), vals, idxs in zip(prepared, values.tolist(), indices.tolist(), strict=True):
            top = [
                (run.class_names[k], v) for k, v in zip(idxs, vals, strict=True) if math.isfinite(v)
            ]
            results[i] = Prediction(str(images[i]), top)
    return [r for r in results if r is not None]
