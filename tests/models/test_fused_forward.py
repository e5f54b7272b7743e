"""Network.forward fuses rectification into contrast normalization without changing it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnkit.models
from cnnkit.nn.normalization import ContrastNorm

pytestmark = pytest.mark.usefixtures("fast_paths")


def _unfused_forward(model, x):
    for stage in model.stages:
        x = nn.Sequential.forward(stage, x)  # every layer on its own
    return model.classifier(x)


def test_lecun83_forward_and_gradients_equal_the_layer_by_layer_network():
    torch.manual_seed(0)
    model = cnnkit.models.build(cnnkit.models.from_name("lecun83", classes=5)).double()
    x = torch.randn(2, 1, 83, 83, dtype=torch.float64)
    fused = model(x)
    literal = _unfused_forward(model, x)
    assert torch.equal(fused, literal)
    assert torch.equal(fused, model.intermediates(x)["classifier"])
    g_fused = torch.autograd.grad(fused.square().sum(), list(model.parameters()))
    g_literal = torch.autograd.grad(literal.square().sum(), list(model.parameters()))
    for a, b in zip(g_fused, g_literal, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_forward_rectified_equals_rectify_then_norm_and_fast_false_unfuses():
    layer = ContrastNorm(3).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(layer.forward_rectified(x), layer(x.abs()))
    torch.manual_seed(0)
    model = cnnkit.models.build(cnnkit.models.from_name("lecun83", classes=5))
    seen = []
    model.stage1.nonlin.register_forward_hook(lambda module, args, out: seen.append(out))
    model(torch.randn(1, 1, 83, 83))
    assert seen == []  # fused: the rectification ran inside the normalization
    model.stage1.fast = False
    model(torch.randn(1, 1, 83, 83))
    assert len(seen) == 1 and (seen[0] >= 0).all()
