"""Measure a network's implementation choices ahead of time: what ``cnnkit tune`` runs.

:func:`tune_network` runs a network on synthetic batches -- a forward pass without a
gradient and a training step's forward and backward at each batch size -- so that every
case it meets is timed once on this machine and kept in the tuning file
(:mod:`cnnkit.kernels.tuning`). A later process, a training run included, then reads the
choices instead of measuring them while it works.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from cnnkit._validation import check_positive_int
from cnnkit.kernels import tuning
from cnnkit.models.build import build
from cnnkit.models.presets import from_name
from cnnkit.models.spec import ArchitectureSpec

__all__ = ["tune_network"]


def tune_network(
    spec: ArchitectureSpec | str = "lecun83",
    batch_sizes: Sequence[int] = (1, 64),
    *,
    retime: bool = False,
) -> dict[str, str]:
    """Time every choice ``spec``'s network (a spec or a preset's name) makes at
    ``batch_sizes``, in evaluation and in training; return the choices this process has
    taken, case by case. ``retime`` times again the cases kept already.

    Raises ``RuntimeError`` when measuring is turned off (``CNNKIT_TUNE=0`` or ``read``).
    The global random generator is left as it was.
    """
    if not tuning.tuning_enabled():
        mode = os.environ.get("CNNKIT_TUNE")
        raise RuntimeError(f"measuring is turned off by CNNKIT_TUNE={mode}; unset it to tune")
    sizes = [check_positive_int("batch size", size) for size in batch_sizes]
    with torch.random.fork_rng(devices=[]):
        model = build(from_name(spec) if isinstance(spec, str) else spec)
    shape = (model.spec.input.maps, model.spec.input.height, model.spec.input.width)
    generator = torch.Generator().manual_seed(0)
    with tuning.retiming() if retime else contextlib.nullcontext():
        _run(model, sizes, shape, generator)
    return tuning.used()


def _run(model: torch.nn.Module, sizes: list[int], shape: tuple, generator) -> None:  # noqa: ANN001
    """An evaluation and a training step's forward and backward at each batch size."""
    for size in sizes:
        x = torch.randn(size, *shape, generator=generator)
        with torch.no_grad():
            model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(model(x).sum(), params, allow_unused=True)
