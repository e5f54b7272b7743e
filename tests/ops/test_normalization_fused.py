"""The fused contrast normalization (one autograd node) equals its literal definition.

``contrast_norm`` and ``rectified_contrast_norm`` run a hand-written backward for
separable windows with equal map weights; these tests hold it to the float64 reference
(forward) and to autograd through the unfused ops (backward), and check second order.
The forward runs in the compiled kernel where it is built and in tensor operations
otherwise: the ``forward`` fixture runs each test both ways.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from cnnkit import reference
from cnnkit._native import native_ops
from cnnkit.kernels import normalization as fast
from cnnkit.ops.normalization import (
    _divide,
    _subtract,
    contrast_norm,
    gaussian_window,
    rectified_contrast_norm,
)

F64 = torch.float64
THRESHOLDS = ["mean", 0.3, 0.0]
BORDERS = ["renormalize", "zero", "reflect"]


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(params=["native", "eager"])
def forward(request, monkeypatch):
    """Which forward runs: the compiled kernel (skipped where it is not built) or eager."""
    if request.param == "eager":
        monkeypatch.setattr(fast, "_uses_native", lambda x: False)
    elif native_ops() is None:
        pytest.skip("the compiled kernels are not built here")
    return request.param


def _unfused(x, window, threshold, border, rectify):
    """Autograd through the small ops: ``_divide(_subtract(|x| or x))``."""
    a = x.abs() if rectify else x
    a = a.unsqueeze(0) if a.dim() == 3 else a
    y = _divide(_subtract(a, window, border), window, border, threshold, 1e-4)
    return y.squeeze(0) if x.dim() == 3 else y


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_rectified_contrast_norm_matches_reference(border, threshold, forward):
    x = _x((4, 9, 8))
    window = gaussian_window(5, 1.25, 4, dtype=F64)
    w = window.numpy()
    v = reference.subtractive_norm(np.abs(x.numpy()), w, border)
    expected = reference.divisive_norm(v, w, threshold, border, 1e-4)
    actual = rectified_contrast_norm(x, window, threshold, border)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("rectify", [False, True])
def test_fused_forward_and_backward_equal_the_unfused_ops(border, threshold, rectify, forward):
    x = _x((2, 5, 9, 8), seed=1).requires_grad_()
    window = gaussian_window(5, 1.3, 5, dtype=F64)
    op = rectified_contrast_norm if rectify else contrast_norm
    fused = op(x, window, threshold, border)
    literal = _unfused(x, window, threshold, border, rectify)
    torch.testing.assert_close(fused, literal, rtol=1e-13, atol=1e-14)  # sums in another order
    grad = _x(fused.shape, seed=2)
    (g_fused,) = torch.autograd.grad(fused, x, grad)
    (g_literal,) = torch.autograd.grad(literal, x, grad)
    torch.testing.assert_close(g_fused, g_literal, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("rectify", [False, True])
def test_fused_gradcheck_and_second_order(rectify, forward):
    x = _x((2, 3, 6, 5), seed=3).requires_grad_()
    window = gaussian_window(3, 0.8, 3, dtype=F64)
    op = rectified_contrast_norm if rectify else contrast_norm
    assert torch.autograd.gradcheck(lambda t: op(t, window), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t, window, 0.2), (x,))


def test_rectified_gradient_is_zero_where_x_is_zero_and_flat_image_is_finite(forward):
    x = _x((1, 3, 7, 7), seed=4)
    x[0, 1, 2, 3] = 0.0
    x.requires_grad_()
    window = gaussian_window(5, 1.25, 3, dtype=F64)
    (grad,) = torch.autograd.grad(rectified_contrast_norm(x, window).sum(), x)
    assert grad[0, 1, 2, 3] == 0.0
    flat = torch.full((2, 3, 6, 6), 2.0, dtype=F64, requires_grad=True)
    y = rectified_contrast_norm(flat, window)
    (g_flat,) = torch.autograd.grad(y, flat, torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(g_flat).all()
    assert torch.equal(y, torch.zeros_like(y))


def test_float32_follows_float64_and_unbatched_input(forward):
    x = _x((3, 4, 11, 10), seed=5)
    window = gaussian_window(9, 2.25, 4, dtype=F64)
    expected = rectified_contrast_norm(x, window)
    actual = rectified_contrast_norm(x.float(), window.float())
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rectified_contrast_norm(x[0], window), expected[0])


def test_bad_arguments_are_checked():
    window = gaussian_window(3, 1.0, 2, dtype=F64)
    with pytest.raises(ValueError, match="threshold must be 'mean'"):
        rectified_contrast_norm(_x((2, 4, 4)), window, threshold="median")
    with pytest.raises(ValueError, match="border"):
        rectified_contrast_norm(_x((2, 4, 4)), window, border="wrap")


# torch's own forward-mode formulas still go through torch.jit.script, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("threshold", ["mean", 0.3])
def test_forward_mode_derivative_equals_the_reverse_mode_one(rectify, threshold):
    """A forward-mode tangent gets the directional derivative that the fused op's
    backward gives: <J t, g> = <t, J^T g>."""
    x = _x((2, 3, 7, 6), seed=6)
    tangent, probe = _x(x.shape, seed=7), _x(x.shape, seed=8)
    window = gaussian_window(3, 0.9, 3, dtype=F64)
    op = rectified_contrast_norm if rectify else contrast_norm
    with forward_ad.dual_level():
        dual = op(forward_ad.make_dual(x, tangent), window, threshold)
        forward = forward_ad.unpack_dual(dual).tangent
    leaf = x.clone().requires_grad_()
    (backward,) = torch.autograd.grad(op(leaf, window, threshold), leaf, probe)
    torch.testing.assert_close((forward * probe).sum(), (tangent * backward).sum())
