"""Small, fast training fixtures: a one-stage network on 12×12 synthetic images."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

TINY_SPEC = """\
name = "tiny"

[input]
height = 12
width = 12
maps = 1

[[stages]]
nonlinearity = ["abs"]
[stages.filters]
maps = 4
kernel = 3
[stages.pool]
kind = "max"
window = 2
stride = 2

[classifier]
classes = 4
"""

CLASS_NAMES = ["horizontal", "vertical", "diagonal", "antidiagonal"]


def stripes(count_per_class: int, seed: int, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(4 * count, size, size)`` of a bright line on noise, one class per
    direction (horizontal, vertical, diagonal, anti-diagonal), and their labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(4):
        for _ in range(count_per_class):
            image = rng.integers(0, 60, (size, size))
            k = int(rng.integers(2, size - 2))
            if label == 0:
                image[k, :] = 230
            elif label == 1:
                image[:, k] = 230
            else:
                offset = k - size // 2
                for i in range(size):
                    j = i + offset if label == 2 else size - 1 - i + offset
                    if 0 <= j < size:
                        image[i, j] = 230
            images.append(image)
            labels.append(label)
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``spec``: the tiny network's TOML; ``data``: a .npz with 4×40 training and 4×10 test
    images of 12×12 (train/test layout, class names)."""
    folder = tmp_path_factory.mktemp("tiny")
    spec = folder / "tiny.toml"
    spec.write_text(TINY_SPEC, encoding="utf-8")
    train_images, train_labels = stripes(40, seed=1)
    test_images, test_labels = stripes(10, seed=2)
    data = folder / "stripes.npz"
    np.savez(
        data,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=np.asarray(CLASS_NAMES),
    )
    return {"spec": spec, "data": data, "folder": folder}


def train_tiny(tiny_files: dict[str, Path], config: object, out: Path) -> Path:
    """Train the tiny network on the stripes with ``config``; return the run folder."""
    from cnnkit.data import load
    from cnnkit.models import ArchitectureSpec
    from cnnkit.training import fit

    spec = ArchitectureSpec.load(str(tiny_files["spec"]))
    return fit(spec, load(tiny_files["data"], (12, 12)), config, out=out)


TINY_CONFIG = {"epochs": 4, "batch_size": 8, "lr": 0.1, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="session")
def trained(tiny_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny network (:data:`TINY_CONFIG`); tests must not change it."""
    from cnnkit.training import TrainConfig

    out = tmp_path_factory.mktemp("runs") / "run"
    return train_tiny(tiny_files, TrainConfig(**TINY_CONFIG), out)


def tiny_argv(tiny_files: dict[str, Path], *extra: str) -> list[str]:
    """``cnnkit train`` of the tiny network on the stripes, one thread, no progress."""
    return [
        "train",
        "--spec",
        str(tiny_files["spec"]),
        "--data",
        str(tiny_files["data"]),
        "--threads",
        "1",
        "--progress",
        "none",
        *extra,
    ]


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[int]:
    """Inside the block another process holds ``folder``'s lock (its PID is yielded);
    the process is killed with SIGKILL at the end, leaving its lock file behind."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from cnnkit._files import FolderLock; "
            f"FolderLock({str(folder)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        env={**os.environ, "PYTHONPATH": SRC},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
