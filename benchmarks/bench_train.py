"""Benchmark: ``cnnkit train`` with its defaults (lecun83 on the bundled digits).

Runs the command as a user would, in a fresh process, then reads the run folder and
reports the test accuracy after the last epoch and at the best checkpoint (best
validation accuracy), the wall time of the whole command and the training speed in
images per second. Target on a 2-core CPU: >= 98.5% test accuracy
within 10 minutes.

Run from the repository root::

    python -m benchmarks.bench_train                      # the defaults
    python -m benchmarks.bench_train -- --epochs 1        # any train options after --

The run folder goes under ``benchmarks/results/`` (not versioned); a JSON summary is
written next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from cnnkit.training.checkpoint import read_sidecar
from cnnkit.training.run_folder import RunFolder, read_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results", help="where runs go")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train options")
    args = parser.parse_args(argv)
    extra = [a for a in args.train_args if a != "--"]

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.results) / f"train-{stamp}"
    command = [sys.executable, "-m", "cnnkit", "train", "--out", str(run_dir), *extra]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start

    run = RunFolder(run_dir)
    rows = read_metrics(run)
    best = read_sidecar(run.checkpoint("best"))
    best_row = rows[best["epoch"] - 1]
    train_seconds = sum(r["seconds"] for r in rows)
    images_per_s = [r["images_per_s"] for r in rows]
    summary = {
        "command": command[1:],
        "epochs": len(rows),
        "best_epoch": best["epoch"],
        "test_accuracy": best_row["test_accuracy"],
        "val_accuracy": best_row["val_accuracy"],
        "last_test_accuracy": rows[-1]["test_accuracy"],
        "wall_seconds": wall,
        "epoch_seconds": train_seconds / len(rows),
        "images_per_s_median": sorted(images_per_s)[len(images_per_s) // 2],
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    (run_dir.parent / f"train-{stamp}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"test accuracy {_percent(summary['last_test_accuracy'])} after the last epoch, "
        f"{_percent(summary['test_accuracy'])} at the best checkpoint (epoch {best['epoch']} "
        f"of {len(rows)}); wall time {wall / 60:.1f} min, {summary['epoch_seconds']:.1f} s "
        f"per epoch, {summary['images_per_s_median']:.0f} img/s (median over epochs)"
    )
    return 0


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


if __name__ == "__main__":
    raise SystemExit(main())
