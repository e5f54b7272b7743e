"""Training curves: loss and accuracy per epoch from a run's ``metrics.csv`` rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cnnkit.figures._common import DPI, header

_SPLITS = (("train", "-", "o"), ("val", "--", "s"), ("test", ":", "^"))


def curves_figure(
    rows: Sequence[Mapping[str, Any]], *, source: str | None = None, note: str | None = None
) -> Figure:
    """Loss and accuracy per epoch, for the train, validation and test splits.

    ``rows`` are the rows of a run's ``metrics.csv`` as dicts (``LoadedRun.metrics`` or
    ``cnnkit.training.read_metrics``): ``epoch`` and ``{train,val,test}_{loss,accuracy}``,
    ``None`` where a value is missing (a split without a test set draws no test line).
    Accuracy is drawn in percent; a dotted vertical line marks the epoch with the best
    validation accuracy (the first, on ties), whose weights a run keeps as ``best``.
    ``source`` names the run in errors and in the header. Lines are labelled by split
    (``line.get_label()``), axes ``"loss"`` and ``"accuracy"``.

    Size: 10 by 4.5 inches at :data:`DPI` (1000×450 px).
    """
    where = f"{source}: " if source else ""
    if not rows:
        raise ValueError(f"{where}no epoch has finished yet (metrics.csv has no rows)")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or row.get("epoch") is None:
            raise ValueError(f"{where}metrics row {i} has no epoch: {row!r}")
    epochs = np.array([row["epoch"] for row in rows], dtype=float)
    fig = Figure(figsize=(10, 4.5), dpi=DPI)
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.8, wspace=0.22)
    best = None
    val = [row.get("val_accuracy") for row in rows]
    if any(v is not None for v in val):
        best = rows[int(np.nanargmax([np.nan if v is None else v for v in val]))]["epoch"]
    for ax, metric, scale, unit in (
        (axes[0], "loss", 1.0, ""),
        (axes[1], "accuracy", 100.0, " (%)"),
    ):
        ax.set_label(metric)
        for split, style, marker in _SPLITS:
            values = np.array(
                [
                    np.nan if row.get(f"{split}_{metric}") is None else row[f"{split}_{metric}"]
                    for row in rows
                ],
                dtype=float,
            )
            if np.isnan(values).all():
                continue
            marker = marker if len(rows) <= 30 else None
            ax.plot(epochs, values * scale, style, marker=marker, markersize=4, label=split)
        if best is not None:
            ax.axvline(best, color="#777", linestyle=":", linewidth=1, label=f"best (epoch {best})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric + unit)
        ax.set_title(metric, fontsize=11, weight="bold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if len(rows) <= 12:
            ax.set_xticks(epochs)
    header(fig, " · ".join(part for part in (source, note, f"{len(rows)} epochs") if part))
    return fig
