"""Benchmark: training speed with 1 and with N processes on this machine.

Runs ``cnnkit train --nproc P`` (P = 1, then each count given) as a user would, each
in a fresh process group, with the machine's CPUs split evenly among the processes
(``--threads`` = CPUs // P), and reads the run folder back; one process on one thread
is measured too, to separate what threading gives from what processes give. Reported
per setup: the training speed (images/s over the training steps of the last epoch, measured by
process 0, whose steps each cover a whole global batch), the wall time of the command
(start-up, data loading, evaluation included) and the speed-up over one process. The
runs are interleaved (1, P, 1, P, ...) and the median of ``--repeats`` is kept, because
timings on a shared machine are noisy.

Run from the repository root::

    python -m benchmarks.bench_distributed                       # digits28, 1 vs 2
    python -m benchmarks.bench_distributed --preset lecun83 --batch-size 32 --nproc 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnnkit.training.distributed import threads_per_process
from cnnkit.training.run_folder import RunFolder, read_metrics


def one_run(
    preset: str, nproc: int, threads: int, batch: int, epochs: int, folder: Path
) -> dict[str, float]:
    out = folder / f"p{nproc}-{time.monotonic_ns()}"
    command = [
        sys.executable, "-m", "cnnkit", "train", "--nproc", str(nproc),
        "--preset", preset, "--epochs", str(epochs), "--batch-size", str(batch),
        "--threads", str(threads), "--device", "cpu", "--progress", "none", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - start
    rows = read_metrics(RunFolder(out))
    return {"images_per_s": float(rows[-1]["images_per_s"]), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits28")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cpus = threads_per_process(1)
    # (processes, threads each); one process on one thread shows what threading gives
    setups = [(1, cpus), *([(1, 1)] if cpus > 1 else [])]
    setups += [(n, threads_per_process(n)) for n in args.nproc if n != 1]
    measured: dict[tuple[int, int], list[dict[str, float]]] = {s: [] for s in setups}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for n, threads in setups:
                measured[(n, threads)].append(
                    one_run(args.preset, n, threads, args.batch_size, args.epochs, Path(folder))
                )
    summary = {}
    base = statistics.median(r["images_per_s"] for r in measured[setups[0]])
    print(f"{args.preset}, batch {args.batch_size}, {args.epochs} epoch(s), {cpus} CPUs")
    print(f"{'processes':>9} {'threads':>7} {'images/s':>9} {'speed-up':>8} {'wall s':>7}")
    for n, threads in setups:
        speed = statistics.median(r["images_per_s"] for r in measured[(n, threads)])
        wall = statistics.median(r["wall_s"] for r in measured[(n, threads)])
        summary[f"{n}x{threads}"] = {
            "images_per_s": speed,
            "wall_s": wall,
            "speed_up": speed / base,
        }
        print(f"{n:>9} {threads:>7} {speed:>9.0f} {speed / base:>8.2f} {wall:>7.1f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
