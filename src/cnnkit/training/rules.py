"""The rules of what a training run may do, checked by ``fit`` and ``resume`` themselves.

The command line calls the same functions (before starting heavy work, where it can),
so a Python caller and ``cnnkit train`` meet the same rules:

- gradient clipping is off by default for a network tied by averaging
  (:func:`grad_clip_for`);
- a resumed run continues with its own options: only :data:`RESUME_OVERRIDES` may be
  given again (:func:`check_resume_options`), and its length may not drop below the
  epochs it has done (:func:`check_resume_epochs`);
- ``init_checkpoint`` chooses the weights of ``init_from`` and means nothing without it
  (:func:`check_init_choice`);
- the network reads the data's images and has one output per class (:func:`check_fits`).

A broken rule is a :class:`RuleError`. Its message names the options as ``fit`` and
``resume`` take them (``epochs``, ``init_checkpoint``); :meth:`RuleError.spelled` names
them another way, so the command line can say ``--epochs`` and ``--checkpoint``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

from cnnkit._validation import check_choice, check_positive_int
from cnnkit.data.splits import DataSplits
from cnnkit.models.spec import ArchitectureSpec
from cnnkit.training.config import DEFAULT_GRAD_CLIP, TrainConfig
from cnnkit.training.run_folder import CHECKPOINTS

# what ``resume`` may change about a run; every other option is the run's own
RESUME_OVERRIDES = ("device", "threads", "epochs")
# the keywords ``fit`` takes besides the TrainConfig fields
FIT_KEYWORDS = ("model_or_spec", "config", "out", "invocation", "init_from", "init_checkpoint")


class Option(str):
    """The name of an option inside a :class:`RuleError`'s message."""


class RuleError(ValueError):
    """A training run was asked for something its rules forbid.

    The error's arguments are the message's pieces: plain text and :class:`Option`
    names, joined as they are by ``str(error)`` and with each name respelled by
    :meth:`spelled`.
    """

    def __str__(self) -> str:
        return self.spelled(str)

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with every option's name ``n`` written as ``spell(n)``."""
        return "".join(spell(p) if isinstance(p, Option) else str(p) for p in self.args)


def _listed(names: Iterable[str]) -> list[str | Option]:
    """``a``, ``a and b``, ``a, b and c`` with each name an :class:`Option`."""
    names = [Option(n) for n in names]
    pieces: list[str | Option] = []
    for k, name in enumerate(names):
        if k:
            pieces.append(" and " if k == len(names) - 1 else ", ")
        pieces.append(name)
    return pieces


def grad_clip_for(config: TrainConfig, spec: object) -> float | None:
    """The norm at which a run of ``config`` clips the gradient (``None``: no clipping).

    ``grad_clip="auto"`` clips at :data:`DEFAULT_GRAD_CLIP`, except for a network tied
    by averaging (``spec`` an :class:`ArchitectureSpec` with
    ``weight_sharing="averaged"``): its stored gradients are those of every position of
    an untied bank (by default scaled by their group's size), so their norm is not the
    norm of the shared kernel's gradient, and clipping is off unless ``grad_clip`` asks
    for it with a number. A module without a spec counts as untied. A number or ``None``
    is the answer as it is.
    """
    if config.grad_clip != "auto":
        return config.grad_clip
    averaged = isinstance(spec, ArchitectureSpec) and spec.weight_sharing == "averaged"
    return None if averaged else DEFAULT_GRAD_CLIP


def check_resume_options(given: Iterable[str]) -> None:
    """Refuse every option in ``given`` (names of options a caller gave) but
    :data:`RESUME_OVERRIDES`: a resumed run keeps the options it started with."""
    fixed = [name for name in given if name not in RESUME_OVERRIDES]
    if fixed:
        raise RuleError(
            Option("resume"),
            " continues a run with its own options (only ",
            *_listed(RESUME_OVERRIDES),
            " may be given again); ",
            Option(fixed[0]),
            " cannot be given with it",
        )


def check_resume_epochs(epochs: int, done: int, run: str | Path) -> int:
    """Require the new length ``epochs`` of run ``run`` to be a positive integer no
    smaller than the ``done`` epochs it has trained; return it."""
    check_positive_int("epochs", epochs)
    if epochs < done:
        raise RuleError(
            Option("epochs"),
            f" {epochs} is fewer than the {done} epochs run {str(run)!r} has already trained",
        )
    return epochs


def check_init_choice(init_from: str | Path | None, init_checkpoint: str | None) -> str | None:
    """The checkpoint of ``init_from`` to start from (``"best"`` unless chosen); an
    ``init_checkpoint`` without ``init_from`` is an error."""
    if init_from is None:
        if init_checkpoint is not None:
            raise RuleError(
                Option("init_checkpoint"),
                " chooses the weights of ",
                Option("init_from"),
                "; give it with it",
            )
        return None
    if init_checkpoint is None:
        return "best"
    return check_choice("init_checkpoint", init_checkpoint, CHECKPOINTS)


def check_fits(spec: ArchitectureSpec | None, data: DataSplits) -> None:
    """Require the network ``spec`` to read the data's images and to have one output
    per class (nothing to check for a module without a spec)."""
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


def fit_options() -> tuple[str, ...]:
    """Every option a run is started with: the :class:`TrainConfig` fields and the
    keywords of ``fit``."""
    return (*(f.name for f in dataclasses.fields(TrainConfig)), *FIT_KEYWORDS)
