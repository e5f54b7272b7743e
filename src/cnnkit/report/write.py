"""``write_report``: the page of a run folder or of an experiment folder, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from cnnkit._files import write_atomic
from cnnkit.data.splits import DataSplits
from cnnkit.report.experiment import experiment_html, is_experiment
from cnnkit.report.run import run_report_html
from cnnkit.training.run import load_run

REPORT_NAME = "report.html"


def _check_out(out: Path) -> Path:
    if out.is_dir():
        raise ValueError(
            f"out {str(out)!r} is a folder; give a file name such as {out / REPORT_NAME}"
        )
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"out folder {str(out.parent)!r} is not writable")
    return out


def write_report(
    folder: str | os.PathLike[str],
    *,
    checkpoint: str = "best",
    out: str | os.PathLike[str] | None = None,
    images: int = 3,
    data: str | os.PathLike[str] | DataSplits | None = None,
    device: str = "cpu",
) -> Path:
    """Write the HTML report of a run folder (or an experiment folder) and return its path.

    A run's page shows its configuration, the ``summary`` table, the accuracy that
    :func:`cnnkit.training.evaluate_run` gives for ``checkpoint`` on ``data`` (default:
    the run's own data, its test split or else its validation split), the training
    curves, the confusion matrix, stage 1's filters against Sobel's, every stage's maps
    for ``images`` images and the misclassified examples. An experiment folder (one with
    ``results.md`` or ``results.json`` and no ``config.json``) gets its table, its
    plots and a link to each cell's ``report.html``. ``out`` defaults to
    ``folder/report.html``. The page holds every image inline and no script.
    """
    from cnnkit._validation import check_nonnegative_int

    check_nonnegative_int("images", images)
    folder = Path(folder)
    target = _check_out(Path(out) if out is not None else folder / REPORT_NAME)
    if is_experiment(folder):
        text = experiment_html(folder, target)
    else:
        loaded = load_run(folder, checkpoint, device=device)
        text, _ = run_report_html(loaded, images=images, data=data)
    try:
        write_atomic(target, text)
    except OSError as error:
        raise PermissionError(
            f"cannot write the report to {str(target)!r}: {error.strerror or error}"
        ) from None
    return target
