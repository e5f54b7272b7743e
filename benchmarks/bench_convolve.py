"""Time ``cnnkit.ops.correlate`` against ``scipy.signal.correlate`` on LeCun's first layer.

The workload is the lecture's: a stack of 64 grey images of 83x83, each correlated (valid,
float32) with one kernel, for several kernel sizes. scipy gets the same 64 images one call
each with its default ``method="auto"`` (which picks FFT or direct per call). The two run
interleaved in one process, each timed sample a loop of about 5 ms, and the medians are
compared. Achieved GFLOP/s (2 flops per multiply-add of the direct method) are printed
beside the peak of a large float32 matrix product measured in the same run.

Run from the repository root::

    python -m benchmarks.bench_convolve [--repeats 21] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from cnnkit.ops.convolution import correlate

IMAGES, SIZE = 64, 83
KERNELS = (3, 5, 9, 13, 21)
SAMPLE_SECONDS = 0.005


def _seconds(fn: Callable[[], object], calls: int = 1) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def matmul_peak(size: int = 2048, repeats: int = 15) -> float:
    """GFLOP/s of a float32 ``size x size`` matrix product, the best of ``repeats``."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b  # warm-up
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def bench_kernel(size: int, repeats: int, rng: np.random.Generator) -> dict[str, object]:
    """Median and best seconds of cnnkit (tensor, NumPy in/out) and scipy for one kernel."""
    import scipy.signal

    images = rng.integers(0, 256, size=(IMAGES, SIZE, SIZE)).astype(np.float32) / 255
    kernel = rng.standard_normal((size, size)).astype(np.float32)
    images_t, kernel_t = torch.from_numpy(images), torch.from_numpy(kernel)

    def run_scipy() -> list[np.ndarray]:
        return [scipy.signal.correlate(image, kernel, mode="valid") for image in images]

    def run_tensor() -> torch.Tensor:
        return correlate(images_t, kernel_t)

    def run_numpy() -> np.ndarray:
        return correlate(images, kernel)

    expected = np.stack(run_scipy())
    got = run_tensor().numpy()
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    runs = {"scipy": run_scipy, "tensor": run_tensor, "numpy": run_numpy}
    times: dict[str, list[float]] = {name: [] for name in runs}
    # Each sample is a loop of about 5 ms (scipy's 64 calls are one already), so no method
    # is timed only in the cold cache the previous one leaves behind.
    calls = {name: max(1, round(SAMPLE_SECONDS / _seconds(fn))) for name, fn in runs.items()}
    names = list(runs)
    for round_ in range(repeats):  # interleaved, so a busy moment hits all three alike;
        shift = round_ % len(names)  # the order rotates from round to round
        for name in names[shift:] + names[:shift]:
            times[name].append(_seconds(runs[name], calls[name]))
    result = {name: statistics.median(values) for name, values in times.items()}
    result.update({f"{name}_best": min(values) for name, values in times.items()})
    result["error"] = error
    result["method"] = scipy.signal.choose_conv_method(images[0], kernel, mode="valid")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per kernel")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--kernels", type=int, nargs="+", default=list(KERNELS))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    peak = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"peak: float32 2048x2048 matmul {peak:.1f} GFLOP/s")
    print(f"workload: correlate {IMAGES} images {SIZE}x{SIZE}, valid, float32")
    print("times are medians of interleaved rounds; 'best' columns use the fastest round")
    header = (
        f"{'kernel':>7} {'scipy ms':>9} {'method':>7} {'cnnkit ms':>10} {'numpy ms':>9} "
        f"{'speed-up':>9} {'GFLOP/s':>8} {'of peak':>8} {'best up':>8} {'best GF/s':>9} "
        f"{'rel err':>8}"
    )
    print(header)
    for size in args.kernels:
        r = bench_kernel(size, args.repeats, rng)
        out = SIZE - size + 1
        flops = 2 * IMAGES * out * out * size * size
        gflops = flops / r["tensor"] / 1e9
        best_gflops = flops / r["tensor_best"] / 1e9
        print(
            f"{size:>3}x{size:<3} {r['scipy'] * 1e3:>9.2f} {r['method']:>7} "
            f"{r['tensor'] * 1e3:>10.3f} {r['numpy'] * 1e3:>9.3f} "
            f"{r['scipy'] / r['tensor']:>8.1f}x {gflops:>8.1f} {gflops / peak:>7.0%} "
            f"{r['scipy_best'] / r['tensor_best']:>7.1f}x {best_gflops:>9.1f} {r['error']:>8.1e}"
        )


if __name__ == "__main__":
    main()
