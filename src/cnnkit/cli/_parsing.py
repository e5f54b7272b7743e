"""The command's argument parsing: the parser, its help layout, and the argument types.

Every verb builds its options from these, so a wrong value reads the same everywhere:
``cnnkit: error: argument --epochs: must be an integer >= 1, got 0`` and exit status 2.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

# torch's generators take seeds below 2**63 (cnnkit.training.config.SEED_MAX)
SEED_MAX = 2**63 - 1


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"cnnkit: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option with a default says it, as "(default: X)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS)
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


# --------------------------------------------------------------------------------------
# argument types: each turns the text of one argument into its value, or says why not
# --------------------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def int_between(minimum: int, maximum: int, bound: str = "") -> Callable[[str], int]:
    """An argparse type for integers in ``[minimum, maximum]``; ``bound`` says why."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not minimum <= value <= maximum:
            why = f" ({bound})" if bound else ""
            raise argparse.ArgumentTypeError(
                f"must be an integer in [{minimum}, {maximum}]{why}, got {value}"
            )
        return value

    return parse


def thread_count(text: str) -> int:
    """A number of CPU threads, at most the logical CPUs of this machine."""
    cpus = os.cpu_count() or 1
    return int_between(1, cpus, f"this machine has {cpus} logical CPUs")(text)


def number(text: str) -> float:
    """A finite real number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_number(text: str) -> float:
    """A finite number ``> 0``."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def nonnegative_number(text: str) -> float:
    """A finite number ``>= 0``."""
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


# --------------------------------------------------------------------------------------
# arguments several verbs share
# --------------------------------------------------------------------------------------


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset NAME`` or ``--spec FILE``, one of them (read by ``load_spec``)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="a named network (default: lecun83)")
    source.add_argument("--spec", default=None, metavar="FILE", help="a .toml or .json spec")


def add_data(
    parser: argparse.ArgumentParser,
    help: str = "images to evaluate on (default: the run's own data, test split)",
) -> None:
    """``--data SOURCE``: a data source's name, folder or file (``None`` when not given)."""
    parser.add_argument("--data", default=None, metavar="SOURCE", help=help)


def add_run_dir(
    parser: argparse.ArgumentParser, help: str = "a run folder written by train"
) -> None:
    """The positional ``RUN_DIR`` (``args.run_dir``)."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help=help)


def add_checkpoint(
    parser: argparse.ArgumentParser, help: str | None = None, default: str | None = "best"
) -> None:
    """``--checkpoint best|last``: which of a run's weights."""
    parser.add_argument("--checkpoint", choices=("best", "last"), default=default, help=help)


def add_out(parser: argparse.ArgumentParser, metavar: str, help: str) -> None:
    """``--out``: where the verb writes (``None`` when not given)."""
    parser.add_argument("--out", default=None, metavar=metavar, help=help)


def add_format(parser: argparse.ArgumentParser, *choices: str) -> None:
    """``--format``: how the verb prints; the first choice is the default."""
    parser.add_argument("--format", choices=choices, default=choices[0], help="output")
