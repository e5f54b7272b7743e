"""lecun83's first stage run a few images at a time, and max pooling without a gradient.

Three measurements, float32, CPU, after ``cnnkit.tune_runtime()``, each variant timed in
turn (one run of each per round) and the medians reported:

1. stage 1 (filter bank, rectification + normalization, pooling) on 64 images, run as
   a ``Stage`` does with slices of 1, 2, 4, 8, 16 and 64 images: the forward pass
   without a gradient, and forward + backward;
2. layer-2 max pooling (64 maps of 75x75, window 10, stride 5) without a gradient:
   by blocks, on a channels-last copy, and ``F.max_pool2d`` on the contiguous maps, at
   64 images and at 4 (a slice);
3. the layer-3 table (64 -> 256, 4096 kernels of 9x9) without a gradient, each method,
   at 1, 4, 14 and 64 images (kept weight transforms included);
4. lecun83's forward pass without a gradient, layer by layer (each layer timed alone,
   on its input from the layer before), for 1 image and for 64 (stage 1 as 16 slices
   of 4 images), beside the whole network.

Run from the repository root::

    python -m benchmarks.bench_slices [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

import cnnkit
from benchmarks.bench_tying import median_seconds
from cnnkit import tables
from cnnkit.kernels import pooling
from cnnkit.models import build, from_name, stages
from cnnkit.ops.table_conv import plan_table, table_conv2d

SLICES = (1, 2, 4, 8, 16, 64)


def _rounds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each variant, one run of each per round, after a warm-up."""
    return {name: 1e3 * seconds for name, seconds in median_seconds(variants, repeats).items()}


def _print(title: str, medians: dict[str, float]) -> None:
    print(f"\n{title}")
    for name, ms in medians.items():
        print(f"  {name:36s} {ms:9.2f} ms")


def stage_slices(repeats: int) -> None:
    torch.manual_seed(0)
    stage = build(from_name("lecun83", classes=101)).stage1
    x = torch.randn(64, 1, 83, 83)

    def forward(images: int) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                torch.cat([stages._run_fused(stage, part) for part in x.split(images)])

        return run

    def train(images: int) -> Callable[[], object]:
        def run() -> None:
            out = torch.cat([stages._run_fused(stage, part) for part in x.split(images)])
            out.sum().backward()

        return run

    _print(
        "stage 1, 64 images, forward without a gradient",
        _rounds({f"slices of {n}": forward(n) for n in SLICES}, repeats),
    )
    _print(
        "stage 1, 64 images, forward + backward",
        _rounds({f"slices of {n}": train(n) for n in SLICES}, repeats),
    )


def max_pooling(repeats: int) -> None:
    for batch in (64, 4):
        x = torch.randn(batch, 64, 75, 75)
        expected = F.max_pool2d(x, 10, 5)
        by_blocks = pooling._block_max_pool(x, (10, 10), (5, 5))
        assert torch.equal(by_blocks, expected)
        variants = {
            "by blocks": lambda x=x: pooling._block_max_pool(x, (10, 10), (5, 5)),
            "channels-last copy (with indices)": lambda x=x: pooling._ChannelsLastMaxPool.apply(
                x, (10, 10), (5, 5)
            )[0],
            "F.max_pool2d, contiguous": lambda x=x: F.max_pool2d(x, 10, 5),
        }
        with torch.no_grad():
            medians = _rounds(variants, repeats)
        _print(f"layer-2 max pooling, {batch} images, no gradient", medians)


def table_methods(repeats: int) -> None:
    torch.manual_seed(0)
    plan = plan_table(tables.random(64, 256, 16, seed=0))
    weight, bias = torch.randn(4096, 9, 9), torch.randn(256)
    for batch in (1, 4, 14, 64):
        x = torch.randn(batch, 64, 14, 14)
        variants = {
            method: lambda x=x, method=method: table_conv2d(x, plan, weight, bias, method=method)
            for method in ("unfold", "fourier", "dense")
        }
        with torch.no_grad():
            medians = _rounds(variants, repeats)
        _print(f"layer-3 table, {batch} images, no gradient", medians)


def forward_parts(repeats: int) -> None:
    torch.manual_seed(0)
    model = build(from_name("lecun83", classes=101)).eval()
    for batch, stage1_slice in ((1, 1), (64, 4)):
        x = torch.randn(batch, 1, 83, 83)
        parts: dict[str, Callable[[], object]] = {}
        h = x
        for number, stage in enumerate(model.stages, start=1):
            # stage 1 on one slice, counted once per slice; later stages on the batch
            slices = batch // stage1_slice if number == 1 else 1
            inp = h[:stage1_slice] if number == 1 else h
            for name, layer in (
                ("filters", stage.filters),
                ("rectify+norm", stage.norm.forward_rectified),
                ("pool", stage.pool),
            ):
                with torch.no_grad():
                    out = layer(inp)
                parts[f"stage{number}.{name} (x{slices})"] = (
                    lambda layer=layer, inp=inp, slices=slices: [layer(inp) for _ in range(slices)]
                )
                inp = out
            with torch.no_grad():
                h = stage(h)
        parts["classifier"] = lambda h=h: model.classifier(h)
        parts["whole network"] = lambda x=x: model(x)
        with torch.no_grad():
            medians = _rounds(parts, repeats * (20 if batch == 1 else 1))
        _print(f"lecun83 forward without a gradient, {batch} image(s), by layer", medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    settings = cnnkit.tune_runtime(args.threads)
    print(f"threads {settings.threads}, torch {torch.__version__}")
    stage_slices(args.repeats)
    max_pooling(args.repeats)
    table_methods(args.repeats)
    forward_parts(args.repeats)


if __name__ == "__main__":
    main()
