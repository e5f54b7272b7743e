"""What a training run prints: a tqdm bar per epoch on a terminal, one line per epoch
otherwise, and a final summary line.

Modes: ``"bar"`` (tqdm on stderr, refreshed a few times a second, plus the epoch line),
``"lines"`` (only the epoch lines and notes, on stdout), ``"none"`` (silent), and
``"auto"`` (``"bar"`` when stderr is a terminal, else ``"lines"``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

MODES = ("auto", "bar", "lines", "none")


def format_seconds(seconds: float) -> str:
    """``75.3`` -> ``"1m15s"``; ``3725`` -> ``"1h02m05s"``; under a minute, ``"12.3s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _percent(value: Any) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.2f}%"
    )


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    """One line for a metrics row: losses, accuracies, learning rate, speed, time."""
    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"train loss {row['train_loss']:.4f} acc {_percent(row['train_accuracy'])}",
        f"val loss {row['val_loss']:.4f} acc {_percent(row['val_accuracy'])}",
    ]
    if row.get("test_accuracy") is not None:
        parts.append(f"test acc {_percent(row['test_accuracy'])}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['images_per_s']:.0f} img/s")
    parts.append(format_seconds(row["seconds"]))
    return "  ".join(parts)


class Progress:
    """Reports a run's progress in one of :data:`MODES`."""

    def __init__(self, mode: str = "auto", out: TextIO | None = None, err: TextIO | None = None):
        if mode not in MODES:
            raise ValueError(f"progress must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if _is_terminal(self.err) else "lines"
        self.mode = mode
        self._bar: tqdm | None = None

    def note(self, text: str) -> None:
        """A line of information (not shown in ``"none"`` mode)."""
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if self.mode != "bar":
            return
        self._bar = tqdm(
            total=steps,
            initial=done,
            desc=f"epoch {epoch}/{epochs}",
            unit="batch",
            file=self.err,
            dynamic_ncols=True,
            leave=False,
            mininterval=0.5,
        )

    def step(self, images: int, loss: float, accuracy: float, images_per_s: float) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(
            f"loss {loss:.4f} acc {100 * accuracy:.1f}% {images_per_s:.0f} img/s", refresh=False
        )
        self._bar.update(1)

    def end_epoch(self, row: Mapping[str, Any], epochs: int) -> None:
        self.close()
        self.note(epoch_line(row, epochs))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(
        self,
        run_dir: Path,
        rows: Sequence[Mapping[str, Any]],
        best: Mapping[str, Any],
        wall_seconds: float,
    ) -> None:
        """The summary line: test accuracy of the last epoch and of the best checkpoint
        (validation accuracy when there is no test split), wall time, run folder."""
        self.close()
        self.note(summary_line(run_dir, rows, best, wall_seconds))


def summary_line(
    run_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    best: Mapping[str, Any],
    wall_seconds: float,
) -> str:
    """E.g. ``done in 3m41s: test accuracy 98.70% after epoch 15 (the last); best
    checkpoint: epoch 13 (validation 98.50%, test 98.70%); run folder runs/001``.

    Without a test split, the validation accuracy stands in for the test accuracy.
    """
    head = f"done in {format_seconds(wall_seconds)}"
    if not rows:
        return f"{head}; run folder {run_dir}"
    last = rows[-1]
    if last.get("test_accuracy") is not None:
        result = f"test accuracy {_percent(last['test_accuracy'])}"
    else:
        result = f"validation accuracy {_percent(last['val_accuracy'])} (no test split)"
    text = f"{head}: {result} after epoch {last['epoch']} (the last)"
    row = {r["epoch"]: r for r in rows}.get(best.get("epoch"))
    if row is not None and row is not last:
        scores = f"validation {_percent(row['val_accuracy'])}"
        if row.get("test_accuracy") is not None:
            scores += f", test {_percent(row['test_accuracy'])}"
        text += f"; best checkpoint: epoch {row['epoch']} ({scores})"
    elif row is last:
        text += ", also the best checkpoint"
    return f"{text}; run folder {run_dir}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
