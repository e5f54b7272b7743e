"""``train``: a new run (``fit``) or the continuation of one (``--resume``), in one
process or in ``--nproc N`` (the logic lives in :mod:`cnnkit.training`; the rules about
what a run may do in :mod:`cnnkit.training.rules`, which ``fit`` and ``resume`` apply
too). ``_check_process_split`` checks, before any process starts, the rule that
``World.check_batch`` enforces inside them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cnnkit.cli._common import data_warnings_as_lines, load_spec
from cnnkit.cli._parsing import (
    SEED_MAX,
    add_checkpoint,
    add_data,
    add_out,
    add_spec_arguments,
    int_at_least,
    int_between,
    nonnegative_number,
    open_fraction,
    positive_number,
    thread_count,
)

TRAIN_HELP = """\
Train a network on images and write a run folder: spec.toml, config.json, classes.json,
metrics.csv, and the checkpoints last.safetensors and best.safetensors (with .json
sidecars). With no options: the lecture's lecun83 on the bundled digits.

Defaults: SGD with momentum 0.9 (Nesterov), batch 64, learning rate 0.02 (Adam: 0.001)
with a linear warm-up over the first 5% of steps and a cosine decay to zero, gradient
norm clipped at 5, weight decay 5e-4 on kernels and weights, random shifts of the
training images. The best checkpoint is the epoch with the best validation accuracy;
the test split is only reported.

--resume RUN_DIR continues an interrupted run from its last checkpoint, with the run's
own options (only --device, --threads and --epochs may be given again); on CPU the result
is bitwise equal to an uninterrupted run. With --epochs N it extends a run, finished or
not, to N epochs: the learning rate then follows the schedule of an N-epoch run.

--init-from RUN_DIR starts a new run from another run's weights (--checkpoint best|last);
the network must be the same, but the number of classes may differ.

Only one process at a time writes into a run folder; a second one is refused.
"""


# options that are TrainConfig fields of the same name; None means "the TrainConfig default"
_TRAIN_OPTIONS = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "schedule",
    "grad_clip",
    "augment",
    "seed",
    "device",
    "threads",
    "dtype",
    "checkpoint_every_steps",
)


def train_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser)
    add_data(
        parser, "'digits' (default), an image folder (one sub-folder per class), or a .npz file"
    )
    parser.add_argument(
        "--epochs",
        type=int_at_least(1),
        help="number of epochs (15); with --resume: extend the run to this many",
    )
    parser.add_argument("--batch-size", type=int_at_least(1), help="images per step (64)")
    parser.add_argument(
        "--lr", type=positive_number, help="peak learning rate (0.02 for sgd, 0.001 for adam)"
    )
    parser.add_argument("--optimizer", choices=("sgd", "adam"), help="sgd (default) or adam")
    parser.add_argument(
        "--weight-decay", type=nonnegative_number, help="weight decay on kernels (5e-4)"
    )
    parser.add_argument(
        "--schedule",
        choices=("cosine", "step", "constant"),
        help="learning rate after the warm-up (cosine)",
    )
    parser.add_argument(
        "--grad-clip",
        type=nonnegative_number,
        help="largest norm of the gradient (5; 0 turns clipping off)",
    )
    parser.add_argument("--augment", choices=("shift", "none"), help="training-image shifts")
    parser.add_argument(
        "--weight-sharing",
        choices=("shared", "averaged", "none"),
        help="shared kernels (default), a kernel at every position tied by averaging "
        "after each step (the lecture's Section 3; see docs/tying.md), or none: a kernel "
        "at every position, never tied (locally connected)",
    )
    parser.add_argument(
        "--averaged-step",
        choices=("scaled", "literal"),
        help="with --weight-sharing averaged: scale each group's step by its size so it "
        "trains like shared (default), or keep the lecture's literal mean step",
    )
    parser.add_argument(
        "--seed", type=int_between(0, SEED_MAX), help="seed of everything random (0)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="where to train (auto: CUDA when available, else CPU)",
    )
    parser.add_argument(
        "--threads", type=thread_count, help="CPU threads to use (the CPUs this process may use)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="precision of weights and arithmetic (float32; float64 is ~2x slower)",
    )
    parser.add_argument(
        "--val-fraction",
        type=open_fraction,
        help="share of each class's training images kept for validation (0.2)",
    )
    add_out(parser, "RUN_DIR", "run folder (default: runs/NNN)")
    parser.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR"
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_DIR",
        help="start from the weights of the run in RUN_DIR (same network)",
    )
    add_checkpoint(parser, "with --init-from: which of its checkpoints (best)", default=None)
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="progress display: a bar on a terminal (auto), a bar, one line per epoch, or none",
    )
    parser.add_argument("--checkpoint-every-steps", type=int_at_least(1), help=argparse.SUPPRESS)
    parser.add_argument(
        "--nproc",
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="train in N processes on this machine (starts torchrun; see docs/distributed.md)",
    )
    parser.add_argument(
        "--report", action="store_true", help="write RUN_DIR/report.html at the end (see report)"
    )


def _with_weight_sharing(spec, args: argparse.Namespace):
    """The spec with ``--weight-sharing`` / ``--averaged-step`` applied."""
    import dataclasses

    changes = {}
    if args.weight_sharing is not None:
        changes["weight_sharing"] = args.weight_sharing
    if args.averaged_step is not None:
        if (args.weight_sharing or spec.weight_sharing) != "averaged":
            raise ValueError("--averaged-step applies only with --weight-sharing averaged")
        changes["averaged_step"] = args.averaged_step
    return dataclasses.replace(spec, **changes) if changes else spec


def run_train(args: argparse.Namespace) -> int:
    from cnnkit.training.distributed import DistributedError
    from cnnkit.training.rules import RuleError

    try:
        with _run_folder_lock(args):
            return _run_train(args)
    except DistributedError as error:
        print(f"cnnkit: error: {error}", file=sys.stderr)
        return 1
    except RuleError as error:  # named as the flags the user gave
        flags = {"init_checkpoint": "checkpoint"}
        raise ValueError(
            error.spelled(lambda name: f"--{flags.get(name, name).replace('_', '-')}")
        ) from None


def _run_folder_lock(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The lock on the run folder ``train`` will write, taken before anything heavy is
    imported; none when the folder is chosen later (``runs/NNN``), or when ``--nproc``
    starts processes or this is one of them (process 0 takes it inside ``fit``)."""
    from cnnkit._files import FolderLock

    if args.nproc > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return contextlib.nullcontext()
    if args.resume is not None:
        if Path(args.resume, "config.json").is_file():
            return FolderLock(args.resume)
        return contextlib.nullcontext()  # resume says what is wrong with the folder
    if args.out is not None and (Path(args.out).is_dir() or not Path(args.out).exists()):
        return FolderLock(args.out, create=True)
    return contextlib.nullcontext()


def _run_train(args: argparse.Namespace) -> int:
    from cnnkit._native import native_attempted, native_status
    from cnnkit.runtime import tune_runtime

    # Built here, once, before any worker processes start.
    building = not native_attempted()
    kernels = native_status()
    if building and kernels.available and kernels.seconds > 2 and args.progress != "none":
        print(f"compiled cnnkit's CPU kernels in {kernels.seconds:.0f} s (once per machine)")
    if args.nproc > 1:
        return _launch_processes(args)
    tune_runtime(args.threads)
    if args.resume is not None:
        return _resume(args)
    return _fit(args)


def _launch_processes(args: argparse.Namespace) -> int:
    """``--nproc N``: this same command in N processes started by torchrun."""
    from cnnkit.training import distributed

    if "WORLD_SIZE" in os.environ:
        raise ValueError(
            "--nproc starts its own processes; it cannot be given to a process that "
            "torchrun started (WORLD_SIZE is set)"
        )
    _check_process_split(args)
    argv = getattr(args, "argv", None) or sys.argv[1:]
    return distributed.launch(args.nproc, distributed.strip_option(argv, "--nproc"))


def _check_process_split(args: argparse.Namespace) -> None:
    """With ``--nproc N``, the batch (given, the run's, or the default) must split into N
    equal shares; checked once, here, before any process starts."""
    import json

    batch = args.batch_size
    where = "--batch-size" if batch is not None else "the default batch size"
    if batch is None and args.resume is not None:
        try:
            config = json.loads(Path(args.resume, "config.json").read_text(encoding="utf-8"))
            batch, where = int(config["training"]["batch_size"]), "the run's batch size"
        except (OSError, ValueError, KeyError, TypeError):
            return  # resume reports the damaged folder
    if batch is None:
        batch = 64
    if batch % args.nproc:
        raise ValueError(
            f"--nproc {args.nproc} does not divide {where} {batch}: every process takes an "
            f"equal share of each batch; give a batch size that is a multiple of {args.nproc}"
        )


def _resume(args: argparse.Namespace) -> int:
    from cnnkit import training
    from cnnkit.training import rules

    rules.check_resume_options(
        name
        for name in (
            *_TRAIN_OPTIONS,
            *("preset", "spec", "data", "val_fraction", "out"),
            *("weight_sharing", "averaged_step", "init_from", "checkpoint"),
        )
        if getattr(args, name) is not None
    )
    resume = functools.partial(
        training.resume,
        args.resume,
        device=args.device,
        threads=args.threads,
        progress=args.progress,
        epochs=args.epochs,
    )
    return _trained(resume, args)


def _fit(args: argparse.Namespace) -> int:
    from cnnkit import data as datasets
    from cnnkit import training
    from cnnkit.models.memory import check_memory
    from cnnkit.training import rules

    rules.check_init_choice(args.init_from, args.checkpoint)
    spec = _with_weight_sharing(load_spec(args), args)
    options = {
        name: getattr(args, name) for name in _TRAIN_OPTIONS if getattr(args, name) is not None
    }
    if options.get("grad_clip") == 0:  # TrainConfig's "no clipping"
        options["grad_clip"] = None
    config = training.TrainConfig(**options)
    element_bytes = 8 if config.dtype == "float64" else 4
    check_memory(spec, config.batch_size, f"a batch of {config.batch_size}", element_bytes)
    with data_warnings_as_lines():
        splits = datasets.load(
            args.data or "digits",
            (spec.input.height, spec.input.width),
            val_fraction=args.val_fraction if args.val_fraction is not None else 0.2,
            seed=config.seed,
        )
    invocation = {
        key: value
        for key, value in vars(args).items()
        if key not in ("verb", "progress", "resume", "argv", "nproc", "report")
    }
    fit = functools.partial(
        training.fit,
        spec,
        splits,
        config,
        out=args.out,
        progress=args.progress,
        invocation=invocation,
        init_from=args.init_from,
        init_checkpoint=args.checkpoint,
    )
    return _trained(fit, args)


def _trained(train: Callable[[], str | Path], args: argparse.Namespace) -> int:
    """Run ``train`` (``fit`` or ``resume``): a loss gone NaN or infinite is one line and
    exit status 1; with ``--report``, the run's page follows."""
    from cnnkit import training

    try:
        path = train()
    except training.NonFiniteLossError as error:
        print(f"cnnkit: error: {error}", file=sys.stderr)
        return 1
    return _report_after_training(path, args)


def _report_after_training(path: str | Path, args: argparse.Namespace) -> int:
    """``train --report``: the run's page, written by the first process only."""
    if getattr(args, "report", False) and os.environ.get("RANK", "0") == "0":
        from cnnkit.report import write_report

        print(f"wrote {write_report(path)}")
    return 0
