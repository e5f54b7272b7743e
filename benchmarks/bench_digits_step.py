"""Time lecun83's training step on the bundled digits, as ``cnnkit train`` feeds it.

Random tensors are a poor stand-in for images when memory-bound kernels are compared:
the digits' 83x83 frames are mostly flat background. This benchmark times
``cnnkit.training.train_step`` on the first batches of the first epoch of the default
run (same order, shifts, clipping and optimizer), after ``cnnkit.tune_runtime()``.

Run from the repository root::

    python -m benchmarks.bench_digits_step                 # 30 steps, torch's threads
    python -m benchmarks.bench_digits_step --threads 1
    python -m benchmarks.bench_digits_step --flush-denormal

To compare two versions of the package, run it once per version with ``PYTHONPATH``
pointing at each checkout's ``src`` folder, alternating, several times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cnnkit
from cnnkit.data import load
from cnnkit.models import build, from_name
from cnnkit.training import TrainConfig
from cnnkit.training.config import make_optimizer
from cnnkit.training.loop import (
    epoch_order,
    epoch_shifts,
    max_shift_for,
    shift_images,
    train_step,
)
from cnnkit.training.rules import grad_clip_for

WARMUP = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps timed after 5 warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="treat denormal floats as zero (torch.set_flush_denormal), to see what they cost",
    )
    args = parser.parse_args()
    cnnkit.tune_runtime(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    config = TrainConfig()
    data = load("digits", (83, 83))
    torch.manual_seed(config.seed)
    spec = from_name("lecun83", classes=len(data.class_names))
    model = build(spec)
    clip = grad_clip_for(config, spec)
    optimizer = make_optimizer(model, config)
    n = len(data.train)
    order = epoch_order(n, config.seed, 0)
    shifts = epoch_shifts(n, max_shift_for((83, 83)), config.seed, 0)
    seconds = []
    for step in range(WARMUP + args.steps):
        index = order[(step * config.batch_size) % n :][: config.batch_size]
        images = shift_images(data.train.images[index], shifts[index])
        start = time.perf_counter()
        train_step(model, optimizer, images, data.train.labels[index], 0.01, clip)
        seconds.append(time.perf_counter() - start)
    timed = seconds[WARMUP:]
    median = statistics.median(timed)
    print(
        f"cnnkit {cnnkit.__file__}\n{torch.get_num_threads()} threads, batch "
        f"{config.batch_size}, {args.steps} steps: median {median * 1000:.1f} ms "
        f"(min {min(timed) * 1000:.1f}, max {max(timed) * 1000:.1f}), "
        f"{config.batch_size / median:.0f} images/s"
    )


if __name__ == "__main__":
    main()
