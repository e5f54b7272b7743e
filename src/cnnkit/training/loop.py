"""The training loop: ``fit`` a model to data, ``resume`` a run, ``evaluate`` a model.

A run is: set up (model, optimizer, run folder) -> for each epoch, ``train_step`` over the
batches, then evaluate on validation and test -> save checkpoints and one metrics row.

Reproducibility. Everything random in training is a function of the run's ``seed`` and a
position, never of a generator that carries state from step to step:

- the order of the training images in epoch ``e`` is ``torch.randperm`` drawn from a
  generator seeded with a hash of ``(seed, "order", e)``;
- the shift of image ``i`` in epoch ``e`` (``augment="shift"``) is drawn for all images
  at once from a generator seeded with a hash of ``(seed, "shift", e)``, then indexed by
  ``i``;
- before step ``s``, torch's global generator is seeded with a hash of ``(seed, "step",
  s)``, for any layer that draws random numbers (dropout).

So a checkpoint needs no generator state: the epoch and the number of batches done in it
say where to continue, and a run killed at any point (even by SIGKILL) and resumed ends,
on CPU, with weights bitwise equal to those of a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnnkit._files import FolderLock
from cnnkit._validation import check_positive_int
from cnnkit.data.images import InputTransform
from cnnkit.data.splits import DataSplits, ImageSet
from cnnkit.models import ArchitectureSpec, build
from cnnkit.training.checkpoint import (
    Checkpoint,
    load_model_state,
    load_optimizer_state,
    optimizer_tensors,
    read_checkpoint,
    read_sidecar,
    save_checkpoint,
)
from cnnkit.training.config import TrainConfig, lr_at, make_optimizer, warmup_steps
from cnnkit.training.distributed import (
    SINGLE,
    DistributedError,
    World,
    process_group,
    threads_per_process,
)
from cnnkit.training.init_from import initialise_from_run
from cnnkit.training.progress import Progress
from cnnkit.training.run_folder import (
    CONFIG_FORMAT,
    RunFolder,
    clean_leftovers,
    open_run,
    prepare_new_run,
    read_config,
    read_metrics,
    read_run_spec,
    spec_digest,
    versions,
    write_classes,
    write_json,
    write_metrics,
)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``run`` is the run folder to continue with ``resume``."""

    def __init__(self, run: Path) -> None:
        super().__init__(str(run))
        self.run = run


# what ``resume`` may change about a run; every other option is the run's own
RESUME_OVERRIDES = ("device", "threads", "epochs")


# --------------------------------------------------------------------------------------
# Data order and augmentation: functions of (seed, epoch, sample index) only
# --------------------------------------------------------------------------------------


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit generator seed from ``seed`` and a tag such as ``("order", epoch)``."""
    text = "/".join(str(p) for p in ("cnnkit", seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _generator(seed: int, *parts: object) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derived_seed(seed, *parts))
    return generator


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order ``(n,)`` in which epoch ``epoch`` (0-based) visits the training images."""
    return torch.randperm(n, generator=_generator(seed, "order", epoch))


def epoch_shifts(n: int, max_shift: int, seed: int, epoch: int) -> torch.Tensor:
    """Shifts ``(n, 2)`` (rows, columns) in ``[-max_shift, max_shift]`` for epoch ``epoch``."""
    generator = _generator(seed, "shift", epoch)
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)


def max_shift_for(input_hw: tuple[int, int]) -> int:
    """Largest shift used by ``augment="shift"``: 1/14 of the shorter side, rounded
    (2 pixels for a 28×28 or 32×32 input, 6 for 83×83)."""
    return round(min(input_hw) / 14)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Move each image ``(N, C, H, W)`` by its ``(dy, dx)`` in ``shifts`` ``(N, 2)``.

    ``out[n, c, y, x] = images[n, c, clamp(y - dy), clamp(x - dx)]``: the content moves by
    ``(dy, dx)`` and the border rows and columns are repeated into the space it leaves.
    """
    n, _, h, w = images.shape
    shifts = shifts.to(images.device)
    rows = (torch.arange(h, device=images.device) - shifts[:, :1]).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=images.device) - shifts[:, 1:]).clamp(0, w - 1)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]  # (N, 1, 1)
    moved = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return moved.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


# --------------------------------------------------------------------------------------
# One step, and evaluation
# --------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    clip: float | None = None,
    *,
    world: World | None = None,
    batch_images: int | None = None,
) -> tuple[float, int]:
    """One gradient step on a batch; returns ``(mean loss, number correct)``.

    The loss is the mean cross-entropy of the logits. With ``clip``, the gradient of all
    parameters together is scaled down to a Euclidean norm of at most ``clip`` before the
    step. If the loss or the gradient's norm is NaN or infinite, the step is not taken
    and :class:`NonFiniteLossError` is raised (the caller adds where).

    With a ``world`` of several processes, ``images`` ``(n, C, H, W)`` is this process's
    share of a global batch of ``batch_images`` images (default ``n`` times the number of
    processes; ``n`` may be 0): the cross-entropy summed over the share and divided by
    ``batch_images`` is differentiated, the gradients are summed over the processes, so
    every process steps with the gradient of the whole batch's mean loss; the returned
    loss and count are the whole batch's. ``model`` should then be the wrapper from
    :meth:`World.data_parallel`, which sums the gradients during the backward pass.
    """
    if world is not None and world.active:
        return _shared_step(model, optimizer, images, labels, lr, clip, world, batch_images)
    model.train()
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the loss is {value}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _clip_and_step(model, optimizer, clip)
    correct = int((logits.detach().argmax(dim=1) == labels).sum())
    return value, correct


def _shared_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    clip: float | None,
    world: World,
    batch_images: int | None,
) -> tuple[float, int]:
    """:func:`train_step` for one process's share of a batch (see there). ``model`` is
    :meth:`World.data_parallel`'s wrapper, or a plain module (then the gradients are
    summed by one all-reduce after the backward pass)."""
    wrapped = isinstance(model, DistributedDataParallel)
    module = model.module if wrapped else model
    module.train()
    total = len(labels) * world.size if batch_images is None else batch_images
    # the wrapper needs every process to run the model; a share is empty only when the
    # batch holds fewer images than there are processes
    synced = wrapped and total >= world.size
    device = next(module.parameters()).device
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, correct)
    # Unsynchronized, the model runs unwrapped: the wrapper's forward may communicate
    # (it rebuilds its buckets after the first step), which a process without images
    # would not match.
    with model.no_sync() if wrapped and not synced else contextlib.nullcontext():
        loss_sum = None
        if len(labels):
            logits = (model if synced else module)(images)
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
            stats[0] = loss_sum.detach().double()
            stats[1] = (logits.detach().argmax(dim=1) == labels).sum()
        world.all_reduce_sum(stats, "summing the batch's loss")
        value = float(stats[0]) / total
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the loss is {value}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if loss_sum is not None:
            with world.collective("summing the gradients"):
                (loss_sum / total).backward()
    if not synced:
        world.all_reduce_gradients(module.parameters(), "summing the gradients")
    _clip_and_step(module, optimizer, clip)
    return value, int(stats[1])


def _clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, clip: float | None) -> None:
    """Clip the gradient's norm (a non-finite norm stops training), step, re-tie weights."""
    if clip is not None:
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"the gradient's norm is {norm}")
    optimizer.step()
    _after_step(model)


def _after_step(model: nn.Module) -> None:
    """Re-impose tied weights after the optimizer moved them, if the model has ties."""
    project = getattr(model, "project_ties", None)
    if callable(project):
        with torch.no_grad():
            project()


@dataclass(frozen=True)
class Evaluation:
    """Loss, accuracy and confusion matrix of a model on a set of images.

    ``confusion[t][p]`` counts images of true class ``t`` predicted as class ``p``.
    """

    loss: float
    confusion: list[list[int]]
    class_names: list[str]

    @property
    def images(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def correct(self) -> int:
        return sum(self.confusion[c][c] for c in range(len(self.confusion)))

    @property
    def accuracy(self) -> float:
        """Fraction of images classified correctly, in [0, 1]."""
        return self.correct / self.images if self.images else float("nan")

    @property
    def per_class(self) -> dict[str, float | None]:
        """Accuracy of each class (recall); ``None`` for a class with no images."""
        out: dict[str, float | None] = {}
        for c, name in enumerate(self.class_names):
            total = sum(self.confusion[c])
            out[name] = self.confusion[c][c] / total if total else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "per_class": self.per_class,
            "class_names": list(self.class_names),
            "confusion": self.confusion,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> Evaluation:
    """Mean cross-entropy, accuracy and confusion matrix of ``model`` on ``data``.

    The model is put in eval mode. ``device`` defaults to where the model's parameters
    are; the images are converted to the parameters' dtype.
    """
    # no_grad rather than inference_mode: a layer may cache a tensor made here (a transform
    # basis, say) that a later training step must save for backward, which an inference
    # tensor cannot be.
    parameter = next(model.parameters())
    device = parameter.device if device is None else device
    model.eval()
    classes = len(data.class_names)
    confusion = torch.zeros(classes * classes, dtype=torch.int64)
    loss_sum = 0.0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(device, parameter.dtype)
        labels = data.labels[start : start + batch_size].to(device)
        logits = model(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(labels * classes + predicted, minlength=classes**2).cpu()
    matrix = confusion.reshape(classes, classes).tolist()  # (true, predicted)
    loss = loss_sum / len(data) if len(data) else float("nan")
    return Evaluation(loss=loss, confusion=matrix, class_names=list(data.class_names))


# --------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but this torch build sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', got {name!r}")
    return torch.device(name)


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads inside the block (unchanged when ``None``)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model_and_spec(
    model_or_spec: nn.Module | ArchitectureSpec, data: DataSplits, seed: int
) -> tuple[nn.Module, ArchitectureSpec | None]:
    """Build a spec (classifier resized to the data's classes, weights seeded by ``seed``),
    or take a module as it is."""
    if isinstance(model_or_spec, ArchitectureSpec):
        spec = model_or_spec
        if spec.classifier.classes != data.num_classes:
            spec = spec.with_classes(data.num_classes)
        torch.manual_seed(seed)
        return build(spec), spec
    if isinstance(model_or_spec, nn.Module):
        spec = getattr(model_or_spec, "spec", None)
        return model_or_spec, spec if isinstance(spec, ArchitectureSpec) else None
    raise TypeError(
        "model_or_spec must be an ArchitectureSpec or a torch.nn.Module, "
        f"got {type(model_or_spec).__name__}"
    )


def _check_fits(spec: ArchitectureSpec | None, data: DataSplits) -> None:
    if spec is None:
        return
    maps, height, width = spec.input.maps, spec.input.height, spec.input.width
    if tuple(data.train.images.shape[1:]) != (maps, height, width):
        raise ValueError(
            f"the network {spec.name!r} reads {maps}×{height}×{width} inputs, but the data's "
            f"images are {'×'.join(map(str, data.train.images.shape[1:]))}; load the data "
            f"with input_hw=({height}, {width})"
        )
    if spec.classifier.classes != data.num_classes:
        raise ValueError(
            f"the network {spec.name!r} has {spec.classifier.classes} outputs, but the data "
            f"has {data.num_classes} classes"
        )


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------
# fit and resume
# --------------------------------------------------------------------------------------


def fit(
    model_or_spec: nn.Module | ArchitectureSpec,
    data: DataSplits,
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    progress: str = "none",
    invocation: Mapping[str, Any] | None = None,
    init_from: str | Path | None = None,
    init_checkpoint: str = "best",
) -> Path:
    """Train a network on ``data`` and return its run folder.

    ``model_or_spec`` is an :class:`~cnnkit.models.ArchitectureSpec` (built with weights
    drawn after ``torch.manual_seed(config.seed)``; its classifier is resized to the
    data's classes) or a module taking ``(N, maps, H, W)`` to ``(N, classes)`` logits (a
    module without a ``spec`` attribute gets no ``spec.toml``; pass it again to
    :func:`resume` and :func:`~cnnkit.training.load_run`). ``out`` is the run folder
    (created; must not hold a run), by default the next numbered folder under ``runs/``.
    ``progress`` is ``"none"``, ``"lines"`` (one line per epoch), ``"bar"`` (tqdm) or
    ``"auto"`` (bar on a terminal). ``invocation`` is stored in ``config.json`` as is
    (the command line's options). ``init_from`` is another run folder whose
    ``init_checkpoint`` (``"best"`` or ``"last"``) gives the starting weights instead of
    the seeded ones: same architecture, checked; if the number of classes differs, the
    classifier's output layer keeps its seeded weights (see
    :mod:`cnnkit.training.init_from`).

    Only one process at a time may write into a run folder: a second gets a
    :class:`~cnnkit._files.FolderInUseError` naming the first's PID.

    Raises :class:`NonFiniteLossError` if the loss becomes NaN or infinite; the
    checkpoints saved before stay on disk.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), every process calls
    ``fit`` with the same arguments: see :mod:`cnnkit.training.distributed`. The batch
    size must then be a multiple of the number of processes; only process 0 writes the
    run folder and reports progress; all return the run folder's path.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(data, DataSplits):
        raise TypeError(f"data must be a cnnkit.data DataSplits, got {type(data).__name__}")
    device = resolve_device(config.device)
    model, spec = _model_and_spec(model_or_spec, data, config.seed)
    _check_fits(spec, data)
    start = None
    if init_from is not None:
        start = initialise_from_run(model, spec, init_from, init_checkpoint)
    with process_group(device.type) as world, contextlib.ExitStack() as held:
        world.check_batch(config.batch_size)
        _check_same_data(world, data)
        if out is not None and world.is_main:
            held.enter_context(FolderLock(out, create=True))
        init_record = None if start is None else start[0]
        path = _on_main_first(
            world,
            "creating the run folder",
            lambda: _new_run(out, model, spec, data, config, invocation, init_record),
        )
        if out is None and world.is_main:
            held.enter_context(FolderLock(path))
        report = Progress(progress if world.is_main else "none")
        if start is not None:
            report.note(start[1])
        with _threads(_threads_for(config, world)):
            return _train(
                RunFolder(path), model, data, config, world.device(device), None, report, world
            )


def _new_run(
    out: str | Path | None,
    model: nn.Module,
    spec: ArchitectureSpec | None,
    data: DataSplits,
    config: TrainConfig,
    invocation: Mapping[str, Any] | None,
    init_from: Mapping[str, Any] | None = None,
) -> str:
    """Create and fill a new run folder (before the first step); return its path."""
    run = prepare_new_run(out)
    clean_leftovers(run)
    if spec is not None:
        spec.save(str(run.spec))
    digest = spec_digest(run.spec.read_text(encoding="utf-8")) if spec is not None else None
    write_classes(run, data.class_names)
    transform = InputTransform(data.input_hw)
    write_json(
        run.config,
        {
            "format": CONFIG_FORMAT,
            "created": _utc_now(),
            "model": {
                "name": spec.name if spec is not None else type(model).__name__,
                "spec": run.spec.name if spec is not None else None,
                "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "spec_sha256": digest,
            },
            "data": {**data.to_config(), "transform": transform.to_dict()},
            "training": config.to_dict(),
            "init_from": None if init_from is None else dict(init_from),
            "invocation": dict(invocation or {}),
            "versions": versions(),
        },
    )
    write_metrics(run, [])
    return str(run.path)


def _check_same_data(world: World, data: DataSplits) -> None:
    """Require every process to hold the data process 0 holds (same digest)."""
    main = world.broadcast_object(data.digest, "comparing the data's digests")
    if main != data.digest:
        raise ValueError(
            f"process {world.rank} loaded other data than process 0 (digest "
            f"{data.digest[:12]}…, process 0: {str(main)[:12]}…); every machine must see "
            "the same images at the same path"
        )


def _threads_for(config: TrainConfig, world: World) -> int | None:
    """``config.threads``; unset with several processes: the CPUs shared among this
    machine's processes."""
    if config.threads is None and world.active:
        return threads_per_process(world.local_size)
    return config.threads


def _on_main_first(world: World, what: str, action: Any) -> str:
    """Run ``action`` (returning a string) on process 0 only and give every process its
    result; if it raises, process 0 raises that error and the others a
    :class:`DistributedError` quoting it."""
    if not world.active:
        return action()
    result, failure = None, None
    if world.is_main:
        try:
            result = action()
        except Exception as error:
            failure = error
    text = None if failure is None else f"{type(failure).__name__}: {failure}"
    result, text = world.broadcast_object((result, text), what)
    if failure is not None:
        raise failure
    if text is not None:
        raise DistributedError(f"process {world.rank}: process 0 failed {what}: {text}")
    return result


def resume(
    run_dir: str | Path,
    *,
    data: DataSplits | None = None,
    model: nn.Module | None = None,
    progress: str = "none",
    device: str | None = None,
    threads: int | None = None,
    epochs: int | None = None,
) -> Path:
    """Continue the run in ``run_dir`` from its ``last`` checkpoint; return the folder.

    The options come from the run's ``config.json``; ``device`` and ``threads`` may
    override its choices (results are bitwise reproducible only on the same device and
    thread count). The data is loaded again from its recorded source and must have the
    recorded digest (or be passed as ``data``). The checkpoint is verified before use: a
    damaged one is an error, never skipped. With no checkpoint yet, the run restarts
    from step 0; a finished run is left as it is. ``metrics.csv`` is cut back to the
    checkpoint's epoch.

    ``epochs`` extends (or shortens, down to the epochs already done) the run to that
    many epochs, finished or not: from the checkpoint on, the learning rate follows the
    schedule of a run of ``epochs`` epochs (a jump in the rate is reported once), and
    ``config.json`` records the new length. With ``schedule="constant"`` (and the same
    warm-up length) the result equals a run started with ``epochs`` epochs, bitwise on
    CPU. Only one process at a time may write into a run folder (see :func:`fit`).
    """
    run = open_run(run_dir)
    recorded = read_config(run)
    options = dict(recorded["training"])
    if device is not None:
        options["device"] = device
    if threads is not None:
        options["threads"] = threads
    config = TrainConfig.from_dict(options)
    with process_group(resolve_device(config.device).type) as world:
        world.check_batch(config.batch_size)
        with FolderLock(run.path) if world.is_main else contextlib.nullcontext():
            recorded = read_config(run)  # as the lock holder sees it
            return _resume(run, recorded, config, world, data, model, progress, epochs)


def extended_config(
    config: TrainConfig, epochs: int | None, done: int, run: RunFolder
) -> TrainConfig:
    """``config`` with ``epochs`` epochs (unchanged when ``None``); at least ``done``."""
    if epochs is None:
        return config
    check_positive_int("epochs", epochs)
    if epochs < done:
        raise ValueError(
            f"--epochs {epochs} is fewer than the {done} epochs run {str(run.path)!r} has "
            "already trained"
        )
    return dataclasses.replace(config, epochs=epochs)


def _record_extension(run: RunFolder, recorded: dict[str, Any], before: int, after: int) -> None:
    """Write the run's new length into ``config.json``, with a line of history."""
    if before == after:
        return
    recorded["training"]["epochs"] = after
    history = recorded.setdefault("extended", [])
    history.append({"from_epochs": before, "to_epochs": after, "when": _utc_now()})
    write_json(run.config, recorded)


def _schedule_jump(
    config: TrainConfig, before_epochs: int, steps_per_epoch: int, step: int
) -> tuple[float, float] | None:
    """``(old rate, new rate)`` at ``step`` if lengthening the run changes it, else None."""
    if step == 0 or before_epochs == config.epochs:
        return None

    def rate(epochs: int) -> float:
        total = steps_per_epoch * epochs
        warmup = warmup_steps(total, config.warmup)
        return lr_at(step, lr=config.lr, total_steps=total, warmup=warmup, schedule=config.schedule)

    old, new = rate(before_epochs), rate(config.epochs)
    return None if old == new else (old, new)


def _resume(
    run: RunFolder,
    recorded: dict[str, Any],
    config: TrainConfig,
    world: World,
    data: DataSplits | None,
    model: nn.Module | None,
    progress: str,
    epochs: int | None = None,
) -> Path:
    """:func:`resume` once the processes are joined: every process reads ``last``;
    process 0 alone cleans up and rewrites files."""
    if world.is_main:
        clean_leftovers(run)
    last = run.checkpoint("last")
    checkpoint = read_checkpoint(last, repair_sidecar=world.is_main) if last.exists() else None
    report = Progress(progress if world.is_main else "none")
    at = _Position.from_meta(checkpoint.meta, checkpoint.path) if checkpoint else _Position()
    done = at.epoch
    before_epochs = config.epochs
    config = extended_config(config, epochs, done, run)
    spec = None
    if model is None:
        spec = read_run_spec(run, recorded)
        if spec is None:
            raise ValueError(
                f"run {str(run.path)!r} trained a custom module (it has no spec.toml); "
                "resume it from Python with resume(..., model=that module)"
            )
    if world.is_main:
        write_metrics(run, [row for row in read_metrics(run) if row["epoch"] <= done])
        _record_extension(run, recorded, before_epochs, config.epochs)
    if done == config.epochs:
        report.note(
            f"run {run.path} already finished ({config.epochs} of {config.epochs} epochs); "
            "nothing to do"
        )
        return run.path
    torch_device = world.device(resolve_device(config.device))
    data = _reload_data(recorded["data"], data)
    if model is None:
        _check_fits(spec, data)
        torch.manual_seed(config.seed)
        model = build(spec)
        start = recorded.get("init_from")
        if checkpoint is None and start:  # no step taken yet: the same starting weights
            initialise_from_run(model, spec, start["run"], start["checkpoint"])
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    jump = _schedule_jump(config, before_epochs, steps_per_epoch, at.step)
    if jump is not None:
        report.note(
            f"the learning rate jumps from {jump[0]:.4g} to {jump[1]:.4g} at step "
            f"{at.step + 1}: from here on it follows the schedule of a "
            f"{config.epochs}-epoch run"
        )
    world.barrier("waiting for every process to read the checkpoint")
    with _threads(_threads_for(config, world)):
        return _train(run, model, data, config, torch_device, checkpoint, report, world)


def _reload_data(recorded: Mapping[str, Any], data: DataSplits | None) -> DataSplits:
    from cnnkit.data import load

    if data is None:
        if recorded.get("kind") == "custom":
            raise ValueError(
                "this run was trained on data given in memory; pass the same data as data="
            )
        data = load(
            recorded["source"],
            tuple(recorded["input_hw"]),
            val_fraction=recorded["val_fraction"],
            seed=recorded["seed"],
        )
    if data.digest != recorded.get("digest"):
        raise ValueError(
            f"the data at {recorded.get('source')!r} has changed since the run started "
            f"(digest {str(recorded.get('digest'))[:12]}…, now {data.digest[:12]}…); "
            "resuming would not continue the same run"
        )
    return data


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


_RNG_NOTE = {
    "scheme": "derived",
    "note": "data order, shifts and per-step seeds are hashes of (seed, epoch or step); "
    "no generator state is stored",
}


@dataclass
class _Position:
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
    def from_meta(cls, meta: Mapping[str, Any], path: Path) -> _Position:
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


def _train(
    run: RunFolder,
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    device: torch.device,
    checkpoint: Checkpoint | None,
    report: Progress,
    world: World = SINGLE,
) -> Path:
    """Train from ``checkpoint`` (or step 0) to the end; Ctrl-C becomes
    :class:`TrainingInterrupted`, naming the run folder to resume."""
    try:
        return _train_epochs(run, model, data, config, device, checkpoint, report, world)
    except KeyboardInterrupt:
        report.close()
        raise TrainingInterrupted(run.path) from None


def _train_epochs(
    run: RunFolder,
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    device: torch.device,
    checkpoint: Checkpoint | None,
    report: Progress,
    world: World = SINGLE,
) -> Path:
    wall_start = time.monotonic()
    model.to(device=device, dtype=config.torch_dtype)
    replica = world.data_parallel(model)  # process 0's weights on every process
    optimizer = make_optimizer(model, config)
    at = _Position()
    if checkpoint is not None:
        load_model_state(model, checkpoint)
        load_optimizer_state(optimizer, checkpoint)
        at = _Position.from_meta(checkpoint.meta, checkpoint.path)
    rows = read_metrics(run)
    n = len(data.train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    schedule = functools.partial(
        lr_at,
        lr=config.lr,
        total_steps=total_steps,
        warmup=warmup_steps(total_steps, config.warmup),
        schedule=config.schedule,
    )
    max_shift = max_shift_for(data.input_hw) if config.augment == "shift" else 0
    if checkpoint is not None:
        report.note(
            f"resuming {run.path} at epoch {at.epoch + 1}, batch {at.batch} (step {at.step})"
        )
    else:
        report.note(_start_line(run, model, data, steps_per_epoch, device, world))

    def save_last() -> None:
        if not world.is_main:
            return
        meta = {
            **at.to_meta(),
            "kind": "last",
            "saved": _utc_now(),
            "scalars": {"lr": schedule(max(at.step - 1, 0))},
            "rng": _RNG_NOTE | {"seed": config.seed},
        }
        save_checkpoint(
            run.checkpoint("last"), model.state_dict(), meta, optimizer_tensors(optimizer)
        )

    last_save = time.monotonic()
    for epoch in range(at.epoch, config.epochs):
        order = epoch_order(n, config.seed, epoch)
        shifts = epoch_shifts(n, max_shift, config.seed, epoch) if max_shift else None
        report.start_epoch(epoch + 1, config.epochs, steps_per_epoch, at.batch)
        for batch in range(at.batch, steps_per_epoch):
            tick = time.monotonic()
            index = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            mine = world.shard(index)  # this process's share of the batch
            images = data.train.images[mine]
            if shifts is not None:
                images = shift_images(images, shifts[mine])
            labels = data.train.labels[mine]
            torch.manual_seed(derived_seed(config.seed, "step", at.step))
            lr = schedule(at.step)
            try:
                loss, correct = train_step(
                    replica,
                    optimizer,
                    images.to(device=device, dtype=config.torch_dtype),
                    labels.to(device),
                    lr,
                    config.grad_clip,
                    world=world,
                    batch_images=len(index),
                )
            except NonFiniteLossError as error:
                report.close()
                message = _blow_up_message(error, run, epoch, batch, at.step, lr)
                raise NonFiniteLossError(message) from None
            at.record(loss, correct, len(index), time.monotonic() - tick)
            report.step(len(index), at.loss_sum / at.seen, at.correct / at.seen, at.speed)
            due = config.checkpoint_every_steps and at.step % config.checkpoint_every_steps == 0
            late = time.monotonic() - last_save >= config.checkpoint_every_s
            if at.batch < steps_per_epoch and (due or late):
                save_last()
                last_save = time.monotonic()
        row = _end_epoch(run, model, data, config, device, at, schedule(at.step - 1), rows, world)
        report.end_epoch(row, config.epochs)
        at.next_epoch()
        save_last()
        last_save = time.monotonic()
    report.finish(run.path, rows, at.best, time.monotonic() - wall_start)
    return run.path


def _start_line(
    run: RunFolder,
    model: nn.Module,
    data: DataSplits,
    steps: int,
    device: torch.device,
    world: World = SINGLE,
) -> str:
    spec = getattr(model, "spec", None)
    name = spec.name if isinstance(spec, ArchitectureSpec) else type(model).__name__
    trained = [(k, p.numel()) for k, p in model.named_parameters() if p.requires_grad]
    biases = sum(n for k, n in trained if k.endswith("bias"))
    weights = sum(n for _, n in trained) - biases
    sizes = f"{len(data.train)} train / {len(data.val)} val"
    if data.test is not None:
        sizes += f" / {len(data.test)} test"
    threads = torch.get_num_threads()
    where = (
        f"{device}, {threads} thread{'s' * (threads != 1)}" if device.type == "cpu" else str(device)
    )
    if world.active:
        where += f", {world.size} processes ({world.backend})"
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        where += f", {str(dtype).removeprefix('torch.')}"
    return (
        f"training {name} ({weights:,} weights and {biases:,} biases) on {data.source}: "
        f"{sizes} images, {steps} steps per epoch, {where} -> {run.path}"
    )


def _end_epoch(
    run: RunFolder,
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    device: torch.device,
    at: _Position,
    lr: float,
    rows: list[dict[str, Any]],
    world: World = SINGLE,
) -> dict[str, Any]:
    """Evaluate, append the metrics row, and save ``best`` if validation improved.

    Every process evaluates the whole sets (identical weights, identical results), so
    all agree on ``best``; only process 0 writes."""
    eval_start = time.monotonic()
    val = evaluate(model, data.val, batch_size=config.eval_batch_size, device=device)
    test = None
    if data.test is not None:
        test = evaluate(model, data.test, batch_size=config.eval_batch_size, device=device)
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
    if world.is_main:
        write_metrics(run, rows)
    best = at.best
    better = not best or (val.accuracy, -val.loss) > (best["val_accuracy"], -best["val_loss"])
    if better:
        at.best = {"epoch": epoch, "val_accuracy": val.accuracy, "val_loss": val.loss}
        meta = {
            "epoch": epoch,
            "step": at.step,
            "kind": "best",
            "saved": _utc_now(),
            "scalars": {k: v for k, v in row.items() if k != "epoch"},
        }
        if world.is_main:
            save_checkpoint(run.checkpoint("best"), model.state_dict(), meta)
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
