"""Pointwise nonlinearities of the lecture: rectification ``|x|`` and ReLU ``max(0, x)``.

Both keep the shape of their input (any shape; ``(N, C, H, W)`` in the network) and its
dtype. Derivatives, as autograd computes them:

- ``rectify``: ``d|x|/dx = sign(x)``: 1 for ``x > 0``, -1 for ``x < 0``, and **0 at
  ``x = 0``** (the subgradient ``torch.abs`` picks);
- ``relu``: 1 for ``x > 0``, 0 for ``x < 0``, and **0 at ``x = 0``**.
"""

from __future__ import annotations

import torch

from cnnkit._validation import check_real_tensor

__all__ = ["rectify", "relu"]


def rectify(x: torch.Tensor) -> torch.Tensor:
    """Rectification, ``x_ijk -> |x_ijk|``; same shape and dtype; derivative 0 at 0."""
    return torch.abs(check_real_tensor("x", x))


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU, ``x_ijk -> max(0, x_ijk)``; same shape and dtype; derivative 0 at 0."""
    return torch.relu(check_real_tensor("x", x))
