"""``report``: one HTML page about a run or an experiment (the page lives in
:mod:`cnnkit.report`)."""

from __future__ import annotations

import argparse

from cnnkit.cli._common import data_warnings_as_lines, writer_lock
from cnnkit.cli._parsing import add_checkpoint, add_data, add_out, add_run_dir, int_at_least

REPORT_HELP = """\
Write one self-contained HTML page about a run: its options and data, the layer table
with Section 4's weight count comparison, the accuracy of `evaluate --format json` for
the same checkpoint, the training curves, the confusion matrix with the most confused
pairs, the learned filters against Sobel's, every stage's maps for a few test images
(one correct, then the most confident mistakes) and the misclassified examples.

Every image is inline; the page has no script and fetches nothing. Where the run's data
has no test split, the validation split is used and the page says so. Given an
experiment folder (results.md or results.json, plots, one run folder per cell), the page
shows its table and plots and links each cell's report.html.
"""


def report_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser, "a run folder or an experiment folder")
    add_checkpoint(parser)
    add_out(parser, "FILE.html", "the page (default: RUN_DIR/report.html)")
    parser.add_argument(
        "--images", type=int_at_least(0), default=3, help="images whose maps are drawn (3)"
    )
    add_data(parser)


def run_report(args: argparse.Namespace) -> int:
    from cnnkit.report import write_report

    with writer_lock(args.run_dir, args.out), data_warnings_as_lines():
        path = write_report(
            args.run_dir,
            checkpoint=args.checkpoint,
            out=args.out,
            images=args.images,
            data=args.data,
        )
    print(f"wrote {path}")
    return 0
