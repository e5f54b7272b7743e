"""Exact resume: a run killed with SIGKILL mid-epoch and resumed equals an uninterrupted one."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnkit.cli import main
from cnnkit.training import TrainConfig, read_checkpoint, resume

from .conftest import train_tiny

EPOCHS = 4  # 128 training images in batches of 8: 16 steps per epoch, 64 in all
TWO_EPOCHS = TrainConfig(epochs=2, batch_size=16, threads=1, device="cpu")


def train_command(tiny_files: dict[str, Path], out: Path) -> list[str]:
    return [
        sys.executable, "-m", "cnnkit", "train",
        "--spec", str(tiny_files["spec"]),
        "--data", str(tiny_files["data"]),
        "--epochs", str(EPOCHS),
        "--batch-size", "8",
        "--threads", "1",
        "--device", "cpu",
        "--out", str(out),
        "--progress", "none",
        "--checkpoint-every-steps", "1",
    ]  # fmt: skip


def comparable_metrics(run: Path) -> list[dict[str, str]]:
    """metrics.csv without the columns that measure time."""
    with (run / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in rows]


def assert_same_checkpoints(a: Path, b: Path) -> None:
    for name in ("last.safetensors", "best.safetensors"):
        first, second = read_checkpoint(a / name), read_checkpoint(b / name)
        assert first.model.keys() == second.model.keys()
        for key in first.model:
            assert torch.equal(first.model[key], second.model[key]), f"{name}: {key}"
        assert first.optimizer.keys() == second.optimizer.keys()
        for key in first.optimizer:
            assert torch.equal(first.optimizer[key], second.optimizer[key]), f"{name}: {key}"
    assert comparable_metrics(a) == comparable_metrics(b)


def kill_mid_epoch(process: subprocess.Popen, run: Path, after_step: int) -> dict:
    """Freeze the training process once its last checkpoint is past ``after_step`` and
    inside an epoch, then SIGKILL it; return that checkpoint's meta data."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("the training process ended before it could be killed")
        try:
            seen = json.loads((run / "last.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            seen = {}
        if seen.get("step", 0) >= after_step and seen.get("batch_in_epoch", 0) > 0:
            os.kill(process.pid, signal.SIGSTOP)
            meta = read_checkpoint(run / "last.safetensors").meta  # what a resume will see
            if meta["batch_in_epoch"] > 0:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return meta
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.001)
    process.kill()
    pytest.fail("no mid-epoch checkpoint appeared")


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(
    tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(train_command(tiny_files, whole)[3:]) == 0  # in this process: same code

    process = subprocess.Popen(
        train_command(tiny_files, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    meta = kill_mid_epoch(process, killed, after_step=20)
    assert process.returncode == -signal.SIGKILL
    assert 0 < meta["batch_in_epoch"] and meta["epoch"] < EPOCHS

    resumed = subprocess.run(
        [sys.executable, "-m", "cnnkit", "train", "--resume", str(killed), "--progress", "lines"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {killed} at epoch {meta['epoch'] + 1}" in resumed.stdout
    assert not list(killed.glob(".*.tmp"))  # leftovers of the killed write are gone
    assert_same_checkpoints(whole, killed)


def test_resume_without_a_checkpoint_starts_from_step_zero(
    tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    whole = train_tiny(tiny_files, TWO_EPOCHS, tmp_path / "whole")
    shutil.copytree(whole, tmp_path / "fresh")
    fresh = tmp_path / "fresh"
    for name in ("last.safetensors", "last.json", "best.safetensors", "best.json"):
        (fresh / name).unlink()
    (fresh / ".last.safetensors.x1y2.tmp").write_bytes(b"half")  # an interrupted write
    assert resume(fresh) == fresh
    assert not (fresh / ".last.safetensors.x1y2.tmp").exists()
    assert_same_checkpoints(whole, fresh)


def test_resume_cuts_metrics_back_to_the_checkpoint(
    tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    run = train_tiny(tiny_files, TWO_EPOCHS, tmp_path / "run")
    # a row written for an epoch whose checkpoint never made it to disk
    with (run / "metrics.csv").open("a") as handle:
        handle.write("3,1,0,1,0,1,0,0.1,1,1\n")
    (run / "last.json").write_text("{}")  # stale sidecar: the checkpoint itself counts
    assert resume(run) == run
    assert [r["epoch"] for r in comparable_metrics(run)] == ["1", "2"]
    assert json.loads((run / "last.json").read_text())["epoch"] == 2
