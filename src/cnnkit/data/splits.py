"""Labelled image sets, the train/validation/test splits of a data source, and the split rule.

The validation split is drawn per class (stratified) from the training images with a
seeded generator: class ``c`` with ``n_c`` images gives ``round(val_fraction * n_c)`` of
them, but at least 1 and at most ``n_c - 1``, to validation (rounding half up). The draw
is ``numpy.random.default_rng(seed)`` permuting each class's indices in turn, classes in
label order, so the split depends only on the labels, ``val_fraction`` and ``seed``.
Both index lists are returned sorted, so each split keeps the source's order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cnnkit._validation import check_fraction, check_nonnegative_int, pair

PathLike = str | os.PathLike[str]
"""Where a data source lies: a path as a string or a path object."""

InputHW = tuple[int, int] | int
"""The ``(H, W)`` a network reads, or one int for a square."""


def check_split_options(
    input_hw: InputHW, val_fraction: float, seed: int
) -> tuple[tuple[int, int], float, int]:
    """The options every loader takes, checked: ``(H, W)``, the share of each class's
    training images drawn for validation, in (0, 1), and that draw's seed, >= 0."""
    return (
        pair("input_hw", input_hw),
        check_fraction("val_fraction", val_fraction),
        check_nonnegative_int("seed", seed),
    )


@dataclass
class ImageSet:
    """Images with their labels, all in memory.

    Attributes:
        images: ``(N, 1, H, W)`` float32 gray levels in [0, 1] (see :mod:`cnnkit.data.images`).
        labels: ``(N,)`` int64 class indices in ``[0, len(class_names))``.
        class_names: the name of each class index; shared by every split of a source.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.float32:
            raise TypeError(f"images must be a float32 torch.Tensor, got {_describe(self.images)}")
        if self.images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64:
            raise TypeError(f"labels must be an int64 torch.Tensor, got {_describe(self.labels)}")
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},) to match images of shape "
                f"{tuple(self.images.shape)}, got {tuple(self.labels.shape)}"
            )
        names = list(self.class_names)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"class_names must be a non-empty list of str, got {names!r}")
        self.class_names = names
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(names)):
            raise ValueError(
                f"labels must lie in [0, {len(names)}) for {len(names)} class names, got "
                f"min {int(self.labels.min())}, max {int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_hw(self) -> tuple[int, int]:
        """``(H, W)`` of every image."""
        return (self.images.shape[-2], self.images.shape[-1])

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> ImageSet:
        """A new set holding copies of the images and labels at ``indices``."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return ImageSet(self.images[index], self.labels[index], list(self.class_names))


@dataclass
class DataSplits:
    """The splits of one data source, as :func:`cnnkit.data.load` returns them.

    Attributes:
        train: images to fit the weights on.
        val: images to choose with (epochs, learning rates, the best checkpoint), drawn from
            the source's training images by :func:`stratified_split`.
        test: the source's fixed test images, only ever reported; ``None`` when the source
            has no test split (image folders).
        source: ``"digits"``, or the absolute path of the folder or ``.npz`` file.
        digest: sha256 hex digest of the source's content (see :func:`cnnkit.data.load`).
        kind: ``"digits"``, ``"folder"``, ``"npz"``, or ``"custom"`` for hand-made splits.
        val_fraction, seed: the arguments of the validation split, when one was drawn.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    source: str
    digest: str
    kind: str = "custom"
    val_fraction: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        splits = [("val", self.val)] + ([("test", self.test)] if self.test is not None else [])
        for name, split in splits:
            if split.class_names != self.train.class_names:
                raise ValueError(
                    f"{name}.class_names must equal train.class_names "
                    f"{self.train.class_names}, got {split.class_names}"
                )
            if split.images.shape[1:] != self.train.images.shape[1:]:
                raise ValueError(
                    f"{name} images must have shape (N, *{tuple(self.train.images.shape[1:])}) "
                    f"like train, got {tuple(split.images.shape)}"
                )

    @classmethod
    def drawn(
        cls,
        train: ImageSet,
        test: ImageSet | None,
        val_fraction: float,
        seed: int,
        *,
        source: str,
        digest: str,
        kind: str,
    ) -> DataSplits:
        """The splits of a source whose validation images are drawn from its training
        images ``train`` (:func:`split_train_val` with ``val_fraction`` and ``seed``)."""
        train, val = split_train_val(train, val_fraction, seed)
        return cls(train, val, test, source, digest, kind, val_fraction, seed)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.train.input_hw

    def to_config(self) -> dict[str, Any]:
        """JSON-ready description of where the data came from and how it was split."""
        return {
            "source": self.source,
            "kind": self.kind,
            "digest": self.digest,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "input_hw": list(self.input_hw),
            "sizes": {
                "train": len(self.train),
                "val": len(self.val),
                "test": None if self.test is None else len(self.test),
            },
            "class_names": list(self.class_names),
        }


def stratified_split(
    labels: np.ndarray | torch.Tensor,
    val_fraction: float,
    seed: int,
    *,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into sorted ``(train_indices, val_indices)``, per class.

    ``labels`` is ``(N,)`` integer class indices. Every class ``0 .. K-1`` (``K`` is
    ``len(class_names)``, else ``max(labels) + 1``) must have at least 2 samples, so that
    both splits hold one. The rule is in this module's docstring.
    """
    val_fraction = check_fraction("val_fraction", val_fraction)
    seed = check_nonnegative_int("seed", seed)
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {labels.min()}")
    num_classes = len(class_names) if class_names is not None else int(labels.max(initial=-1)) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if labels.size and labels.max() >= num_classes:
        raise ValueError(
            f"labels must be below the {num_classes} class names, got label {labels.max()}"
        )
    counts = np.bincount(labels, minlength=num_classes)
    too_small = [f"{names[c]!r} ({counts[c]})" for c in range(num_classes) if counts[c] < 2]
    if too_small:
        raise ValueError(
            "each class needs at least 2 images, one for training and one for validation; "
            f"classes with fewer: {', '.join(too_small)}"
        )

    rng = np.random.default_rng(seed)
    val = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        n_val = min(max(math.floor(val_fraction * len(members) + 0.5), 1), len(members) - 1)
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)  # sorted
    return train_idx, val_idx


def split_train_val(train: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Carve a stratified validation set out of ``train``; see :func:`stratified_split`."""
    train_idx, val_idx = stratified_split(
        train.labels.numpy(), val_fraction, seed, class_names=train.class_names
    )
    return train.subset(train_idx), train.subset(val_idx)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__
