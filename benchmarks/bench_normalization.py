"""Local contrast normalization vs the literal C-channel window convolution.

Forward + backward, float32, CPU, 9x9 Gaussian window, at the lecture's shapes (batch 64):

- layer 1: 64 maps of 75x75;
- layer 3: 256 maps of 6x6 (the window is larger than the map).

The literal form computes each windowed sum as ``F.conv2d`` with the full ``(1, C, 9, 9)``
weight and zero padding, as the formula ``sum_{i,p,q} w_pq x_{i,j+p,k+q}`` reads.
cnnkit's ops average the maps first and smooth that one image with two banded matrix
products; ``border="zero"`` computes the same numbers as the literal form (the maximum
difference is printed), ``"renormalize"`` is the default. Variants are timed
interleaved, one repeat of each in turn, and medians are reported.

Run from the repository root::

    python -m benchmarks.bench_normalization [--batch 64] [--repeats 5] [--threads 1]
        [--tune-runtime]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cnnkit.ops.normalization import contrast_norm, gaussian_window, subtractive_norm

LAYERS = {
    "layer 1 (64@75x75)": (64, 75),
    "layer 3 (256@6x6)": (256, 6),
}
WINDOW = 9


def literal_subtractive(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    weight = window.unsqueeze(0)  # (1, C, 9, 9)
    return x - F.conv2d(x, weight, padding=WINDOW // 2)


def literal_contrast(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    weight = window.unsqueeze(0)  # (1, C, 9, 9)
    v = x - F.conv2d(x, weight, padding=WINDOW // 2)
    sigma = F.conv2d(v * v, weight, padding=WINDOW // 2).clamp_min(1e-38).sqrt()
    c = sigma.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-4)
    return v / torch.maximum(sigma, c)


def _step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    start = time.perf_counter()
    fn(x).backward(grad)
    elapsed = time.perf_counter() - start
    x.grad = None
    return elapsed


def _race(variants: dict[str, Callable], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward+backward of each variant, timed in turn."""
    grad = torch.randn_like(x)
    for fn in variants.values():  # warm-up
        _step(fn, x, grad)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_step(fn, x, grad))
    return {name: statistics.median(t) for name, t in times.items()}


def bench(batch: int, repeats: int) -> None:
    print(f"\n{'layer':20} {'op':12} {'variant':22} {'ms':>9} {'vs literal':>11}")
    for label, (maps, size) in LAYERS.items():
        x = torch.randn(batch, maps, size, size).requires_grad_()
        window = gaussian_window(WINDOW, WINDOW / 4, maps)
        with torch.no_grad():
            diff = (contrast_norm(x, window, border="zero") - literal_contrast(x, window)).abs()
        print(f"{label:20} max |zero - literal| = {diff.max().item():.2e}")
        ops = {
            "subtractive": {
                "literal conv2d": lambda t, w=window: literal_subtractive(t, w),
                "cnnkit border=zero": lambda t, w=window: subtractive_norm(t, w, "zero"),
                "cnnkit renormalize": lambda t, w=window: subtractive_norm(t, w),
            },
            "contrast": {
                "literal conv2d": lambda t, w=window: literal_contrast(t, w),
                "cnnkit border=zero": lambda t, w=window: contrast_norm(t, w, border="zero"),
                "cnnkit renormalize": lambda t, w=window: contrast_norm(t, w),
            },
        }
        for op, variants in ops.items():
            med = _race(variants, x, repeats)
            for name, seconds in med.items():
                ratio = med["literal conv2d"] / seconds
                print(f"{label:20} {op:12} {name:22} {1e3 * seconds:9.1f} {ratio:10.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tune-runtime", action="store_true", help="apply cnnkit.runtime.tune_runtime() first"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.tune_runtime:
        from cnnkit.runtime import tune_runtime

        print(tune_runtime(args.threads))
    elif args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print(f"batch {args.batch}, {WINDOW}x{WINDOW} window, median of {args.repeats} repeats")
    bench(args.batch, args.repeats)


if __name__ == "__main__":
    main()
