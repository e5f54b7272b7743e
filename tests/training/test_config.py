"""Training options, the learning-rate schedule and the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnkit.training.config import TrainConfig, lr_at, make_optimizer, warmup_steps


def test_warmup_rises_linearly_to_the_peak() -> None:
    rates = [lr_at(s, lr=0.1, total_steps=100, warmup=4, schedule="cosine") for s in range(5)]
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rates[4] == pytest.approx(0.1)  # t = 0: cos(0) = 1


def test_cosine_halves_at_the_middle_and_nearly_vanishes_at_the_end() -> None:
    def at(step: int) -> float:
        return lr_at(step, lr=0.2, total_steps=110, warmup=10, schedule="cosine")

    assert at(60) == pytest.approx(0.1)  # t = 1/2
    assert at(109) == pytest.approx(0.2 * (1 + math.cos(math.pi * 99 / 100)) / 2)
    assert all(at(s) >= at(s + 1) for s in range(10, 109))


def test_step_and_constant_schedules() -> None:
    steps = [lr_at(s, lr=1.0, total_steps=100, warmup=0, schedule="step") for s in (0, 49, 50, 75)]
    assert steps == [1.0, 1.0, 0.1, 0.01]
    assert lr_at(99, lr=0.3, total_steps=100, warmup=0, schedule="constant") == 0.3
    with pytest.raises(ValueError, match="schedule must be one of .* got 'linear'"):
        lr_at(0, lr=1.0, total_steps=10, warmup=0, schedule="linear")


def test_warmup_steps_is_a_share_of_all_steps() -> None:
    assert warmup_steps(400, 0.05) == 20
    assert warmup_steps(1, 0.5) == 0  # never the whole run


def test_default_learning_rate_follows_the_optimizer() -> None:
    assert TrainConfig().lr == 0.02
    assert TrainConfig(optimizer="adam").lr == 0.001
    assert TrainConfig(lr=0.3).lr == 0.3


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"epochs": 0}, ValueError, "epochs must be a positive integer, got 0"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be a positive integer, got 2.5"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number > 0, got nan"),
        ({"lr": -1.0}, ValueError, "lr must be a finite number > 0, got -1.0"),
        ({"optimizer": "rmsprop"}, ValueError, "optimizer must be one of 'sgd', 'adam'"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay must be a finite number >= 0"),
        ({"momentum": 1.0}, ValueError, r"momentum must be a finite number in \[0, 1\), got 1.0"),
        ({"warmup": "a"}, TypeError, r"warmup must be a number in \[0, 1\), got 'a'"),
        ({"grad_clip": 0.0}, ValueError, "grad_clip must be a finite number > 0, got 0.0"),
        ({"grad_clip": "off"}, ValueError, "grad_clip must be a positive number, None or 'auto'"),
        ({"schedule": "linear"}, ValueError, "schedule must be one of"),
        ({"device": "tpu"}, ValueError, "device must be one of 'auto', 'cpu', 'cuda'"),
        ({"threads": 0}, ValueError, "threads must be a positive integer, got 0"),
        ({"dtype": "float16"}, ValueError, "dtype must be one of 'float32', 'float64'"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        TrainConfig(**options)


def test_config_round_trips_and_refuses_unknown_keys() -> None:
    config = TrainConfig(epochs=3, lr=0.2, seed=7)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_weight_decay_skips_biases() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.01))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    assert isinstance(make_optimizer(model, TrainConfig(optimizer="adam")), torch.optim.AdamW)
