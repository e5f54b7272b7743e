"""Tiny data and a tiny network for the studies: 8×8 images of two classes, seconds."""

import numpy as np
import pytest

from cnnkit.models.spec import (
    ArchitectureSpec,
    ClassifierSpec,
    FilterBankSpec,
    InputSpec,
    NormSpec,
    PoolSpec,
    StageSpec,
)


def _bars(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 8×8 images with one bright row (class 0) or column (class 1)."""
    images = rng.uniform(0, 0.3, (count, 8, 8)).astype(np.float32)
    labels = np.arange(count) % 2
    for i in range(count):
        k = rng.integers(1, 7)
        if labels[i]:
            images[i, :, k] += 0.7
        else:
            images[i, k, :] += 0.7
    return np.clip(images, 0, 1), labels


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    train_images, train_labels = _bars(60, rng)
    test_images, test_labels = _bars(20, rng)
    path = tmp_path_factory.mktemp("data") / "bars.npz"
    np.savez(
        path,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
    )
    return path


@pytest.fixture(scope="session")
def tiny_spec():
    """8×8 -> 3 kernels 3×3 (3@6×6) -> |x| -> norm -> max 2/2 (3@3×3) -> 4 maps from 2
    random of 3, kernels 2×2 (4@2×2) -> |x| -> norm -> classifier (16 -> 2)."""
    return ArchitectureSpec(
        name="tiny",
        input=InputSpec(8, 8),
        stages=(
            StageSpec(
                FilterBankSpec(3, 3),
                norm=NormSpec(window=3),
                pool=PoolSpec(window=2, stride=2),
            ),
            StageSpec(
                FilterBankSpec(4, 2, table="random", fan_in=2),
                norm=NormSpec(window=1),
                pool=PoolSpec(window=1),
            ),
        ),
        classifier=ClassifierSpec(2),
    )


@pytest.fixture(scope="session")
def tiny_spec_file(tiny_spec, tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.toml"
    tiny_spec.save(str(path))
    return path
