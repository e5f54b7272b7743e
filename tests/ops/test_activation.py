"""rectify and relu against the reference, with their derivatives at 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnkit import reference
from cnnkit.ops.activation import rectify, relu

OPS = {"rectify": (rectify, reference.rectify), "relu": (relu, reference.relu)}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", [(5,), (3, 4, 5), (2, 3, 4, 5)])
def test_matches_reference(name, shape):
    op, ref = OPS[name]
    x = torch.randn(shape, dtype=torch.float64)
    x.view(-1)[0] = 0.0
    y = op(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(y.numpy(), ref(x.numpy()))


def test_values_by_hand():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert rectify(x).tolist() == [2.0, 0.5, 0.0, 0.5, 2.0]
    assert relu(x).tolist() == [0.0, 0.0, 0.0, 0.5, 2.0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("rectify", [-1.0, 0.0, 1.0]), ("relu", [0.0, 0.0, 1.0])],
)
def test_derivative_including_zero(name, expected):
    x = torch.tensor([-1.5, 0.0, 1.5], requires_grad=True)
    OPS[name][0](x).sum().backward()
    assert x.grad.tolist() == expected  # 0 at x = 0 for both


@pytest.mark.parametrize("name", OPS)
def test_gradcheck(name):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_()  # keep clear of the kink at 0
    assert torch.autograd.gradcheck(OPS[name][0], (x,))


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_and_dtypes(name):
    op, _ = OPS[name]
    x = torch.randn(2, 3, 5, 4)
    t = x.transpose(-1, -2)
    assert torch.equal(op(t), op(t.contiguous()))
    for dtype in (torch.float16, torch.bfloat16, torch.int32):
        assert op(x.to(dtype)).dtype == dtype


@pytest.mark.parametrize("name", OPS)
def test_bad_arguments(name):
    op, _ = OPS[name]
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        op([1.0, -1.0])
    with pytest.raises(TypeError, match="x must have a real dtype, got torch.complex64"):
        op(torch.zeros(2, dtype=torch.complex64))
