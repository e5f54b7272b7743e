"""``resume``: continue a run from its ``last`` checkpoint, or make it longer."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from cnnkit._files import FolderLock
from cnnkit.data.splits import DataSplits
from cnnkit.training.checkpoint import read_checkpoint
from cnnkit.training.config import TrainConfig, run_schedule
from cnnkit.training.device import resolve_device, threads_for, using_threads
from cnnkit.training.distributed import World, process_group
from cnnkit.training.epochs import Position, Session, train
from cnnkit.training.fitting import seeded_network
from cnnkit.training.init_from import initialise_from_run
from cnnkit.training.progress import Progress
from cnnkit.training.rules import (
    check_fits,
    check_resume_epochs,
    check_resume_options,
    fit_options,
)
from cnnkit.training.run_folder import (
    RunFolder,
    clean_leftovers,
    open_run,
    read_config,
    read_metrics,
    require_run_spec,
    utc_now,
    write_json,
    write_metrics,
)


def resume(
    run_dir: str | Path,
    *,
    data: DataSplits | None = None,
    model: nn.Module | None = None,
    progress: str = "none",
    device: str | None = None,
    threads: int | None = None,
    epochs: int | None = None,
    **fixed: Any,
) -> Path:
    """Continue the run in ``run_dir`` from its ``last`` checkpoint; return the folder.

    The options come from the run's ``config.json``; ``device`` and ``threads`` may
    override its choices (results are bitwise reproducible only on the same device and
    thread count). Any other option a run starts with (a :class:`TrainConfig` field such
    as ``lr``, or a keyword of ``fit`` such as ``init_from``) is refused with a
    :class:`~cnnkit.training.rules.RuleError`: a resumed run keeps its own. The data is
    loaded again from its recorded source and must have the recorded digest (or be
    passed as ``data``). The checkpoint is verified before use: a damaged one is an
    error, never skipped. With no checkpoint yet, the run restarts from step 0; a
    finished run is left as it is. ``metrics.csv`` is cut back to the checkpoint's epoch.

    ``epochs`` extends (or shortens, down to the epochs already done) the run to that
    many epochs, finished or not: from the checkpoint on, the learning rate follows the
    schedule of a run of ``epochs`` epochs (a jump in the rate is reported once), and
    ``config.json`` records the new length. With ``schedule="constant"`` (and the same
    warm-up length) the result equals a run started with ``epochs`` epochs, bitwise on
    CPU. Only one process at a time may write into a run folder (see
    :func:`~cnnkit.training.fit`).
    """
    unknown = sorted(set(fixed) - set(fit_options()))
    if unknown:
        raise TypeError(f"resume() got an unexpected keyword argument {unknown[0]!r}")
    check_resume_options(fixed)
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
    at = Position.from_meta(checkpoint.meta, checkpoint.path) if checkpoint else Position()
    done = at.epoch
    before_epochs = config.epochs
    config = extended_config(config, epochs, done, run)
    spec = None
    if model is None:
        spec = require_run_spec(run, recorded, "resume", "resume")
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
        check_fits(spec, data)
        model = seeded_network(spec, config.seed)
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
    session = Session(run, model, data, config, torch_device, report, world)
    with using_threads(threads_for(config, world)):
        return train(session, checkpoint)


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


def extended_config(
    config: TrainConfig, epochs: int | None, done: int, run: RunFolder
) -> TrainConfig:
    """``config`` with ``epochs`` epochs (unchanged when ``None``); at least ``done``."""
    if epochs is None:
        return config
    return dataclasses.replace(config, epochs=check_resume_epochs(epochs, done, run.path))


def _record_extension(run: RunFolder, recorded: dict[str, Any], before: int, after: int) -> None:
    """Write the run's new length into ``config.json``, with a line of history."""
    if before == after:
        return
    recorded["training"]["epochs"] = after
    history = recorded.setdefault("extended", [])
    history.append({"from_epochs": before, "to_epochs": after, "when": utc_now()})
    write_json(run.config, recorded)


def _schedule_jump(
    config: TrainConfig, before_epochs: int, steps_per_epoch: int, step: int
) -> tuple[float, float] | None:
    """``(old rate, new rate)`` at ``step`` if lengthening the run changes it, else None."""
    if step == 0 or before_epochs == config.epochs:
        return None
    before = dataclasses.replace(config, epochs=before_epochs)
    old = run_schedule(before, steps_per_epoch)(step)
    new = run_schedule(config, steps_per_epoch)(step)
    return None if old == new else (old, new)
