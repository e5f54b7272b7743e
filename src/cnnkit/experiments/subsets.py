"""The images of a study: one fixed test set, and stratified training subsets of each size.

A source with a test split (the bundled digits, a ``.npz`` with ``test_images``) keeps it.
A source without one (an image folder) first gives up a fixed test set: 20% of each
class, drawn with seed 0 by :func:`cnnkit.data.splits.stratified_split`, before anything
else is drawn. The rest is the *training split*.

A subset of ``size`` images for seed ``s`` takes from each class a share proportional to
its size (largest remainders; at least 2 per class, one to fit and one to validate),
from one permutation of the class drawn by ``numpy.random.default_rng(s)``: for one seed,
a smaller subset is the start of every larger one.

Each subset is written once as ``data/size<N>-seed<s>.npz`` in the experiment folder
(training subset and test set, :mod:`cnnkit.data.arrays` layout), and every cell trains
on that file: the cell's run folder names it as its data, so ``cnnkit evaluate`` and
``cnnkit train --resume`` find the same images again.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit._files import write_atomic
from cnnkit.data import load
from cnnkit.data.splits import ImageSet, stratified_split

TEST_FRACTION = 0.2
TEST_SEED = 0
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class StudyImages:
    """The training split and the fixed test set of a source, at the network's input size."""

    train: ImageSet
    test: ImageSet
    source: str
    test_note: str

    def summary_head(self, study: str, preset: str, training_key: str) -> dict[str, Any]:
        """The first keys of a study's ``results.json``: the study, where its images come
        from and how many (the training images' count under ``training_key``)."""
        return {
            "study": study,
            "data": self.source,
            "test_set": self.test_note,
            "test_images": len(self.test),
            training_key: len(self.train),
            "preset": preset,
        }


def study_images(source: str, input_hw: tuple[int, int]) -> StudyImages:
    """Load ``source`` at ``input_hw``: its whole training split and its test set."""
    splits = load(source, input_hw, val_fraction=VAL_FRACTION, seed=0)
    train = ImageSet(
        torch.cat([splits.train.images, splits.val.images]),
        torch.cat([splits.train.labels, splits.val.labels]),
        list(splits.class_names),
    )
    if splits.test is not None:
        return StudyImages(train, splits.test, splits.source, "the source's test split")
    keep, test = stratified_split(
        train.labels.numpy(), TEST_FRACTION, TEST_SEED, class_names=train.class_names
    )
    note = (
        f"a fixed test split: {TEST_FRACTION:.0%} of each class of {splits.source}, "
        f"stratified, seed {TEST_SEED}, carved before anything else"
    )
    return StudyImages(train.subset(keep), train.subset(test), splits.source, note)


def check_sizes(sizes: list[int] | None, defaults: list[int | None], available: int, classes: int):
    """The subset sizes to train on, smallest first.

    ``sizes`` given explicitly must each lie in ``[2 * classes, available]``; the
    ``defaults`` (``None`` meaning all of the split) are clipped to ``available``.
    """
    smallest = 2 * classes
    if sizes is not None:
        for size in sizes:
            if size > available:
                raise ValueError(
                    f"--sizes: {size} is larger than the training split ({available} images)"
                )
            if size < smallest:
                raise ValueError(
                    f"--sizes: {size} is too small; each of the {classes} classes needs 2 "
                    f"images (one to fit, one to validate), so at least {smallest}"
                )
        chosen = sizes
    else:
        chosen = [available if s is None else min(max(s, smallest), available) for s in defaults]
    return sorted(set(chosen))


def subset_indices(labels: np.ndarray, size: int, seed: int, classes: int) -> np.ndarray:
    """Sorted indices of a stratified subset of ``size`` of ``labels`` (module docstring).

    Each class gets 2, and the other ``size - 2 * classes`` go to the classes in
    proportion to their remaining images, by largest remainders.
    """
    counts = np.bincount(labels, minlength=classes)  # (classes,)
    spare = counts - 2
    exact = spare * (size - 2 * classes) / max(int(spare.sum()), 1)
    quota = 2 + np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable")[: size - int(quota.sum())]:
        quota[c] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[: quota[c]] for c in range(classes)]
    return np.sort(np.concatenate(chosen))


def write_subset(images: StudyImages, size: int, seed: int, folder: Path) -> Path:
    """Write (once) the subset's ``.npz`` under ``folder`` and return its path."""
    path = folder / f"size{size}-seed{seed}.npz"
    if path.is_file():
        return path
    labels = images.train.labels.numpy()
    index = subset_indices(labels, size, seed, images.train.num_classes)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        train_images=images.train.images[torch.as_tensor(index)].numpy(),
        train_labels=labels[index],
        test_images=images.test.images.numpy(),
        test_labels=images.test.labels.numpy(),
        class_names=np.array(images.train.class_names),
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path
