"""Pointwise nonlinearities of the lecture: rectification ``|x|`` and ReLU ``max(0, x)``.

Both keep the shape of their input (any shape; ``(N, C, H, W)`` in the network) and its
dtype. Derivatives, as autograd computes them:

- ``rectify``: ``d|x|/dx = sign(x)``: 1 for ``x > 0``, -1 for ``x < 0``, and **0 at
  ``x = 0``** (the subgradient ``torch.abs`` picks);
- ``relu``: 1 for ``x > 0``, 0 for ``x < 0``, and **0 at ``x = 0``**.
"""

from __future__ import annotations

import torch

__all__ = ["rectify", "relu"]


def _check_real_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must have a real dtype, got {x.dtype}")
    return x


def rectify(x: torch.Tensor) -> torch.Tensor:
    """Rectification, ``x_ijk -> |x_ijk|``; same shape and dtype; derivative 0 at 0."""
    return torch.abs(_check_real_tensor("x", x))


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU, ``x_ijk -> max(0, x_ijk)``; same shape and dtype; derivative 0 at 0."""
    return torch.relu(_check_real_tensor("x", x))
