"""Cost of training by averaging (the lecture's Section 3) against weight sharing.

Run from the repository root::

    python -m benchmarks.bench_tying                  # lecun83, batch 64
    python -m benchmarks.bench_tying --batch 16 --repeats 5
    python -m benchmarks.bench_tying --threads 1

Three timings, interleaved round after round so a neighbour's load hits them alike,
reported as medians:

- ``shared``: one SGD (momentum 0.9) step of ``lecun83`` as built, each kernel stored once;
- ``averaged``: the same step with every filter bank replaced by its untied
  ``LocallyConnected2d`` (a kernel per position) and :func:`cnnkit.tying.project_` run by
  the optimizer's step post-hook;
- ``projection``: :func:`cnnkit.tying.project_` alone on those tie groups.

The synthetic input is random 83x83 images with random labels: the cost does not depend
on the values. The target is ``projection / averaged < 10%``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cnnkit import tying
from cnnkit.models.build import build
from cnnkit.models.presets import from_name
from cnnkit.nn.locally_connected import untie_filter_banks
from cnnkit.runtime import tune_runtime


def training_step(model, optimizer, x, y) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def median_seconds(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up: allocations, thread pools, momentum buffers
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scale-gradients", action="store_true")
    args = parser.parse_args()
    tune_runtime()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shared = build(from_name("lecun83"))
    x = torch.randn(args.batch, 1, 83, 83)
    y = torch.randint(0, 101, (args.batch,))
    averaged = copy.deepcopy(shared)
    layers = untie_filter_banks(averaged, x[:1])
    groups = tying.convolution_groups(*layers)

    shared_opt = torch.optim.SGD(shared.parameters(), lr=0.01, momentum=0.9)
    averaged_opt = torch.optim.SGD(averaged.parameters(), lr=0.01, momentum=0.9)
    tying.tie_after_step(averaged_opt, groups, scale_gradients=args.scale_gradients)

    fns = {
        "shared": training_step(shared, shared_opt, x, y),
        "averaged": training_step(averaged, averaged_opt, x, y),
        "projection": lambda: tying.project_(groups),
    }
    result = median_seconds(fns, args.repeats)

    print(
        f"lecun83, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} ({torch.__version__})"
    )
    print(f"  tie groups: {groups.stored:,} stored entries, {groups.free:,} free values")
    for name, seconds in result.items():
        print(f"  {name:<11s} {seconds * 1e3:9.1f} ms")
    print(f"  averaged / shared step:      {result['averaged'] / result['shared']:6.2f}x")
    print(f"  projection / averaged step:  {result['projection'] / result['averaged']:6.1%}")


if __name__ == "__main__":
    main()
