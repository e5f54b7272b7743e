"""Training options, their defaults and checks; the learning-rate schedule; the optimizer.

The defaults are chosen to train any small image set well without tuning: SGD with
momentum 0.9 and Nesterov, batch 64, a peak learning rate of 0.02 reached by a linear
warm-up over the first 5% of steps and then lowered along a half cosine to zero, the
gradient's norm clipped at 5 (a guard against the occasional huge step; ordinary steps
stay below it), and a weight decay of 5e-4 on kernels and weights (not on biases or
gains).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cnnkit._validation import (
    check_choice,
    check_nonnegative_int,
    check_number,
    check_positive_float,
    check_positive_int,
)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")
AUGMENTATIONS = ("none", "shift")
DTYPES = ("float32", "float64")
DEFAULT_LR = {"sgd": 0.02, "adam": 0.001}
DEFAULT_EPOCHS = 15
DEFAULT_GRAD_CLIP = 5.0  # what grad_clip="auto" is for a network that is not tied by averaging
SEED_MAX = 2**63 - 1  # torch's generators take 64-bit seeds; derived seeds are 63-bit


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; ``config.json`` records all of them.

    ``lr`` left at ``None`` becomes the optimizer's default (:data:`DEFAULT_LR`).
    ``warmup`` is the fraction of all steps spent raising the learning rate linearly
    from ``lr / warmup_steps`` to ``lr``. ``grad_clip`` (``None`` for no clipping) bounds
    the Euclidean norm of the gradient of all parameters together; ``"auto"`` is
    :data:`DEFAULT_GRAD_CLIP`, or no clipping for a network tied by averaging
    (:func:`cnnkit.training.rules.grad_clip_for` says why). ``momentum`` is
    Adam's first beta when ``optimizer="adam"``. ``augment="shift"`` moves each training
    image by up to 1/14 of the input's shorter side in each direction (rounded: 2 pixels
    at 28×28, 6 at 83×83), a random amount that depends only on (seed, epoch, sample
    index). ``dtype`` is the precision of the weights and of all arithmetic: ``"float64"``
    trains ~2x slower but makes results independent of summation order to ~1e-12 (for
    studying the training itself, or comparing runs split differently among processes).
    ``checkpoint_every_s`` bounds the training time
    between two saves of ``last``; ``checkpoint_every_steps`` (for tests) adds a save
    every that many steps.
    """

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 64
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup: float = 0.05
    grad_clip: float | str | None = "auto"
    augment: str = "shift"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    dtype: str = "float32"
    eval_batch_size: int = 64
    checkpoint_every_s: float = 120.0
    checkpoint_every_steps: int | None = None

    def __post_init__(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        object.__setattr__(self, "lr", check_positive_float("lr", self.lr))
        _check_number("momentum", self.momentum, "in [0, 1)", lambda v: 0 <= v < 1)
        _check_number("weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)
        check_choice("schedule", self.schedule, SCHEDULES)
        _check_number("warmup", self.warmup, "in [0, 1)", lambda v: 0 <= v < 1)
        if isinstance(self.grad_clip, str):
            if self.grad_clip != "auto":
                raise ValueError(
                    f"grad_clip must be a positive number, None or 'auto', got {self.grad_clip!r}"
                )
        elif self.grad_clip is not None:
            check_positive_float("grad_clip", self.grad_clip)
        check_choice("augment", self.augment, AUGMENTATIONS)
        check_nonnegative_int("seed", self.seed)
        if self.seed > SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed}")
        check_choice("device", self.device, DEVICES)
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        check_choice("dtype", self.dtype, DTYPES)
        check_positive_int("eval_batch_size", self.eval_batch_size)
        check_positive_float("checkpoint_every_s", self.checkpoint_every_s)
        if self.checkpoint_every_steps is not None:
            check_positive_int("checkpoint_every_steps", self.checkpoint_every_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a :class:`torch.dtype`."""
        return getattr(torch, self.dtype)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"training config: unknown option {unknown[0]!r}")
        return cls(**data)


def _check_number(name: str, value: Any, rule: str, ok: Callable[[float], bool]) -> float:
    """Require a finite real number satisfying ``ok``; ``rule`` says which, for the message."""
    return check_number(name, value, rule, ok)


# --------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------


def warmup_steps(total_steps: int, warmup: float) -> int:
    """Steps of linear warm-up: ``round(warmup * total_steps)``, at most ``total_steps - 1``."""
    return min(round(warmup * total_steps), max(total_steps - 1, 0))


def lr_at(step: int, *, lr: float, total_steps: int, warmup: int, schedule: str) -> float:
    """The learning rate of step ``step`` (0-based) of ``total_steps``; a pure function.

    With ``w = warmup`` steps of warm-up and ``t = (step - w) / (total_steps - w)``:

    - warm-up (``step < w``): ``lr * (step + 1) / w``;
    - ``"cosine"``: ``lr * (1 + cos(pi * t)) / 2``, from ``lr`` down to almost 0;
    - ``"step"``: ``lr``, then ``lr / 10`` from ``t = 0.5``, ``lr / 100`` from ``t = 0.75``;
    - ``"constant"``: ``lr``.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total_steps - warmup, 1)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return lr * (0.01 if t >= 0.75 else 0.1 if t >= 0.5 else 1.0)
    if schedule == "constant":
        return lr
    raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")


def run_schedule(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of each step of a run of ``config.epochs`` epochs of
    ``steps_per_epoch`` steps: :func:`lr_at` with the run's options."""
    total = steps_per_epoch * config.epochs
    warmup = warmup_steps(total, config.warmup)

    def rate(step: int) -> float:
        return lr_at(step, lr=config.lr, total_steps=total, warmup=warmup, schedule=config.schedule)

    return rate


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam (decoupled weight decay, i.e. AdamW).

    Weight decay applies to tensors of two or more dimensions (kernels, weight
    matrices); biases and per-map gains (one dimension) are not decayed.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        nesterov = config.momentum > 0
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))
