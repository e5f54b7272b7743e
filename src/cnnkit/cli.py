"""The ``cnnkit`` command: parse arguments, call one function per verb, print.

A user's mistake (bad option, missing file, invalid spec) prints one line
``cnnkit: error: ...`` and exits with status 2; set ``CNNKIT_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from cnnkit import __version__

# A user's mistakes surface as these; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"cnnkit: error: {message}\n")


# verb -> (help line, function adding its arguments, function running it)
Verb = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
VERBS: dict[str, Verb] = {}
# verb -> longer text for ``cnnkit VERB --help`` (optional)
DESCRIPTIONS: dict[str, str] = {}


# --------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------

SUMMARY_HELP = """\
Print a network's layers: output maps and size, units, trainable weights and biases,
2-D kernels, connections and multiply-adds per image, and totals.

connections: (input unit, output unit) pairs a layer joins through a weight or a
  window (filter banks: kernels x kernel area x output positions; pooling: output units
  x window area; normalization: pairs inside its window, cut at the borders).
multiply-adds: products of a trainable weight and an input (filter banks, trainable
  pooling, classifier); weight-free layers have none.
"""


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="a named network (default: lecun83)")
    source.add_argument("--spec", default=None, metavar="FILE", help="a .toml or .json spec")


def _load_spec(args: argparse.Namespace):
    from cnnkit.models import ArchitectureSpec, from_name

    if args.spec is not None:
        return ArchitectureSpec.load(args.spec)
    return from_name(args.preset or "lecun83")


def _summary_arguments(parser: argparse.ArgumentParser) -> None:
    _add_spec_arguments(parser)
    parser.add_argument("--input", nargs=2, type=int, metavar=("H", "W"), help="input size")
    parser.add_argument("--classes", type=int, default=None, help="number of classes")
    parser.add_argument(
        "--dense",
        nargs=4,
        type=int,
        metavar=("INPUT_H", "INPUT_W", "HIDDEN_H", "HIDDEN_W"),
        help="also count a fully connected layer between these sizes (e.g. 1000 1000 100 100)",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")


def run_summary(args: argparse.Namespace) -> int:
    import dataclasses

    from cnnkit import analysis

    spec = _load_spec(args)
    if args.input is not None:
        height, width = args.input
        spec = dataclasses.replace(
            spec, input=dataclasses.replace(spec.input, height=height, width=width)
        )
    if args.classes is not None:
        spec = spec.with_classes(args.classes)
    summary = analysis.summarize(spec)
    dense = None
    if args.dense is not None:
        in_h, in_w, hid_h, hid_w = args.dense
        dense = analysis.dense_equivalent((in_h, in_w), (hid_h, hid_w))
    if args.format == "json":
        print(analysis.to_json(summary, dense))
    else:
        print(analysis.format_table(summary, dense))
    return 0


DESCRIPTIONS["summary"] = SUMMARY_HELP
VERBS["summary"] = ("the layers of a network and their counts", _summary_arguments, run_summary)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cnnkit",
        description="LeCun's multi-stage convolutional network: build, analyse, train, inspect.",
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for name, (help_line, add_arguments, _) in VERBS.items():
        verb_parser = sub.add_parser(
            name,
            help=help_line,
            description=DESCRIPTIONS.get(name, help_line),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(verb_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    run = VERBS[args.verb][2]
    try:
        return run(args)
    except USER_ERRORS as error:
        if os.environ.get("CNNKIT_DEBUG"):
            raise
        print(f"cnnkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 130
