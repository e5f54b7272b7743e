"""Argument checks shared by every floor, so that every error reads the same way.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the argument,
the rule it broke and the value it received, e.g.
``kernel_size must be a positive integer, got 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a ``float`` if it is a finite number > 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming them all."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def pair(name: str, value: Any) -> tuple[int, int]:
    """Expand an int or a 2-sequence of positive ints to ``(height, width)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        check_positive_int(name, value)
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2:
        return (check_positive_int(name, value[0]), check_positive_int(name, value[1]))
    raise TypeError(f"{name} must be a positive integer or a pair of them, got {value!r}")


def is_concrete(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds values that may be read now: an ordinary tensor on a real
    device, outside any tracing, compiling, exporting or ``torch.func`` transform. Checks
    of values (a window's sum, say) run only then, never inside a traced call."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False  # inside FakeTensorMode: even a real tensor's ops give fake results
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type == "meta":
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def check_floating(name: str, x: Any) -> torch.Tensor:
    """Require a real floating-point tensor (float16/bfloat16/float32/float64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"{name} must have a real floating-point dtype, got {x.dtype}")
    return x


def check_maps(name: str, x: torch.Tensor, *, maps: int | None = None) -> bool:
    """Check a ``(C, H, W)`` or ``(N, C, H, W)`` tensor; return True if it is unbatched.

    ``maps``, when given, is the number of maps ``C`` the caller expects.
    """
    check_floating(name, x)
    if x.dim() not in (3, 4):
        raise ValueError(f"{name} must have shape (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    channels = x.shape[-3]
    if maps is not None and channels != maps:
        raise ValueError(
            f"{name} must have {maps} maps in dimension -3, got shape {tuple(x.shape)}"
        )
    return x.dim() == 3


def check_fraction(name: str, value: Any) -> float:
    """Return ``value`` as a ``float`` if it is a number strictly between 0 and 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1), got {value!r}")
    if not 0 < value < 1:  # also refuses NaN
        raise ValueError(f"{name} must be a number in (0, 1), got {value}")
    return float(value)
