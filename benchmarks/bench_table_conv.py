"""Forward+backward time of the connection-table filter bank, method against method.

Run from the repository root::

    python -m benchmarks.bench_table_conv            # the lecture's shapes, batch 64
    python -m benchmarks.bench_table_conv --quick    # fewer repeats
    python -m benchmarks.bench_table_conv --threads 1 --clock process   # steadier
    python -m benchmarks.bench_table_conv --slow     # also the rejected design

Each case times every variant in turn, round after round (interleaved, so a neighbour's
load hits all of them alike), and reports the median and the ratio to the dense
convolution with scattered weights (> 1 means faster than dense). Besides the library's
methods, a rejected design is timed for the record: a gather of each row's input map
followed by a grouped convolution (``groups=C_out``). The Fourier
method is not timed on the first layer's 83x83 maps, where its inverse transform alone
would cost far more than the convolution (``"auto"`` never picks it there).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cnnkit import tables
from cnnkit.ops.table_conv import table_conv2d


def gather_grouped(x, table, weight, bias, c_out):
    """Rejected: gather the K input maps each row reads, then one grouped convolution."""
    order = torch.argsort(table[:, 1], stable=True)
    fan = table.shape[0] // c_out  # needs a uniform fan-in
    xs = x.index_select(1, table[order, 0])  # (N, K, H, W)
    w = weight[order].view(c_out, fan, *weight.shape[1:])  # (C_out, fan, kh, kw)
    return F.conv2d(xs, w, bias, groups=c_out)


def case(name, n, table, size, kernel, stride=1, fourier=True):
    c_in, c_out = tables.n_inputs(table), tables.n_outputs(table)
    x = torch.randn(n, c_in, size, size, requires_grad=True)
    weight = (torch.randn(len(table), kernel, kernel) * 0.05).requires_grad_()
    bias = torch.zeros(c_out, requires_grad=True)
    return name, x, table, weight, bias, stride, fourier


def variants(x, table, weight, bias, stride, fourier, extra) -> dict[str, Callable]:
    c_out = bias.shape[0]
    methods = ("dense", "fourier", "unfold", "auto") if fourier else ("dense", "auto")
    out = {m: (lambda m=m: table_conv2d(x, table, weight, bias, stride, method=m)) for m in methods}
    if tables.describe(table) == "one-to-one":
        out["depthwise"] = lambda: table_conv2d(x, table, weight, bias, stride, method="depthwise")
    if tables.describe(table) == "full":
        w = weight.view(c_out, -1, *weight.shape[1:])  # full() rows are output-major
        out["F.conv2d"] = lambda: F.conv2d(x, w, bias, stride)
    if extra:
        out["gather+grouped"] = lambda: gather_grouped(x, table, weight, bias, c_out)
    return out


def run(fns: dict[str, Callable], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    grads = {}
    for name, fn in fns.items():  # warm up, and fix one upstream gradient per variant
        y = fn()
        grads[name] = torch.randn_like(y)
        y.backward(grads[name])
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn().backward(grads[name])
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 9")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--slow", action="store_true", help="also time the rejected design")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine with "
        "--threads 1; with more threads it also counts threads spinning at barriers)",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 3 if args.quick else 9
    layer3 = tables.random(64, 256, 16)
    cases = [
        case("layer 3: 64->256 fan-in 16, 14x14 -> 6x6, 9x9, batch 64", 64, layer3, 14, 9),
        case("layer 3, batch 1", 1, layer3, 14, 9),
        case("layer 3, batch 8", 8, layer3, 14, 9),
        case("layer 3, batch 16", 16, layer3, 14, 9),
        case(
            "layer 1: full 1->64, 83x83 -> 75x75, 9x9, batch 64",
            64,
            tables.full(1, 64),
            83,
            9,
            fourier=False,
        ),
        case("full 64->256, 14x14 -> 6x6, 9x9, batch 64", 64, tables.full(64, 256), 14, 9),
        case("LeNet-5 C3: 6->16, 14x14 -> 10x10, 5x5, batch 64", 64, tables.lenet5_c3(), 14, 5),
        case("one-to-one 64, 14x14 -> 6x6, 9x9, batch 64", 64, tables.one_to_one(64), 14, 9),
        case("64->256 fan-in 16, 32x32 -> 24x24, 9x9, batch 16", 16, layer3, 32, 9),
        case("64->256 fan-in 16, 14x14 -> 6x6, 5x5 stride 2, batch 64", 64, layer3, 14, 5, 2),
    ]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {repeats} repeats, {args.clock} clock")
    for index, (name, x, table, weight, bias, stride, fourier) in enumerate(cases):
        extra = args.slow and index == 0
        medians = run(variants(x, table, weight, bias, stride, fourier, extra), repeats, clock)
        print(f"\n{name}")
        for variant, seconds in medians.items():
            ratio = medians["dense"] / seconds
            print(f"  {variant:16s} {1000 * seconds:9.2f} ms   {ratio:5.2f}x dense")


if __name__ == "__main__":
    main()
