"""The studies' PNG plots, small enough to commit (matplotlib's Agg backend, 100 dpi)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

_STYLE = {
    "convolutional": ("tab:blue", "o"),
    "locally_connected": ("tab:orange", "s"),
    "fully_connected": ("tab:red", "^"),
}


def accuracy_plot(
    path: Path,
    curves: Mapping[str, Mapping[int, Sequence[float]]],
    weights: Mapping[str, int],
    title: str,
) -> None:
    """Test accuracy (%) against training-set size (log axis), one line per family.

    ``curves[family][size]`` holds the seeds' test accuracies: the line joins their
    means and the band spans their minimum to maximum.
    """
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    for family, by_size in curves.items():
        sizes = sorted(by_size)
        values = [[100 * v for v in by_size[s]] for s in sizes]
        mean = [sum(v) / len(v) for v in values]
        colour, marker = _STYLE.get(family, ("tab:gray", "."))
        label = f"{family.replace('_', ' ')} ({weights[family]:,} weights)"
        ax.plot(sizes, mean, marker=marker, color=colour, label=label)
        if any(len(v) > 1 for v in values):
            low, high = [min(v) for v in values], [max(v) for v in values]
            ax.fill_between(sizes, low, high, color=colour, alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("training images (log scale)")
    ax.set_ylabel("test accuracy (%)")
    _finish(fig, ax, title, path, grid={"which": "both"})


def weights_plot(path: Path, counts: Mapping[str, Mapping[int, int]], title: str) -> None:
    """Weights of the first layer against the input's side (both axes logarithmic)."""
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    for family, by_size in counts.items():
        sizes = sorted(by_size)
        colour, marker = _STYLE.get(family, ("tab:gray", "."))
        ax.plot(
            sizes,
            [by_size[s] for s in sizes],
            marker=marker,
            color=colour,
            label=family.replace("_", " "),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("input image side (pixels, log scale)")
    ax.set_ylabel("weights into the first hidden layer")
    _finish(fig, ax, title, path, grid={"which": "both"})


def bar_plot(path: Path, labels: Sequence[str], series: Mapping[str, Sequence[float]], title: str):
    """Grouped horizontal bars: one group per label, one bar per series (accuracy %)."""
    fig = Figure(figsize=(6.4, 0.9 + 0.32 * len(labels) * max(1, len(series))), dpi=100)
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        positions = [i + k * height for i in range(len(labels))]
        ax.barh(positions, [100 * v for v in values], height=height, label=name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    _finish(fig, ax, title, path, grid={"axis": "x"})


def _finish(fig: Figure, ax: object, title: str, path: Path, grid: dict[str, str]) -> None:
    """The studies' common finish: a small title, a light grid (``grid`` says which
    lines), a small legend, a tight layout, then the file."""
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, **grid)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
