"""``export``: a trained run's network as ONNX or a torch.export archive, checked after
writing (the logic lives in :mod:`cnnkit.export`)."""

from __future__ import annotations

import argparse

from cnnkit.cli._common import data_warnings_as_lines, writer_lock
from cnnkit.cli._parsing import add_checkpoint, add_out, add_run_dir


def export_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser)
    add_checkpoint(parser, "which weights to export (default: best)")
    parser.add_argument(
        "--format",
        choices=("onnx", "pt2"),
        default="onnx",
        help="onnx (opset 18, run by onnxruntime) or pt2 (a torch.export archive); default: onnx",
    )
    add_out(parser, "FILE", "the file to write (default: RUN_DIR/model.onnx or .pt2)")


def run_export(args: argparse.Namespace) -> int:
    from cnnkit.export import export_run

    with writer_lock(args.run_dir, args.out), data_warnings_as_lines():
        result = export_run(
            args.run_dir, format=args.format, checkpoint=args.checkpoint, out=args.out
        )
    print(result.to_text())
    return 0 if result.ok else 1
