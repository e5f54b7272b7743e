"""The training loop's names in one place, each defined in the module for its job:

- :mod:`cnnkit.training.order` — the seeded order and shifts (``epoch_order``,
  ``epoch_shifts``, ``shift_images``, ``derived_seed``, ``max_shift_for``);
- :mod:`cnnkit.training.step` — one step for one or many processes (``train_step``,
  ``NonFiniteLossError``);
- :mod:`cnnkit.training.evaluation` — ``evaluate`` and ``Evaluation``;
- :mod:`cnnkit.training.epochs` — the epochs of a run (``TrainingInterrupted``);
- :mod:`cnnkit.training.fitting` — ``fit``;
- :mod:`cnnkit.training.resuming` — ``resume`` and ``extended_config``;
- :mod:`cnnkit.training.rules` — what a run may do (``RESUME_OVERRIDES``);
- :mod:`cnnkit.training.device` — ``resolve_device``.
"""

from cnnkit.training.device import resolve_device
from cnnkit.training.epochs import TrainingInterrupted
from cnnkit.training.evaluation import Evaluation, evaluate
from cnnkit.training.fitting import fit
from cnnkit.training.order import (
    derived_seed,
    epoch_order,
    epoch_shifts,
    max_shift_for,
    shift_images,
)
from cnnkit.training.resuming import extended_config, resume
from cnnkit.training.rules import RESUME_OVERRIDES
from cnnkit.training.step import NonFiniteLossError, train_step

__all__ = [
    "RESUME_OVERRIDES",
    "Evaluation",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "derived_seed",
    "epoch_order",
    "epoch_shifts",
    "evaluate",
    "extended_config",
    "fit",
    "max_shift_for",
    "resolve_device",
    "resume",
    "shift_images",
    "train_step",
]
