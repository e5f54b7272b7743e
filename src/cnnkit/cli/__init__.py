"""The ``cnnkit`` command: parse arguments, call one function per verb, print.

A user's mistake (bad option, missing file, invalid spec) or a fault of the machine (a
read-only folder, a full disk) prints one line ``cnnkit: error: ...`` and exits with status
2; set ``CNNKIT_DEBUG=1`` to see the traceback. Nothing heavy (torch) is imported before
the arguments are checked and the run folder is locked.

One module per group of verbs, each giving a verb its arguments (``*_arguments``) and
its run (``run_*``); ``command`` holds the table of verbs, the parser and ``main``:

- ``networks`` -- ``summary``, ``presets``, ``spec``
- ``train`` -- ``train`` (a new run, or ``--resume``)
- ``evaluate`` -- ``evaluate``, ``predict``
- ``figures`` -- ``show``, ``filters``, ``curves``
- ``export``, ``experiment``, ``report`` -- the verb of that name
- ``_parsing`` -- the parser, its help layout, argument types and shared arguments
- ``_common`` -- reading the spec, locking a run folder, the data loader's warnings
"""

from cnnkit.cli.command import DESCRIPTIONS, USER_ERRORS, VERBS, Verb, build_parser, main
from cnnkit.cli.evaluate import run_evaluate, run_predict
from cnnkit.cli.experiment import (
    EXPERIMENT_HELP,
    GRID_HELP,
    JARRETT_HELP,
    SHARING_HELP,
    run_experiment,
)
from cnnkit.cli.export import run_export
from cnnkit.cli.figures import FILTERS_HELP, SHOW_HELP, run_curves, run_filters, run_show
from cnnkit.cli.networks import SUMMARY_HELP, run_presets, run_spec, run_summary
from cnnkit.cli.report import REPORT_HELP, run_report
from cnnkit.cli.train import TRAIN_HELP, run_train
from cnnkit.cli.tune import TUNE_HELP, run_tune

__all__ = [
    "DESCRIPTIONS",
    "EXPERIMENT_HELP",
    "FILTERS_HELP",
    "GRID_HELP",
    "JARRETT_HELP",
    "REPORT_HELP",
    "SHARING_HELP",
    "SHOW_HELP",
    "SUMMARY_HELP",
    "TRAIN_HELP",
    "TUNE_HELP",
    "USER_ERRORS",
    "VERBS",
    "Verb",
    "build_parser",
    "main",
    "run_curves",
    "run_evaluate",
    "run_experiment",
    "run_export",
    "run_filters",
    "run_predict",
    "run_presets",
    "run_report",
    "run_show",
    "run_spec",
    "run_summary",
    "run_train",
    "run_tune",
]
