"""``experiment``: studies made of ordinary training runs -- ``sharing``, ``jarrett``,
``grid`` (the studies live in :mod:`cnnkit.experiments`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnkit.cli._common import load_spec
from cnnkit.cli._parsing import Parser, add_out, int_at_least

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
    parse = int_at_least(1)
    try:
        return [parse(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"expected sizes like 250,1000: {error}") from None


def experiment_arguments(parser: argparse.ArgumentParser) -> None:
    studies = parser.add_subparsers(dest="study", metavar="STUDY", parser_class=Parser)
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
        study.add_argument("--seeds", type=int_at_least(1), default=None, help="seeds per cell")
        study.add_argument("--epochs", type=int_at_least(1), default=None, help="epochs per cell")
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
        type=int_at_least(0),
        default=None,
        help="small subsets train for more epochs, to at least this many steps (default 150)",
    )
    made["grid"].add_argument("file", metavar="FILE.toml", help="the grid file")
    for name, study in made.items():
        study.add_argument("--jobs", type=int_at_least(1), default=1, help="cells at once")
        add_out(study, "DIR", f"default: experiments/{name}")


def run_experiment(args: argparse.Namespace) -> int:
    from cnnkit import experiments

    def report(line: str) -> None:
        print(line, flush=True)

    out = args.out or f"experiments/{args.study}"
    if args.study == "grid":
        experiments.grid(args.file, out, jobs=args.jobs, report=report)
    else:
        spec = load_spec(args, default="digits28")
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
