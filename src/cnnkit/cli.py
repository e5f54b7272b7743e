"""The ``cnnkit`` command: parse arguments, call one function per verb, print.

A user's mistake (bad option, missing file, invalid spec) or a fault of the machine (a
read-only folder, a full disk) prints one line ``cnnkit: error: ...`` and exits with status
2; set ``CNNKIT_DEBUG=1`` to see the traceback. Nothing heavy (torch) is imported before
the arguments are checked and the run folder is locked.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cnnkit import __version__

# A user's mistakes and the machine's faults (OSError: read-only, disk full, folder in
# use) surface as these; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"cnnkit: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
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
rows marked * (JSON: "view": "lecture"): a fused pooling layer shown as the lecture's two
  steps, pooling at stride 1 (lecun83: 64@66x66) then subsampling (64@14x14); the layer
  pools only where subsampling keeps a value, so these rows and the totals count that.
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
    parser.add_argument(
        "--classes", type=_int_at_least(2), default=None, help="number of classes (the spec's)"
    )
    parser.add_argument(
        "--dense",
        nargs=4,
        type=int,
        metavar=("INPUT_H", "INPUT_W", "HIDDEN_H", "HIDDEN_W"),
        help="also count a fully connected layer between these sizes (e.g. 1000 1000 100 100)",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output")


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
        origin = "--classes" if args.classes is not None else "the spec's; change with --classes N"
        print(f"classes: {spec.classifier.classes} ({origin})")
    return 0


DESCRIPTIONS["summary"] = SUMMARY_HELP
VERBS["summary"] = ("the layers of a network and their counts", _summary_arguments, run_summary)


# --------------------------------------------------------------------------------------
# train, evaluate, predict (the logic lives in cnnkit.training)
# --------------------------------------------------------------------------------------

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


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


def _int_between(minimum: int, maximum: int, bound: str = "") -> Callable[[str], int]:
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


def _thread_count(text: str) -> int:
    cpus = os.cpu_count() or 1
    return _int_between(1, cpus, f"this machine has {cpus} logical CPUs")(text)


# torch's generators take seeds below 2**63 (cnnkit.training.config.SEED_MAX)
_SEED_MAX = 2**63 - 1


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _nonnegative_number(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


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


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_spec_arguments(parser)
    parser.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="'digits' (default), an image folder (one sub-folder per class), or a .npz file",
    )
    parser.add_argument(
        "--epochs",
        type=_int_at_least(1),
        help="number of epochs (15); with --resume: extend the run to this many",
    )
    parser.add_argument("--batch-size", type=_int_at_least(1), help="images per step (64)")
    parser.add_argument(
        "--lr", type=_positive_number, help="peak learning rate (0.02 for sgd, 0.001 for adam)"
    )
    parser.add_argument("--optimizer", choices=("sgd", "adam"), help="sgd (default) or adam")
    parser.add_argument(
        "--weight-decay", type=_nonnegative_number, help="weight decay on kernels (5e-4)"
    )
    parser.add_argument(
        "--schedule",
        choices=("cosine", "step", "constant"),
        help="learning rate after the warm-up (cosine)",
    )
    parser.add_argument(
        "--grad-clip",
        type=_nonnegative_number,
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
        "--seed", type=_int_between(0, _SEED_MAX), help="seed of everything random (0)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="where to train (auto: CUDA when available, else CPU)",
    )
    parser.add_argument(
        "--threads", type=_thread_count, help="CPU threads to use (the CPUs this process may use)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="precision of weights and arithmetic (float32; float64 is ~2x slower)",
    )
    parser.add_argument(
        "--val-fraction",
        type=_open_fraction,
        help="share of each class's training images kept for validation (0.2)",
    )
    parser.add_argument(
        "--out", default=None, metavar="RUN_DIR", help="run folder (default: runs/NNN)"
    )
    parser.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR"
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_DIR",
        help="start from the weights of the run in RUN_DIR (same network)",
    )
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default=None,
        help="with --init-from: which of its checkpoints (best)",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="progress display: a bar on a terminal (auto), a bar, one line per epoch, or none",
    )
    parser.add_argument("--checkpoint-every-steps", type=_int_at_least(1), help=argparse.SUPPRESS)
    parser.add_argument(
        "--nproc",
        type=_int_at_least(1),
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


def _run_train(args: argparse.Namespace) -> int:
    from cnnkit import data as datasets
    from cnnkit import training
    from cnnkit._native import native_attempted, native_status
    from cnnkit.runtime import tune_runtime
    from cnnkit.training import distributed, rules

    # Built here, once, before any worker processes start.
    building = not native_attempted()
    kernels = native_status()
    if building and kernels.available and kernels.seconds > 2 and args.progress != "none":
        print(f"compiled cnnkit's CPU kernels in {kernels.seconds:.0f} s (once per machine)")
    if args.nproc > 1:
        if "WORLD_SIZE" in os.environ:
            raise ValueError(
                "--nproc starts its own processes; it cannot be given to a process that "
                "torchrun started (WORLD_SIZE is set)"
            )
        _check_process_split(args)
        argv = getattr(args, "argv", None) or sys.argv[1:]
        return distributed.launch(args.nproc, distributed.strip_option(argv, "--nproc"))
    tune_runtime(args.threads)
    if args.resume is not None:
        rules.check_resume_options(
            name
            for name in (
                *_TRAIN_OPTIONS,
                *("preset", "spec", "data", "val_fraction", "out"),
                *("weight_sharing", "averaged_step", "init_from", "checkpoint"),
            )
            if getattr(args, name) is not None
        )
        try:
            path = training.resume(
                args.resume,
                device=args.device,
                threads=args.threads,
                progress=args.progress,
                epochs=args.epochs,
            )
        except training.NonFiniteLossError as error:
            print(f"cnnkit: error: {error}", file=sys.stderr)
            return 1
        return _report_after_training(path, args)
    rules.check_init_choice(args.init_from, args.checkpoint)
    spec = _with_weight_sharing(_load_spec(args), args)
    options = {
        name: getattr(args, name) for name in _TRAIN_OPTIONS if getattr(args, name) is not None
    }
    if options.get("grad_clip") == 0:
        options["grad_clip"] = None
    config = training.TrainConfig(**options)
    from cnnkit.models.memory import check_memory

    element_bytes = 8 if config.dtype == "float64" else 4
    check_memory(spec, config.batch_size, f"a batch of {config.batch_size}", element_bytes)
    with _data_warnings_as_lines():
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
    try:
        path = training.fit(
            spec,
            splits,
            config,
            out=args.out,
            progress=args.progress,
            invocation=invocation,
            init_from=args.init_from,
            init_checkpoint=args.checkpoint,
        )
    except training.NonFiniteLossError as error:
        print(f"cnnkit: error: {error}", file=sys.stderr)
        return 1
    return _report_after_training(path, args)


@contextlib.contextmanager
def _data_warnings_as_lines() -> Iterator[None]:
    """Print the data loader's warnings (skipped files) as ``cnnkit: warning: ...``."""
    from cnnkit.data import UnreadableFilesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreadableFilesWarning)
        yield
    for warning in caught:
        print(f"cnnkit: warning: {warning.message}", file=sys.stderr)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by train")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which weights to use (best: best validation accuracy)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output")


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _run_arguments(parser)
    parser.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="images to evaluate on (default: the run's own data, test split)",
    )


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from cnnkit import training

    with _data_warnings_as_lines():
        result = training.evaluate_run(
            args.run_dir, args.checkpoint, data=args.data, device=args.device
        )
    print(json.dumps(result.to_dict(), indent=2) if args.format == "json" else result.to_text())
    return 0


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    _run_arguments(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument(
        "--top-k", type=_int_at_least(1), default=3, help="classes to show per image"
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


DESCRIPTIONS["train"] = TRAIN_HELP
VERBS["train"] = ("train a network and write a run folder", _train_arguments, run_train)
VERBS["evaluate"] = (
    "accuracy, per-class accuracy and confusion matrix of a run",
    _evaluate_arguments,
    run_evaluate,
)
VERBS["predict"] = (
    "the most probable classes of image files, by a trained run",
    _predict_arguments,
    run_predict,
)


# --------------------------------------------------------------------------------------
# show, filters, curves (the figures live in cnnkit.figures)
# --------------------------------------------------------------------------------------

SHOW_HELP = """\
Draw what a network does to one image: the input, then every stage's maps after each of
its steps (filter bank, non-linearity, normalization, pooling, subsampling), one grid per
step titled like "stage 1 · filters · 64@75×75". A fused pooling layer is drawn as its
two steps, the maps pooled at stride 1 and their subsampling.

IMAGE may be any format Pillow reads (PNG, JPEG, GIF, BMP, TIFF, WebP ...), in any mode
(RGB, RGBA, 16-bit, palette); it is converted exactly as training converts images.

Weights: with --run, the run's checkpoint (--checkpoint best|last); otherwise the network
of --preset or --spec (default lecun83) with random weights drawn after seeding with
--seed (default 0), which the figure says.
"""

FILTERS_HELP = """\
Draw a run's learned kernels of one stage as a grid and, for Sobel's Gx and its turns by
45° (Gy, -Gx, -Gy and the diagonals), the most similar kernel with its score; print the
scores as text or JSON.

Names follow what a kernel computes in the network: a filter bank correlates, so the
stored kernel named "Gx" (cosine +1) is the lecture's convolution kernel Gx turned by 180°,
the one with which the bank computes +d/dx.

Similarity: cosine between a kernel and that stored form of the 3×3 Sobel filter, resized
to the kernel's size by bilinear interpolation (corners aligned). The listing also gives
the score that the best of as many random kernels would reach, for comparison.
"""


def _out_path(given: str | None, default: str) -> Path:
    """The file a figure goes to; its folder must exist."""
    path = Path(given if given is not None else default)
    if path.is_dir():
        raise ValueError(
            f"--out {str(path)!r} is a folder; give a file name such as {path / default}"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out folder {str(path.parent)!r} does not exist")
    return path


def _save_figure(fig, path: Path) -> None:
    fig.savefig(path)
    print(f"wrote {path}")


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", default=None, metavar="RUN_DIR", help="a run folder")
    source.add_argument("--preset", default=None, help="a named network (default: lecun83)")
    source.add_argument("--spec", default=None, metavar="FILE", help="a .toml or .json spec")
    parser.add_argument(
        "--checkpoint", choices=("best", "last"), default=None, help="with --run (best)"
    )
    parser.add_argument(
        "--seed", type=_int_at_least(0), default=None, help="seed of the random weights (0)"
    )
    parser.add_argument(
        "--per-stage", action="store_true", help="one figure per stage: OUT-stage1.png, ..."
    )
    parser.add_argument(
        "--out", default=None, metavar="FILE.png", help="the figure (default: IMAGE-maps.png)"
    )


def run_show(args: argparse.Namespace) -> int:
    from cnnkit import figures

    if args.run is not None:
        from cnnkit import training

        if args.seed is not None:
            raise ValueError("--seed sets random weights; it cannot be given with --run")
        checkpoint = args.checkpoint or "best"
        run = training.load_run(args.run, checkpoint)
        model = run.model
        epoch = run.metadata.get("epoch")
        note = f"weights: run {run.path}, {checkpoint} checkpoint (epoch {epoch})"
    else:
        if args.checkpoint is not None:
            raise ValueError("--checkpoint chooses a run's weights; give it with --run")
        seed = 0 if args.seed is None else args.seed
        spec = _load_spec(args)
        from cnnkit.models.memory import check_memory

        check_memory(spec, 1, "one image")
        model = figures.random_network(spec, seed=seed)
        note = f"weights: seeded random (seed {seed}), not trained"
    out = _out_path(args.out, f"{Path(args.image).stem}-maps.png")
    if not args.per_stage:
        _save_figure(figures.feature_maps_figure(model, args.image, note=note), out)
        return 0
    for stage in range(1, len(model.spec.stages) + 1):
        fig = figures.feature_maps_figure(model, args.image, stage=stage, note=note)
        _save_figure(fig, out.with_name(f"{out.stem}-stage{stage}{out.suffix}"))
    return 0


def _filters_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by train")
    parser.add_argument("--stage", type=_int_at_least(1), default=1, help="which stage")
    parser.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="which weights"
    )
    parser.add_argument(
        "--top", type=_int_at_least(1), default=1, help="kernels to list per template"
    )
    parser.add_argument(
        "--out", default=None, metavar="FILE.png", help="the figure (default: filters-stageN.png)"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output")


def run_filters(args: argparse.Namespace) -> int:
    import json

    from cnnkit import figures, training

    run = training.load_run(args.run_dir, args.checkpoint)
    report = figures.sobel_report(run.model, args.stage, top=args.top)
    out = _out_path(args.out, f"filters-stage{args.stage}.png")
    note = f"run {run.path}, {args.checkpoint} checkpoint (epoch {run.metadata.get('epoch')})"
    fig = figures.filters_figure(run.model, args.stage, report=report, note=note)
    fig.savefig(out)
    if args.format == "json":
        result = {"run": str(run.path), "figure": str(out), **report.to_dict()}
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(f"{report.to_text()}\nwrote {out}")
    return 0


def _curves_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by train")
    parser.add_argument(
        "--out", default=None, metavar="FILE.png", help="the figure (default: curves.png)"
    )


def run_curves(args: argparse.Namespace) -> int:
    from cnnkit import figures
    from cnnkit.training.run_folder import open_run, read_metrics

    run = open_run(args.run_dir)
    fig = figures.curves_figure(read_metrics(run), source=f"run {run.path}")
    _save_figure(fig, _out_path(args.out, "curves.png"))
    return 0


DESCRIPTIONS["show"] = SHOW_HELP
DESCRIPTIONS["filters"] = FILTERS_HELP
VERBS["show"] = ("draw every stage's feature maps for one image", _show_arguments, run_show)
VERBS["filters"] = (
    "draw a run's learned kernels and their similarity to Sobel's filters",
    _filters_arguments,
    run_filters,
)
VERBS["curves"] = ("draw a run's loss and accuracy per epoch", _curves_arguments, run_curves)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by train")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="which weights to export (default: best)",
    )
    parser.add_argument(
        "--format",
        choices=("onnx", "pt2"),
        default="onnx",
        help="onnx (opset 18, run by onnxruntime) or pt2 (a torch.export archive); default: onnx",
    )
    parser.add_argument(
        "--out", metavar="FILE", help="the file to write (default: RUN_DIR/model.onnx or .pt2)"
    )


def _writer_lock(folder: str, out: str | None) -> contextlib.AbstractContextManager:
    """The run folder's lock for a verb that writes its file into the folder (no
    ``--out``): one writer per run folder, as for ``train``."""
    from cnnkit._files import FolderLock

    if out is None and Path(folder).is_dir():
        return FolderLock(folder)
    return contextlib.nullcontext()


def run_export(args: argparse.Namespace) -> int:
    from cnnkit.export import export_run

    with _writer_lock(args.run_dir, args.out), _data_warnings_as_lines():
        result = export_run(
            args.run_dir, format=args.format, checkpoint=args.checkpoint, out=args.out
        )
    print(result.to_text())
    return 0 if result.ok else 1


VERBS["export"] = (
    "write a run's network as ONNX or a torch.export archive, and check it",
    _export_arguments,
    run_export,
)


# --------------------------------------------------------------------------------------
# experiment
# --------------------------------------------------------------------------------------

EXPERIMENT_HELP = """\
Studies made of ordinary training runs, each cell a run folder under OUT/cells/ that
`cnnkit evaluate`, `curves`, `filters` and `show` accept. Rerunning the same command
skips finished cells and continues an interrupted one from its last checkpoint. At the
end: OUT/results.csv, results.json, results.md and PNG plots. See docs/experiments.md.

  sharing   convolutional vs locally connected vs fully connected, per training-set size
  jarrett   Jarrett et al.'s grid: random/learned filters, non-linearity, normalization,
            pooling, stages
  grid      the cross product of a TOML file's field values
"""

SHARING_HELP = """\
Train three networks that differ only in how the first layers connect -- the preset
(convolutional), the same with a kernel at every position and no tying (locally
connected), and one hidden layer of as many units as the preset's first filter bank
outputs (fully connected; capped at 256 MiB of float32 weights) -- on stratified
training subsets, and test all on the same held-out images.

Time on a 2-core CPU with digits28 on the bundled digits: --quick (sizes 250, 1000 and
all 4000, 2 seeds, 8 epochs, 18 cells) took 3 min 10 s; the defaults (5 sizes, 3 seeds,
15 epochs, 45 cells) about 11 min, estimated from it (allow an hour on a busy machine).
"""

JARRETT_HELP = """\
Jarrett et al.'s (ICCV 2009) ablation grid on the whole training split: filters learned,
or random and frozen (only the classifier trains); non-linearity none, |x| or ReLU;
contrast normalization off or on; average or max pooling; one or two stages (48 cells).
--quick: random/learned x none/|x| x normalization off/on x one/two stages, max pooling
(16 cells). Reports the paper-style table and whether the paper's three findings hold.

Time on a 2-core CPU with digits28 on the bundled digits: --quick (16 cells, 8 epochs)
took 1 min 3 s; the defaults (48 cells, 10 epochs) about 5 min, estimated from it.
"""

GRID_HELP = """\
Run the cross product of a TOML grid file:

  preset = "digits28"            # or spec = "net.toml"
  data = "digits"                # optional
  size = 1000                    # optional: training images (default all)
  seeds = 1                      # optional
  [training]
  epochs = 3
  [grid]
  weight_sharing = ["shared", "none"]
  "stages.1.filters.maps" = [8, 16]
  "stages.*.pool.kind" = ["avg", "max"]
  "training.lr" = [0.01, 0.05]

Every cell is checked before anything trains.
"""


def _sizes(text: str) -> list[int]:
    parse = _int_at_least(1)
    try:
        return [parse(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"expected sizes like 250,1000: {error}") from None


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    studies = parser.add_subparsers(dest="study", metavar="STUDY", parser_class=_Parser)
    studies.required = True
    made = {}
    for name, help_line, text in (
        ("sharing", "weight sharing against locally and fully connected", SHARING_HELP),
        ("jarrett", "Jarrett et al.'s ablation grid", JARRETT_HELP),
        ("grid", "the cross product of a TOML grid file", GRID_HELP),
    ):
        made[name] = studies.add_parser(
            name,
            help=help_line,
            description=text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    for name in ("sharing", "jarrett"):
        study = made[name]
        study.add_argument("--data", default="digits", help="data source (default: digits)")
        source = study.add_mutually_exclusive_group()
        source.add_argument("--preset", default=None, help="the network (default: digits28)")
        source.add_argument("--spec", default=None, metavar="FILE", help="a .toml/.json spec")
        study.add_argument("--seeds", type=_int_at_least(1), default=None, help="seeds per cell")
        study.add_argument("--epochs", type=_int_at_least(1), default=None, help="epochs per cell")
        study.add_argument("--quick", action="store_true", help="the small version (see above)")
    made["sharing"].add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        metavar="N,N,...",
        help="training-subset sizes (default 250,500,1000,2000 and all)",
    )
    made["sharing"].add_argument(
        "--min-steps",
        type=_int_at_least(0),
        default=None,
        help="small subsets train for more epochs, to at least this many steps (default 150)",
    )
    made["grid"].add_argument("file", metavar="FILE.toml", help="the grid file")
    for name, study in made.items():
        study.add_argument("--jobs", type=_int_at_least(1), default=1, help="cells at once")
        study.add_argument(
            "--out", default=None, metavar="DIR", help=f"default: experiments/{name}"
        )


def run_experiment(args: argparse.Namespace) -> int:
    from cnnkit import experiments
    from cnnkit.models import ArchitectureSpec, from_name

    def report(line: str) -> None:
        print(line, flush=True)

    out = args.out or f"experiments/{args.study}"
    if args.study == "grid":
        experiments.grid(args.file, out, jobs=args.jobs, report=report)
    else:
        spec = (
            ArchitectureSpec.load(args.spec)
            if args.spec is not None
            else from_name(args.preset or "digits28")
        )
        common = {"data": args.data, "spec": spec, "seeds": args.seeds, "epochs": args.epochs}
        common |= {"quick": args.quick, "jobs": args.jobs, "report": report}
        if args.study == "sharing":
            extra = {} if args.min_steps is None else {"min_steps": args.min_steps}
            experiments.sharing(out, sizes=args.sizes, **common, **extra)
        else:
            experiments.jarrett(out, **{**common, "seeds": args.seeds or 1})
    folder = Path(out)
    print()
    print((folder / "results.md").read_text(encoding="utf-8").rstrip())
    print()
    written = sorted(
        p.name for p in folder.iterdir() if p.suffix in (".csv", ".json", ".md", ".png")
    )
    print(f"wrote {', '.join(written)} in {folder}")
    return 0


DESCRIPTIONS["experiment"] = EXPERIMENT_HELP
VERBS["experiment"] = (
    "run a study of many runs (sharing, jarrett, grid)",
    _experiment_arguments,
    run_experiment,
)


# --------------------------------------------------------------------------------------
# report (the page lives in cnnkit.report)
# --------------------------------------------------------------------------------------

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


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder or an experiment folder")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument(
        "--out", default=None, metavar="FILE.html", help="the page (default: RUN_DIR/report.html)"
    )
    parser.add_argument(
        "--images", type=_int_at_least(0), default=3, help="images whose maps are drawn (3)"
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="images to evaluate on (default: the run's own data, test split)",
    )


def run_report(args: argparse.Namespace) -> int:
    from cnnkit.report import write_report

    with _writer_lock(args.run_dir, args.out), _data_warnings_as_lines():
        path = write_report(
            args.run_dir,
            checkpoint=args.checkpoint,
            out=args.out,
            images=args.images,
            data=args.data,
        )
    print(f"wrote {path}")
    return 0


def _report_after_training(path: str | Path, args: argparse.Namespace) -> int:
    """``train --report``: the run's page, written by the first process only."""
    if getattr(args, "report", False) and os.environ.get("RANK", "0") == "0":
        from cnnkit.report import write_report

        print(f"wrote {write_report(path)}")
    return 0


DESCRIPTIONS["report"] = REPORT_HELP
VERBS["report"] = ("one HTML page showing a run (or an experiment)", _report_arguments, run_report)
# --------------------------------------------------------------------------------------
# presets, spec (a starting point for a spec file; keys: docs/specs.md)
# --------------------------------------------------------------------------------------


def _presets_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output")


def run_presets(args: argparse.Namespace) -> int:
    import json

    from cnnkit import analysis
    from cnnkit.models import list_presets
    from cnnkit.models.presets import PRESETS, from_name

    rows = []
    for name in list_presets():
        spec = from_name(name)
        summary = analysis.summarize(spec)
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()
        rows.append(
            {
                "name": name,
                "description": doc[0] if doc else "",
                "input": f"{spec.input.maps}@{spec.input.height}×{spec.input.width}",
                "classes": spec.classifier.classes,
                "weights": summary.weights,
                "biases": summary.biases,
            }
        )
    if args.format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        counts = f"{r['weights']:,} weights and {r['biases']:,} biases"
        print(f"{r['name']:<{width}}  {r['description']}")
        print(f"{'':<{width}}  input {r['input']}, {r['classes']} classes, {counts}")
    return 0


def _spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", metavar="PRESET", help="a preset's name (see cnnkit presets)")
    parser.add_argument(
        "--out", default=None, metavar="FILE.toml", help="write it there (default: print it)"
    )


def run_spec(args: argparse.Namespace) -> int:
    from cnnkit.models import from_name

    spec = from_name(args.preset)
    if args.out is None:
        print(spec.to_toml(), end="")
        return 0
    out = Path(args.out)
    if out.suffix not in (".toml", ".json"):
        raise ValueError(f"--out {args.out!r} must end in .toml or .json")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out folder {str(out.parent)!r} does not exist")
    spec.save(str(out))
    print(f"wrote {out}")
    return 0


VERBS["presets"] = ("the named networks, with their sizes", _presets_arguments, run_presets)
VERBS["spec"] = ("print a preset as a spec file to edit", _spec_arguments, run_spec)


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
            formatter_class=_HelpFormatter,
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
