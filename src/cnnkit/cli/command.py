"""The command itself: the table of verbs, the parser made from it, and ``main``, which
runs one verb and turns a user's mistake into one line and exit status 2."""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from collections.abc import Callable, Sequence

from cnnkit import __version__
from cnnkit.cli import evaluate, experiment, export, figures, networks, report, train, tune
from cnnkit.cli._parsing import HelpFormatter, Parser

# A user's mistakes and the machine's faults (OSError: read-only, disk full, folder in
# use) surface as these; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError)

# verb -> (help line, function adding its arguments, function running it)
Verb = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
VERBS: dict[str, Verb] = {
    "summary": (
        "the layers of a network and their counts",
        networks.summary_arguments,
        networks.run_summary,
    ),
    "train": ("train a network and write a run folder", train.train_arguments, train.run_train),
    "evaluate": (
        "accuracy, per-class accuracy and confusion matrix of a run",
        evaluate.evaluate_arguments,
        evaluate.run_evaluate,
    ),
    "predict": (
        "the most probable classes of image files, by a trained run",
        evaluate.predict_arguments,
        evaluate.run_predict,
    ),
    "show": (
        "draw every stage's feature maps for one image",
        figures.show_arguments,
        figures.run_show,
    ),
    "filters": (
        "draw a run's learned kernels and their similarity to Sobel's filters",
        figures.filters_arguments,
        figures.run_filters,
    ),
    "curves": (
        "draw a run's loss and accuracy per epoch",
        figures.curves_arguments,
        figures.run_curves,
    ),
    "export": (
        "write a run's network as ONNX or a torch.export archive, and check it",
        export.export_arguments,
        export.run_export,
    ),
    "experiment": (
        "run a study of many runs (sharing, jarrett, grid)",
        experiment.experiment_arguments,
        experiment.run_experiment,
    ),
    "report": (
        "one HTML page showing a run (or an experiment)",
        report.report_arguments,
        report.run_report,
    ),
    "presets": (
        "the named networks, with their sizes",
        networks.presets_arguments,
        networks.run_presets,
    ),
    "spec": ("print a preset as a spec file to edit", networks.spec_arguments, networks.run_spec),
    "tune": (
        "time the fastest ways to compute a network on this machine, once",
        tune.tune_arguments,
        tune.run_tune,
    ),
}
# verb -> longer text for ``cnnkit VERB --help`` (the help line where there is none)
DESCRIPTIONS: dict[str, str] = {
    "summary": networks.SUMMARY_HELP,
    "train": train.TRAIN_HELP,
    "show": figures.SHOW_HELP,
    "tune": tune.TUNE_HELP,
    "filters": figures.FILTERS_HELP,
    "experiment": experiment.EXPERIMENT_HELP,
    "report": report.REPORT_HELP,
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cnnkit",
        description="LeCun's multi-stage convolutional network: build, analyse, train, inspect.",
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    for name, (help_line, add_arguments, _) in VERBS.items():
        verb_parser = sub.add_parser(
            name,
            help=help_line,
            description=DESCRIPTIONS.get(name, help_line),
            formatter_class=HelpFormatter,
        )
        add_arguments(verb_parser)
    return parser


# Characters cnnkit prints, and what to print where the terminal's encoding lacks them.
_PLAIN = {"×": "x", "·": "-", "…": "...", "–": "-", "—": "-", "°": " deg", "→": "->"}


def _plain_characters(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start : error.end]
    return "".join(_PLAIN.get(c, "?") for c in text), error.end


codecs.register_error("cnnkit-plain", _plain_characters)


def _fit_output_to_encoding() -> None:
    """On a stream that cannot encode "×" (ASCII, a C locale), print "x" and the like."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            "×·…".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(errors="cnnkit-plain")


def _describe(error: Exception) -> str:
    """One line for an error: an ``OSError`` as ``'path': cause``."""
    if isinstance(error, OSError) and error.strerror:
        names = [n for n in (error.filename, error.filename2) if n is not None]
        where = " -> ".join(repr(str(n)) for n in names)
        return f"{where}: {error.strerror}" if where else error.strerror
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    _fit_output_to_encoding()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.verb is None:
        parser.print_help(sys.stderr)
        return 2
    run = VERBS[args.verb][2]
    try:
        return run(args)
    except USER_ERRORS as error:
        if os.environ.get("CNNKIT_DEBUG"):
            raise
        print(f"cnnkit: error: {_describe(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        folder = getattr(interrupt, "run", None)
        hint = f"; continue with: cnnkit train --resume {folder}" if folder else ""
        print(f"cnnkit: interrupted{hint}", file=sys.stderr)
        return 130
