"""``tune``: time a network's implementation choices on this machine ahead of a run
(:func:`cnnkit.models.tune.tune_network`, kept by :mod:`cnnkit.kernels.tuning`)."""

from __future__ import annotations

import argparse
import time

from cnnkit.cli._common import load_spec
from cnnkit.cli._parsing import add_format, add_spec_arguments, int_at_least, thread_count

TUNE_HELP = """\
Time, once, the ways cnnkit can compute a network on this machine -- each connection-table
filter bank's exact methods, how many images a large stage runs at a time -- for
evaluation and for training at each --batch size, and keep the fastest in this machine's
tuning file. Later runs read the file instead of timing while they work (a run that meets
a case not in the file times it once, and says so in one line). Run it with the machine
otherwise idle: timings taken beside other work mislead. Cases the file holds already are
kept, unless --retime asks for them to be timed again.

CNNKIT_TUNE=0 turns all timing off (every case takes its safe default, the file is not
read); CNNKIT_TUNE=read uses the file but times nothing. CNNKIT_CACHE_DIR moves the file.
"""


def tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser)
    parser.add_argument(
        "--batch",
        type=int_at_least(1),
        action="append",
        metavar="N",
        help="a batch size to time (repeatable; default: 1 and the training batch, 64)",
    )
    parser.add_argument(
        "--retime",
        action="store_true",
        help="time again the cases this machine's file holds already (after a busy spell)",
    )
    parser.add_argument("--threads", type=thread_count, default=None, help="torch threads")
    add_format(parser, "table", "json")


def run_tune(args: argparse.Namespace) -> int:
    import json
    import os

    from cnnkit.kernels import fast_enabled, tuning
    from cnnkit.models.tune import tune_network
    from cnnkit.runtime import tune_runtime

    if not tuning.tuning_enabled():
        raise ValueError(
            f"CNNKIT_TUNE={os.environ.get('CNNKIT_TUNE')} turns timing off; unset it to run "
            "cnnkit tune"
        )
    spec = load_spec(args)
    tune_runtime(args.threads)
    start = time.perf_counter()
    choices = tune_network(spec, batch_sizes=args.batch or (1, 64), retime=args.retime)
    seconds = time.perf_counter() - start
    path = tuning.cache_path()
    if args.format == "json":
        print(json.dumps({"file": str(path), "seconds": seconds, "choices": choices}, indent=2))
        return 0
    if not choices:
        off = "" if fast_enabled() else ": the fast paths are off (CNNKIT_FAST=0)"
        print(f"nothing to time{off}")
        return 0
    width = max(len(case) for case in choices)
    for case, choice in sorted(choices.items()):
        print(f"{case:{width}s}  {choice}")
    print(f"{len(choices)} cases in {seconds:.1f} s, kept in {path}")
    return 0
