"""The report's own pictures: the confusion matrix as a heat map, and rows of images.

Counts are drawn on ``viridis`` (sequential, readable with the common colour-vision
deficiencies and in gray); images in gray from 0 (black) to 1 (white), as the
feature-map figures draw the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from cnnkit.figures import DPI


def confusion_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """Heat map of ``confusion[t][p]`` (rows: true class, columns: predicted), each cell
    labelled with its count, with a colour bar.

    Size: ``s`` by ``s`` inches with ``s = clip(1.6 + 0.45 C, 4, 11)`` for ``C`` classes.
    """
    matrix = np.asarray(confusion, dtype=float)  # (C, C)
    count = len(class_names)
    side = float(np.clip(1.6 + 0.45 * count, 4.0, 11.0))
    fig = Figure(figsize=(side + 1.0, side), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_label("confusion")
    shown = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(1.0, matrix.max()))
    fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.03, label="images")
    ax.set_xticks(range(count), list(class_names), rotation=90 if count > 6 else 0, fontsize=8)
    ax.set_yticks(range(count), list(class_names), fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if count <= 20:
        middle = matrix.max() / 2
        for t in range(count):
            for p in range(count):
                value = int(matrix[t, p])
                colour = "black" if matrix[t, p] > middle else "white"
                ax.text(p, t, str(value), ha="center", va="center", fontsize=7, color=colour)
    return fig


def images_figure(images: np.ndarray, captions: Sequence[str], *, columns: int = 6) -> Figure:
    """Gray images ``(N, H, W)`` in [0, 1] in rows of ``columns``, each with its caption.

    Size: ``1.7 min(N, columns)`` by ``1.9 rows`` inches.
    """
    images = np.asarray(images)
    count = len(images)
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig = Figure(figsize=(1.7 * columns, 1.9 * rows), dpi=DPI)
    for i, (picture, caption) in enumerate(zip(images, captions, strict=True)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(caption, fontsize=7.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.86, wspace=0.1, hspace=0.45)
    return fig
