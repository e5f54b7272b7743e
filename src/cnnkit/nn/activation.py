"""Rectification and ReLU layers: thin modules over :mod:`cnnkit.ops.activation`.

No parameters; any input shape, the same shape out. Derivatives at 0 are 0 for both
(see :mod:`cnnkit.ops.activation`).
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.ops.activation import rectify, relu

__all__ = ["ReLU", "Rectify"]


class Rectify(nn.Module):
    """``x -> |x|`` (the lecture's rectification), elementwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rectify(x)


class ReLU(nn.Module):
    """``x -> max(0, x)``, elementwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu(x)
