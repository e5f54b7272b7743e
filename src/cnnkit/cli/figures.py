"""``show``, ``filters``, ``curves``: pictures of a network and of a run (the figures
live in :mod:`cnnkit.figures`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnkit.cli._common import load_spec
from cnnkit.cli._parsing import add_checkpoint, add_format, add_out, add_run_dir, int_at_least

SHOW_HELP = """\
Draw what a network does to one image: the input, then every stage's maps after each of
its steps (filter bank, non-linearity, normalization, pooling, subsampling), one grid per
step titled like "stage 1 · filters · 64@75×75". A fused pooling layer is drawn as its
two steps, the maps pooled at stride 1 and their subsampling. Each grid shows the step's
first --maps maps (16 by default), each at least 64 px, with its own colour bar; a last
panel draws the first pooling window over one map at the network's sizes (for lecun83:
10×10 window, step 5, 75×75 → 14×14).

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


def show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", default=None, metavar="RUN_DIR", help="a run folder")
    source.add_argument("--preset", default=None, help="a named network (default: lecun83)")
    source.add_argument("--spec", default=None, metavar="FILE", help="a .toml or .json spec")
    parser.add_argument(
        "--checkpoint", choices=("best", "last"), default=None, help="with --run (best)"
    )
    parser.add_argument(
        "--seed", type=int_at_least(0), default=None, help="seed of the random weights (0)"
    )
    parser.add_argument(
        "--maps",
        type=int_at_least(1),
        default=16,
        metavar="N",
        help="maps drawn of each step, its first N (all when it has fewer); panels grow so "
        "that every map stays at least 64 px",
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
        spec = load_spec(args)
        from cnnkit.models.memory import check_memory

        check_memory(spec, 1, "one image")
        model = figures.random_network(spec, seed=seed)
        note = f"weights: seeded random (seed {seed}), not trained"
    out = _out_path(args.out, f"{Path(args.image).stem}-maps.png")
    most = max(model.spec.input.maps, *(s.filters.maps for s in model.spec.stages))
    if args.maps > most:
        print(f"note: --maps {args.maps} is more than any step has (at most {most}); all drawn")
    if not args.per_stage:
        fig = figures.feature_maps_figure(model, args.image, note=note, maps=args.maps)
        _save_figure(fig, out)
        return 0
    for stage in range(1, len(model.spec.stages) + 1):
        fig = figures.feature_maps_figure(model, args.image, stage=stage, note=note, maps=args.maps)
        _save_figure(fig, out.with_name(f"{out.stem}-stage{stage}{out.suffix}"))
    return 0


def filters_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser)
    parser.add_argument("--stage", type=int_at_least(1), default=1, help="which stage")
    add_checkpoint(parser, "which weights")
    parser.add_argument(
        "--top", type=int_at_least(1), default=1, help="kernels to list per template"
    )
    add_out(parser, "FILE.png", "the figure (default: filters-stageN.png)")
    add_format(parser, "text", "json")


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


def curves_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir(parser)
    add_out(parser, "FILE.png", "the figure (default: curves.png)")


def run_curves(args: argparse.Namespace) -> int:
    from cnnkit import figures
    from cnnkit.training.run_folder import open_run, read_metrics

    run = open_run(args.run_dir)
    fig = figures.curves_figure(read_metrics(run), source=f"run {run.path}")
    _save_figure(fig, _out_path(args.out, "curves.png"))
    return 0
