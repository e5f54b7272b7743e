"""``fit``: start a run, from a spec or a module, in one process or in many."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit._files import FolderLock
from cnnkit.data.images import InputTransform
from cnnkit.data.splits import DataSplits
from cnnkit.models import ArchitectureSpec, build
from cnnkit.training.config import TrainConfig
from cnnkit.training.device import resolve_device, threads_for, using_threads
from cnnkit.training.distributed import DistributedError, World, process_group
from cnnkit.training.epochs import Session, train
from cnnkit.training.init_from import initialise_from_run
from cnnkit.training.progress import Progress
from cnnkit.training.rules import check_fits, check_init_choice
from cnnkit.training.run_folder import (
    CONFIG_FORMAT,
    RunFolder,
    clean_leftovers,
    prepare_new_run,
    spec_digest,
    utc_now,
    versions,
    write_classes,
    write_json,
    write_metrics,
)


def fit(
    model_or_spec: nn.Module | ArchitectureSpec,
    data: DataSplits,
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    progress: str = "none",
    invocation: Mapping[str, Any] | None = None,
    init_from: str | Path | None = None,
    init_checkpoint: str | None = None,
) -> Path:
    """Train a network on ``data`` and return its run folder.

    ``model_or_spec`` is an :class:`~cnnkit.models.ArchitectureSpec` (built with weights
    drawn after ``torch.manual_seed(config.seed)``; its classifier is resized to the
    data's classes) or a module taking ``(N, maps, H, W)`` to ``(N, classes)`` logits (a
    module without a ``spec`` attribute gets no ``spec.toml``; pass it again to
    :func:`~cnnkit.training.resume` and :func:`~cnnkit.training.load_run`). ``out`` is
    the run folder (created; must not hold a run), by default the next numbered folder
    under ``runs/``. ``progress`` is ``"none"``, ``"lines"`` (one line per epoch),
    ``"bar"`` (tqdm) or ``"auto"`` (bar on a terminal). ``invocation`` is stored in
    ``config.json`` as is (the command line's options). ``init_from`` is another run
    folder whose ``init_checkpoint`` (``"best"``, the default, or ``"last"``; given
    without ``init_from`` it is an error) gives the starting weights instead of the
    seeded ones: same architecture, checked; if the number of classes differs, the
    classifier's output layer keeps its seeded weights (see
    :mod:`cnnkit.training.init_from`).

    The rules of :mod:`cnnkit.training.rules` apply: ``config.grad_clip="auto"`` (the
    default) clips the gradient's norm at 5, but not for a network tied by averaging
    (:func:`~cnnkit.training.rules.grad_clip_for`).

    Only one process at a time may write into a run folder: a second gets a
    :class:`~cnnkit._files.FolderInUseError` naming the first's PID.

    Raises :class:`~cnnkit.training.step.NonFiniteLossError` if the loss becomes NaN or
    infinite; the checkpoints saved before stay on disk.

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
    init_checkpoint = check_init_choice(init_from, init_checkpoint)
    device = resolve_device(config.device)
    model, spec = _model_and_spec(model_or_spec, data, config.seed)
    check_fits(spec, data)
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
        run = RunFolder(path)
        session = Session(run, model, data, config, world.device(device), report, world)
        with using_threads(threads_for(config, world)):
            return train(session, None)


def seeded_network(spec: ArchitectureSpec, seed: int) -> nn.Module:
    """``build(spec)`` with the weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build(spec)


def _model_and_spec(
    model_or_spec: nn.Module | ArchitectureSpec, data: DataSplits, seed: int
) -> tuple[nn.Module, ArchitectureSpec | None]:
    """Build a spec (classifier resized to the data's classes, weights seeded by ``seed``),
    or take a module as it is."""
    if isinstance(model_or_spec, ArchitectureSpec):
        spec = model_or_spec
        if spec.classifier.classes != data.num_classes:
            spec = spec.with_classes(data.num_classes)
        return seeded_network(spec, seed), spec
    if isinstance(model_or_spec, nn.Module):
        spec = getattr(model_or_spec, "spec", None)
        return model_or_spec, spec if isinstance(spec, ArchitectureSpec) else None
    raise TypeError(
        "model_or_spec must be an ArchitectureSpec or a torch.nn.Module, "
        f"got {type(model_or_spec).__name__}"
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
            "created": utc_now(),
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


def _on_main_first(world: World, what: str, action: Callable[[], str]) -> str:
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
