"""Evaluation: the loss, accuracy and confusion matrix of a model on a set of images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data.splits import ImageSet


@dataclass(frozen=True)
class Evaluation:
    """Loss, accuracy and confusion matrix of a model on a set of images.

    ``confusion[t][p]`` counts images of true class ``t`` predicted as class ``p``.
    """

    loss: float
    confusion: list[list[int]]
    class_names: list[str]

    @property
    def images(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def correct(self) -> int:
        return sum(self.confusion[c][c] for c in range(len(self.confusion)))

    @property
    def accuracy(self) -> float:
        """Fraction of images classified correctly, in [0, 1]."""
        return self.correct / self.images if self.images else float("nan")

    @property
    def per_class(self) -> dict[str, float | None]:
        """Accuracy of each class (recall); ``None`` for a class with no images."""
        out: dict[str, float | None] = {}
        for c, name in enumerate(self.class_names):
            total = sum(self.confusion[c])
            out[name] = self.confusion[c][c] / total if total else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "per_class": self.per_class,
            "class_names": list(self.class_names),
            "confusion": self.confusion,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> Evaluation:
    """Mean cross-entropy, accuracy and confusion matrix of ``model`` on ``data``.

    The model is put in eval mode. ``device`` defaults to where the model's parameters
    are; the images are converted to the parameters' dtype.
    """
    # no_grad rather than inference_mode: a layer may cache a tensor made here (a transform
    # basis, say) that a later training step must save for backward, which an inference
    # tensor cannot be.
    parameter = next(model.parameters())
    device = parameter.device if device is None else device
    model.eval()
    classes = len(data.class_names)
    confusion = torch.zeros(classes * classes, dtype=torch.int64)
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device, parameter.dtype)
        labels = data.labels[start : start + batch_size].to(device)
        logits = model(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(labels * classes + predicted, minlength=classes**2).cpu()
    matrix = confusion.reshape(classes, classes).tolist()  # (true, predicted)
    loss = loss_sum / len(data) if len(data) else float("nan")
    return Evaluation(loss=loss, confusion=matrix, class_names=list(data.class_names))
