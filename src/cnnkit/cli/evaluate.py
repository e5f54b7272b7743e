"""``evaluate``, ``predict``: a trained run on images (the logic lives in
:mod:`cnnkit.training`: ``evaluate_run``, ``load_run``, ``predict``)."""

from __future__ import annotations

import argparse

from cnnkit.cli._common import data_warnings_as_lines
from cnnkit.cli._parsing import add_checkpoint, add_data, add_format, add_run_dir, int_at_least


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser)
    add_checkpoint(parser, "which weights to use (best: best validation accuracy)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    add_format(parser, "text", "json")


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _run_arguments(parser)
    add_data(parser)


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from cnnkit import training

    with data_warnings_as_lines():
        result = training.evaluate_run(
            args.run_dir, args.checkpoint, data=args.data, device=args.device
        )
    print(json.dumps(result.to_dict(), indent=2) if args.format == "json" else result.to_text())
    return 0


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    _run_arguments(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument(
        "--top-k", type=int_at_least(1), default=3, help="classes to show per image"
    )


def run_predict(args: argparse.Namespace) -> int:
    import json

    from cnnkit import training

    run = training.load_run(args.run_dir, args.checkpoint, device=args.device)
    results = training.predict(run, args.images, top_k=args.top_k)
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for result in results:
            print(result.to_text())
    return 1 if any(r.error is not None for r in results) else 0
