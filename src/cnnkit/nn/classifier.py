"""The classifier that ends a network: flatten, an optional hidden layer, a linear output."""

from __future__ import annotations

import torch
from torch import nn

from cnnkit._validation import check_choice, check_positive_int
from cnnkit.nn.activation import Rectify

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "abs": Rectify, "none": nn.Identity}


class Classifier(nn.Module):
    """Flatten ``(N, C, H, W)`` to ``(N, C·H·W)``, then ``[hidden -> activation ->] output``.

    Args:
        in_features: C·H·W of the maps it reads.
        classes: number of outputs (logits).
        hidden: width of an optional hidden layer (LeNet-5's F6 has 84).
        activation: ``"tanh"``, ``"relu"``, ``"abs"`` or ``"none"`` after the hidden layer.

    Weights are ``torch.nn.Linear``'s (uniform in ±1/sqrt(fan_in)).
    Output: ``(N, classes)`` logits.
    """

    def __init__(
        self, in_features: int, classes: int, hidden: int | None = None, activation: str = "tanh"
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("classes", classes)
        check_choice("activation", activation, tuple(_ACTIVATIONS))
        self.hidden: nn.Module | None = None
        self.activation: nn.Module | None = None
        width = in_features
        if hidden is not None:
            check_positive_int("hidden", hidden)
            self.hidden = nn.Linear(in_features, hidden)
            self.activation = _ACTIVATIONS[activation]()
            width = hidden
        self.output = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (N, C·H·W)
        if self.hidden is not None:
            x = self.activation(self.hidden(x))
        return self.output(x)
