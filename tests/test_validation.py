"""The shared argument checks and the valid-window size: one message style."""

from __future__ import annotations

import math

import pytest
import torch

from cnnkit._shapes import valid_hw, valid_size
from cnnkit._validation import (
    check_bool,
    check_int,
    check_number,
    check_positive_float,
    check_real_tensor,
)


@pytest.mark.parametrize(
    ("minimum", "value", "error", "message"),
    [
        (1, 0, ValueError, "n must be a positive integer, got 0"),
        (0, -1, ValueError, "n must be a non-negative integer, got -1"),
        (2, 1, ValueError, "n must be an integer >= 2, got 1"),
        (1, 2.0, TypeError, "n must be a positive integer, got 2.0"),
        (1, True, TypeError, "n must be a positive integer, got True"),
    ],
)
def test_check_int(minimum, value, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check_int("n", value, minimum)


def test_check_int_returns_the_value():
    assert check_int("n", 3, 2) == 3


def test_check_number_rules_and_choices():
    assert check_number("m", 0, "in [0, 1)", lambda v: 0 <= v < 1) == 0.0
    with pytest.raises(ValueError, match=r"^m must be a finite number in \[0, 1\), got 1$"):
        check_number("m", 1, "in [0, 1)", lambda v: 0 <= v < 1)
    with pytest.raises(ValueError, match=r"^m must be a finite number > 0, got nan$"):
        check_number("m", math.nan, "> 0", lambda v: v > 0)
    with pytest.raises(TypeError, match=r"^m must be a number > 0, got '1'$"):
        check_number("m", "1", "> 0", lambda v: v > 0)
    threshold = {"rule": ">= 0", "ok": lambda v: v >= 0, "choices": ("mean",)}
    assert check_number("t", "mean", **threshold) == "mean"
    with pytest.raises(ValueError, match=r"^t must be 'mean' or a number >= 0, got 'max'$"):
        check_number("t", "max", **threshold)
    with pytest.raises(ValueError, match=r"^t must be 'mean' or a finite number >= 0, got -1$"):
        check_number("t", -1, **threshold)
    with pytest.raises(TypeError, match=r"^t must be 'mean' or a number >= 0, got None$"):
        check_number("t", None, **threshold)


def test_positive_float_is_check_number():
    with pytest.raises(TypeError, match=r"^lr must be a number > 0, got 'a'$"):
        check_positive_float("lr", "a")
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got 0$"):
        check_positive_float("lr", 0)


def test_check_bool_and_real_tensor():
    assert check_bool("flag", False) is False
    with pytest.raises(TypeError, match=r"^flag must be True or False, got 1$"):
        check_bool("flag", 1)
    with pytest.raises(TypeError, match=r"^flag must be true or false, got 1$"):
        check_bool("flag", 1, spelling=("true", "false"))
    x = torch.arange(3)
    assert check_real_tensor("x", x) is x
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, got list$"):
        check_real_tensor("x", [1])
    with pytest.raises(TypeError, match=r"^x must have a real dtype, got torch.complex64$"):
        check_real_tensor("x", torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize(
    ("size", "window", "stride"), [(83, 9, 1), (75, 10, 5), (66, 1, 5), (7, 7, 3)]
)
def test_valid_size_counts_the_window_positions(size, window, stride):
    positions = len(range(0, size - window + 1, stride))  # every start that fits
    assert valid_size(size, window, stride) == positions


def test_valid_hw_and_a_window_that_does_not_fit():
    assert valid_hw((83, 83), (9, 9)) == (75, 75)
    assert valid_hw((75, 70), (10, 10), (5, 5)) == (14, 13)
    with pytest.raises(ValueError, match="window must be at most size 4, got 5"):
        valid_size(4, 5)
