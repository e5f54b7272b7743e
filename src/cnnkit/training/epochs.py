"""The epochs of a run, from step 0 or a checkpoint to the end.

:func:`train` is the loop that :func:`~cnnkit.training.fitting.fit` and
:func:`~cnnkit.training.resuming.resume` share. Each epoch visits the training images
in the seeded order of :mod:`cnnkit.training.order` (shifted with ``augment="shift"``)
and takes one :func:`~cnnkit.training.step.train_step` per batch, at the rate of
:func:`~cnnkit.training.config.lr_at`; then it evaluates on the validation and test
images, appends a row to ``metrics.csv`` and saves ``best`` when validation improved.
``last`` (weights, optimizer state and the :class:`Position`) is saved at the end of
every epoch and, inside one, every ``checkpoint_every_s`` seconds of training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.data.splits import DataSplits
from cnnkit.kernels import tuning
from cnnkit.models.spec import ArchitectureSpec
from cnnkit.training.checkpoint import (
    Checkpoint,
    load_model_state,
    load_optimizer_state,
    optimizer_tensors,
    read_sidecar,
    save_checkpoint,
)
from cnnkit.training.config import TrainConfig, make_optimizer, run_schedule
from cnnkit.training.distributed import SINGLE, World
from cnnkit.training.evaluation import evaluate
from cnnkit.training.order import (
    RNG_NOTE,
    batch_share,
    epoch_order,
    epoch_shifts,
    max_shift_for,
    step_seed,
)
from cnnkit.training.progress import Progress
from cnnkit.training.rules import grad_clip_for
from cnnkit.training.run_folder import (
    RunFolder,
    read_methods,
    read_metrics,
    record_methods,
    utc_now,
    write_metrics,
)
from cnnkit.training.step import NonFiniteLossError, train_step


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``run`` is the run folder to continue with ``resume``."""

    def __init__(self, run: Path) -> None:
        super().__init__(str(run))
        self.run = run


@dataclass(frozen=True)
class Session:
    """What a run trains with; only process 0 of ``world`` writes into ``run``."""

    run: RunFolder
    model: nn.Module
    data: DataSplits
    config: TrainConfig
    device: torch.device
    report: Progress
    world: World = SINGLE


@dataclass
class Position:
    """Where training stands: what a checkpoint must record to continue exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed in epoch ``epoch`` (0-based)
    step: int = 0  # optimizer steps completed in the whole run
    loss_sum: float = 0.0  # this epoch so far: sum of batch-mean loss x batch size
    correct: int = 0
    seen: int = 0
    train_seconds: float = 0.0
    best: dict[str, Any] = field(default_factory=dict)  # epoch, val_accuracy, val_loss

    def record(self, loss: float, correct: int, images: int, seconds: float) -> None:
        """Count one finished step of ``images`` images."""
        self.batch += 1
        self.step += 1
        self.loss_sum += loss * images
        self.correct += correct
        self.seen += images
        self.train_seconds += seconds

    @property
    def speed(self) -> float:
        """Training images per second in this epoch so far."""
        return self.seen / self.train_seconds if self.train_seconds > 0 else 0.0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch, self.loss_sum, self.correct, self.seen, self.train_seconds = 0, 0.0, 0, 0, 0.0

    def to_meta(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch,
            "step": self.step,
            "epoch_so_far": {
                "loss_sum": self.loss_sum,
                "correct": self.correct,
                "seen": self.seen,
                "train_seconds": self.train_seconds,
            },
            "best": self.best,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], path: Path) -> Position:
        try:
            so_far = meta["epoch_so_far"]
            return cls(
                epoch=int(meta["epoch"]),
                batch=int(meta["batch_in_epoch"]),
                step=int(meta["step"]),
                loss_sum=float(so_far["loss_sum"]),
                correct=int(so_far["correct"]),
                seen=int(so_far["seen"]),
                train_seconds=float(so_far["train_seconds"]),
                best=dict(meta.get("best") or {}),
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"checkpoint {str(path)!r} lacks the position needed to resume "
                "(it is a weights-only checkpoint?)"
            ) from None


def train(session: Session, checkpoint: Checkpoint | None) -> Path:
    """Train from ``checkpoint`` (or step 0) to the end; return the run folder. Ctrl-C
    becomes :class:`TrainingInterrupted`, naming the run folder to resume.

    The implementation choices the run has recorded (``methods.json``) are taken again,
    so a resumed run computes exactly as the interrupted one did; each save of ``last``
    records the choices taken so far."""
    try:
        with tuning.pinned(read_methods(session.run)):
            return _train_epochs(session, checkpoint)
    except KeyboardInterrupt:
        session.report.close()
        raise TrainingInterrupted(session.run.path) from None


def _train_epochs(s: Session, checkpoint: Checkpoint | None) -> Path:
    config, data, world, report = s.config, s.data, s.world, s.report
    wall_start = time.monotonic()
    s.model.to(device=s.device, dtype=config.torch_dtype)
    replica = world.data_parallel(s.model)  # process 0's weights on every process
    optimizer = make_optimizer(s.model, config)
    clip = grad_clip_for(config, getattr(s.model, "spec", None))
    at = Position()
    if checkpoint is not None:
        load_model_state(s.model, checkpoint)
        load_optimizer_state(optimizer, checkpoint)
        at = Position.from_meta(checkpoint.meta, checkpoint.path)
    rows = read_metrics(s.run)
    n = len(data.train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    schedule = run_schedule(config, steps_per_epoch)
    max_shift = max_shift_for(data.input_hw) if config.augment == "shift" else 0
    if checkpoint is not None:
        report.note(
            f"resuming {s.run.path} at epoch {at.epoch + 1}, batch {at.batch} (step {at.step})"
        )
    else:
        report.note(_start_line(s, steps_per_epoch))
    last_save = time.monotonic()
    for epoch in range(at.epoch, config.epochs):
        order = epoch_order(n, config.seed, epoch)
        shifts = epoch_shifts(n, max_shift, config.seed, epoch) if max_shift else None
        report.start_epoch(epoch + 1, config.epochs, steps_per_epoch, at.batch)
        for batch in range(at.batch, steps_per_epoch):
            tick = time.monotonic()
            images, labels, size = batch_share(
                data.train, order, shifts, batch, config.batch_size, world
            )
            step_seed(config.seed, at.step)
            lr = schedule(at.step)
            try:
                loss, correct = train_step(
                    replica,
                    optimizer,
                    images.to(device=s.device, dtype=config.torch_dtype),
                    labels.to(s.device),
                    lr,
                    clip,
                    world=world,
                    batch_images=size,
                )
            except NonFiniteLossError as error:
                report.close()
                message = _blow_up_message(error, s.run, epoch, batch, at.step, lr)
                raise NonFiniteLossError(message) from None
            at.record(loss, correct, size, time.monotonic() - tick)
            report.step(size, at.loss_sum / at.seen, at.correct / at.seen, at.speed)
            due = config.checkpoint_every_steps and at.step % config.checkpoint_every_steps == 0
            late = time.monotonic() - last_save >= config.checkpoint_every_s
            if at.batch < steps_per_epoch and (due or late):
                _save_last(s, optimizer, at, schedule)
                last_save = time.monotonic()
        row = _end_epoch(s, at, schedule(at.step - 1), rows)
        report.end_epoch(row, config.epochs)
        at.next_epoch()
        _save_last(s, optimizer, at, schedule)
        last_save = time.monotonic()
    report.finish(s.run.path, rows, at.best, time.monotonic() - wall_start)
    return s.run.path


def _save_last(
    s: Session, optimizer: torch.optim.Optimizer, at: Position, schedule: Callable[[int], float]
) -> None:
    """Process 0 saves ``last``: weights, optimizer state and the position ``at``, and
    records the implementation choices taken so far."""
    if not s.world.is_main:
        return
    record_methods(s.run, tuning.used())
    meta = {
        **at.to_meta(),
        "kind": "last",
        "saved": utc_now(),
        "scalars": {"lr": schedule(max(at.step - 1, 0))},
        "rng": RNG_NOTE | {"seed": s.config.seed},
    }
    save_checkpoint(
        s.run.checkpoint("last"), s.model.state_dict(), meta, optimizer_tensors(optimizer)
    )


def _start_line(s: Session, steps: int) -> str:
    model, data = s.model, s.data
    spec = getattr(model, "spec", None)
    name = spec.name if isinstance(spec, ArchitectureSpec) else type(model).__name__
    trained = [(k, p.numel()) for k, p in model.named_parameters() if p.requires_grad]
    biases = sum(n for k, n in trained if k.endswith("bias"))
    weights = sum(n for _, n in trained) - biases
    sizes = f"{len(data.train)} train / {len(data.val)} val"
    if data.test is not None:
        sizes += f" / {len(data.test)} test"
    threads = torch.get_num_threads()
    device = s.device
    where = (
        f"{device}, {threads} thread{'s' * (threads != 1)}" if device.type == "cpu" else str(device)
    )
    if s.world.active:
        where += f", {s.world.size} processes ({s.world.backend})"
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        where += f", {str(dtype).removeprefix('torch.')}"
    return (
        f"training {name} ({weights:,} weights and {biases:,} biases) on {data.source}: "
        f"{sizes} images, {steps} steps per epoch, {where} -> {s.run.path}"
    )


def _end_epoch(s: Session, at: Position, lr: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluate, append the metrics row, and save ``best`` if validation improved.

    Every process evaluates the whole sets (identical weights, identical results), so
    all agree on ``best``; only process 0 writes."""
    eval_start = time.monotonic()
    size = s.config.eval_batch_size
    val = evaluate(s.model, s.data.val, batch_size=size, device=s.device)
    test = None
    if s.data.test is not None:
        test = evaluate(s.model, s.data.test, batch_size=size, device=s.device)
    epoch = at.epoch + 1
    row = {
        "epoch": epoch,
        "train_loss": at.loss_sum / at.seen,
        "train_accuracy": at.correct / at.seen,
        "val_loss": val.loss,
        "val_accuracy": val.accuracy,
        "test_loss": None if test is None else test.loss,
        "test_accuracy": None if test is None else test.accuracy,
        "lr": lr,
        "images_per_s": at.speed,
        "seconds": at.train_seconds + time.monotonic() - eval_start,
    }
    rows.append(row)
    if s.world.is_main:
        write_metrics(s.run, rows)
    best = at.best
    better = not best or (val.accuracy, -val.loss) > (best["val_accuracy"], -best["val_loss"])
    if better:
        at.best = {"epoch": epoch, "val_accuracy": val.accuracy, "val_loss": val.loss}
        meta = {
            "epoch": epoch,
            "step": at.step,
            "kind": "best",
            "saved": utc_now(),
            "scalars": {k: v for k, v in row.items() if k != "epoch"},
        }
        if s.world.is_main:
            save_checkpoint(s.run.checkpoint("best"), s.model.state_dict(), meta)
    return row


def _blow_up_message(
    error: Exception, run: RunFolder, epoch: int, batch: int, step: int, lr: float
) -> str:
    last = run.checkpoint("last")
    try:
        saved = read_sidecar(last)
        done, batches = saved.get("epoch"), saved.get("batch_in_epoch")
        where = f"end of epoch {done}" if not batches else f"epoch {done + 1}, batch {batches}"
        kept = f"the last good checkpoint {last} ({where}) is kept"
    except (OSError, ValueError):
        kept = "no checkpoint had been saved yet"
    return (
        f"training stopped: {error} at epoch {epoch + 1}, step {step + 1} (batch "
        f"{batch + 1}); the learning rate ({lr:.4g} at that step) is probably too high: "
        f"try a lower --lr; {kept}"
    )
