"""Rectify and ReLU modules equal their functions."""

from __future__ import annotations

import torch

from cnnkit.nn.activation import Rectify, ReLU
from cnnkit.ops.activation import rectify, relu


def test_modules_equal_functions():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(Rectify()(x), rectify(x))
    assert torch.equal(ReLU()(x), relu(x))
    assert torch.equal(Rectify()(x[0]), x[0].abs())  # unbatched


def test_no_parameters_and_plain_repr():
    for module in (Rectify(), ReLU()):
        assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert repr(Rectify()) == "Rectify()" and repr(ReLU()) == "ReLU()"


def test_gradient_flows_through_modules():
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    (Rectify()(x) + ReLU()(x)).sum().backward()
    assert x.grad.tolist() == [-1.0, 0.0, 2.0]
