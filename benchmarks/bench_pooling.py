"""Fused pooling at the kept points vs pooling at stride 1 then subsampling.

Forward + backward, float32, CPU, at the lecture's shapes (batch 64):

- layer 2: 64 maps of 75x75, window 10, stride 5 (75 -> 66 -> 14);
- layer 4: 256 maps of 6x6, window 6, stride 4 (6 -> 1 -> 1).

Also compares contiguous (NCHW) and channels_last (NHWC) input for max pooling.
Variants are timed interleaved, one repeat of each in turn, and medians are reported,
so that load from other processes affects them alike.

Run from the repository root::

    python -m benchmarks.bench_pooling [--batch 64] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from cnnkit.ops.pooling import pool2d, pool_subsample2d, subsample2d

LAYERS = {
    "layer 2 (64@75x75, window 10, stride 5)": (64, 75, 10, 5),
    "layer 4 (256@6x6, window 6, stride 4)": (256, 6, 6, 4),
}


def _step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x).sum().backward()
    elapsed = time.perf_counter() - start
    x.grad = None
    return elapsed


def _race(
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    inputs: dict[str, torch.Tensor],
    repeats: int,
) -> dict[str, float]:
    """Median seconds per forward+backward of each variant, timed in turn."""
    for name, fn in variants.items():  # warm-up
        _step(fn, inputs[name])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_step(fn, inputs[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_fused(batch: int, repeats: int) -> None:
    print("\nfused pool_subsample2d vs subsample2d(pool2d(stride=1)), forward+backward")
    print(f"{'layer':42} {'kind':5} {'unfused ms':>11} {'fused ms':>9} {'speed-up':>9}")
    for label, (maps, size, window, stride) in LAYERS.items():
        x = torch.randn(batch, maps, size, size).requires_grad_()
        for kind in ("max", "avg", "lp"):
            variants = {
                "unfused": lambda t, k=kind, w=window, s=stride: subsample2d(pool2d(t, k, w), s),
                "fused": lambda t, k=kind, w=window, s=stride: pool_subsample2d(t, k, w, s),
            }
            med = _race(variants, {"unfused": x, "fused": x}, repeats)
            ratio = med["unfused"] / med["fused"]
            print(
                f"{label:42} {kind:5} {1e3 * med['unfused']:11.1f} {1e3 * med['fused']:9.1f}"
                f" {ratio:8.1f}x"
            )


def bench_layout(batch: int, repeats: int) -> None:
    print("\nmax pooling, contiguous (NCHW) vs channels_last (NHWC) input, forward+backward")
    print(f"{'layer':42} {'variant':8} {'NCHW ms':>9} {'NHWC ms':>9} {'NCHW/NHWC':>10}")
    for label, (maps, size, window, stride) in LAYERS.items():
        x = torch.randn(batch, maps, size, size)
        inputs = {
            "NCHW": x.clone().requires_grad_(),
            "NHWC": x.to(memory_format=torch.channels_last).requires_grad_(),
        }
        for variant, stride_used in (("fused", stride), ("stride 1", 1)):

            def fn(t, w=window, s=stride_used):
                return pool2d(t, "max", w, s)

            med = _race({"NCHW": fn, "NHWC": fn}, inputs, repeats)
            print(
                f"{label:42} {variant:8} {1e3 * med['NCHW']:9.1f} {1e3 * med['NHWC']:9.1f}"
                f" {med['NCHW'] / med['NHWC']:9.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print(f"batch {args.batch}, median of {args.repeats} interleaved repeats")
    bench_fused(args.batch, args.repeats)
    bench_layout(args.batch, args.repeats)


if __name__ == "__main__":
    main()
