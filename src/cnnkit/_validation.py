"""Argument checks shared by every floor, so that every error reads the same way.

Each check raises ``ValueError`` (a value outside the rule) or ``TypeError`` (a value of
the wrong kind) with one message style, ``NAME must be RULE, got VALUE``, e.g.
``kernel_size must be a positive integer, got 0``. ``NAME`` is what the caller calls the
argument: a plain name (``stride``) or a dotted path into a spec (``pool.window``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ``>= minimum``, else raise.

    The rule reads ``a positive integer`` for ``minimum=1``, ``a non-negative integer``
    for 0 and ``an integer >= minimum`` otherwise. ``bool`` is not an integer here.
    """
    rule = {1: "a positive integer", 0: "a non-negative integer"}.get(
        minimum, f"an integer >= {minimum}"
    )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {rule}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {rule}, got {value}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1, else raise."""
    return check_int(name, value, 1)


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer >= 0, else raise."""
    return check_int(name, value, 0)


def check_number(
    name: str,
    value: Any,
    rule: str,
    ok: Callable[[float], bool],
    *,
    choices: Sequence[str] = (),
) -> Any:
    """Return ``value`` as a ``float`` if it is a finite real number for which ``ok`` holds.

    ``rule`` says in words what ``ok`` tests, for the message: ``check_number("momentum",
    m, "in [0, 1)", lambda v: 0 <= v < 1)`` raises ``momentum must be a finite number in
    [0, 1), got 1.0``. ``bool`` is not a number here; NaN and infinities never pass.
    ``choices`` are words accepted instead of a number and returned as they are
    (``threshold must be 'mean' or a number >= 0, got 'median'``).
    """
    words = "".join(f"{choice!r} or " for choice in choices)
    if isinstance(value, str) and choices:
        if value in choices:
            return value
        raise ValueError(f"{name} must be {words}a number {rule}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {words}a number {rule}, got {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {words}a finite number {rule}, got {value}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a ``float`` if it is a finite number > 0, else raise."""
    return check_number(name, value, "> 0", lambda v: v > 0)


def check_bool(name: str, value: Any, *, spelling: tuple[str, str] = ("True", "False")) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not 0 or 1), else raise.

    ``spelling`` names the two values in the message as the caller's reader writes them:
    a spec, read from TOML or JSON, passes ``("true", "false")``.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be {spelling[0]} or {spelling[1]}, got {value!r}")
    return value


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
    return is_ordinary(tensor)


def is_ordinary(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` itself is an ordinary tensor on a real device: not a subclass,
    a meta tensor or a ``torch.func`` transform's wrapper (what :func:`is_concrete` asks
    of the tensor, without its questions about the process)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type == "meta":
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def check_real_tensor(name: str, x: Any) -> torch.Tensor:
    """Require a tensor of real numbers: any dtype but a complex one."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must have a real dtype, got {x.dtype}")
    return x


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
