"""Starting a run from another run's weights (``fit(..., init_from=RUN)``).

The network must be the other run's architecture; only the number of classes may
differ, and then the classifier's output layer keeps its fresh (seeded) weights while
every other tensor is copied from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from cnnkit.models.spec import ArchitectureSpec
from cnnkit.training.checkpoint import CheckpointError, read_checkpoint
from cnnkit.training.run_folder import open_run, read_config, read_run_spec


def _without_name_and_classes(spec: ArchitectureSpec) -> dict[str, Any]:
    plain = dataclasses.replace(spec.with_classes(2), name="network")
    return plain.to_dict()


def initialise_from_run(
    model: nn.Module,
    spec: ArchitectureSpec | None,
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
) -> tuple[dict[str, Any], str]:
    """Copy run ``run_dir``'s ``checkpoint`` weights into ``model`` (built from ``spec``).

    Returns what to record in ``config.json`` (run, checkpoint, epoch, re-initialised
    tensors) and a sentence for the user. A different architecture is a ``ValueError``
    naming the first section that differs.
    """
    source = open_run(run_dir)
    config = read_config(source)
    source_spec = read_run_spec(source, config)
    where = f"--init-from {str(source.path)!r}"
    if spec is None or source_spec is None:
        raise ValueError(f"{where}: both runs must be of networks given by a spec")
    mine, theirs = _without_name_and_classes(spec), _without_name_and_classes(source_spec)
    if mine != theirs:
        first = next(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(
            f"{where} trained another architecture ({source_spec.name!r}): its {first!r} "
            "differs from this network's; only the number of classes may differ"
        )
    saved = read_checkpoint(source.checkpoint(checkpoint))
    state = model.state_dict()
    fresh = []
    with torch.no_grad():
        for key, tensor in state.items():
            found = saved.model.get(key)
            if found is None:
                raise CheckpointError(f"checkpoint {str(saved.path)!r} has no tensor {key!r}")
            if tuple(found.shape) != tuple(tensor.shape):
                fresh.append(key)
                continue
            tensor.copy_(found.to(tensor.dtype))
    ours, theirs_classes = spec.classifier.classes, source_spec.classifier.classes
    epoch = saved.meta.get("epoch")
    note = f"weights from run {source.path}, {checkpoint} checkpoint (epoch {epoch})"
    if fresh:
        note += (
            f"; the classifier's output layer is re-initialised ({theirs_classes} classes "
            f"there, {ours} here)"
        )
    record = {
        "run": str(source.path),
        "checkpoint": checkpoint,
        "epoch": epoch,
        "reinitialised": fresh,
    }
    return record, note
