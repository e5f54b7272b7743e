"""Pooling, subsampling and the fused pool-at-kept-points, against the lecture's reference."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from cnnkit import reference
from cnnkit.kernels import pooling
from cnnkit.ops.pooling import pool2d, pool_subsample2d, subsample2d

KINDS = ("max", "avg", "lp")


def _distinct(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """Random values with no two equal (a permutation, scaled), so max has no ties."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return (torch.randperm(n, generator=g).to(dtype) / n + 0.1).reshape(shape)


def _reference_pool(x: torch.Tensor, kind: str, window: int, stride: int, p: float) -> np.ndarray:
    """reference.pool_2d map by map over an (N, C, H, W) tensor."""
    arr = x.detach().double().numpy()
    with np.errstate(invalid="ignore"):  # negative ** fraction is NaN, as in torch
        return np.stack(
            [
                np.stack([reference.pool_2d(m, kind, window, stride, p) for m in image])
                for image in arr
            ]
        )


# --- each op against the reference --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("window", "stride"), [(1, 1), (3, 1), (4, 1), (3, 2), (4, 3), (2, 5)])
def test_pool2d_matches_reference(kind: str, window: int, stride: int) -> None:
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if kind == "lp":
        x = x.abs()
    for p in (1.0, 2.0, 3.0, 1.5) if kind == "lp" else (2.0,):
        got = pool2d(x, kind, window, stride, p)
        want = _reference_pool(x, kind, window, stride, p)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_rectangular_window_and_stride_match_sliding_windows(kind: str) -> None:
    x = torch.rand(2, 2, 10, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    window, stride, p = (3, 5), (2, 3), 3.0
    got = pool2d(x, kind, window, stride, p).numpy()
    blocks = sliding_window_view(x.numpy(), window, axis=(2, 3))[:, :, :: stride[0], :: stride[1]]
    if kind == "max":
        want = blocks.max(axis=(-2, -1))
    elif kind == "avg":
        want = blocks.mean(axis=(-2, -1))
    else:
        want = (blocks**p).sum(axis=(-2, -1)) ** (1 / p)
    assert got.shape == (2, 2, 4, 3)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_lp_by_hand() -> None:
    x = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])  # (1, 2, 2): one 2x2 window
    assert pool2d(x, "lp", 2).item() == pytest.approx(5.0)
    assert pool2d(x, "lp", 2, p=1).item() == pytest.approx(7.0)
    assert pool2d(x, "lp", 2, p=3).item() == pytest.approx(91.0 ** (1 / 3))


def test_lp_is_a_norm_on_signed_input() -> None:
    # (sum |x|^p)^(1/p) whatever the signs: worked by hand on one 2x2 window...
    one = torch.tensor([[[-1.0, -2.0], [2.0, 0.0]]], dtype=torch.float64)  # (1, 2, 2)
    assert pool2d(one, "lp", 2, p=1).item() == pytest.approx(5.0)
    assert pool2d(one, "lp", 2, p=2).item() == pytest.approx(3.0)
    assert pool2d(one, "lp", 2, p=3).item() == pytest.approx(17.0 ** (1 / 3))
    assert pool2d(one, "lp", 2, p=1.5).item() == pytest.approx((1 + 2 * 2**1.5) ** (1 / 1.5))
    # ...and against the float64 reference, with its gradient
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for p in (1.0, 1.5, 2.0, 3.0):
        got = pool2d(x, "lp", 3, 1, p).numpy()
        np.testing.assert_allclose(got, _reference_pool(x, "lp", 3, 1, p), rtol=1e-12, atol=0)
        leaf = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t, p=p: pool2d(t, "lp", 3, 2, p), (leaf,))


def test_lp_stays_finite_for_large_p_and_a_window_of_zeros_has_a_zero_gradient() -> None:
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4)) * 4
    x[0, 0, :6, :6] = 0.0  # one window of zeros at stride 6
    for p in (8.0, 32.0, 64.0):
        y = pool2d(x, "lp", 6, 6, p)  # float32: 4^64 alone would overflow
        assert torch.isfinite(y).all()
        biggest = torch.nn.functional.max_pool2d(x.abs(), 6, 6)
        assert (y >= biggest * (1 - 1e-6)).all() and (y <= biggest * 36 ** (1 / p) * 1.0001).all()
    leaf = x.clone().requires_grad_()
    pool2d(leaf, "lp", 6, 6, 3.0).sum().backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[0, 0, :6, :6] == 0).all()


def test_subsample_matches_reference() -> None:
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    for stride in (1, 2, 3, 5, 11):
        got = subsample2d(x, stride).numpy()
        want = np.stack([np.stack([reference.subsample_2d(m, stride) for m in i]) for i in x])
        np.testing.assert_array_equal(got, want)


def test_subsample_rectangular_stride_and_view() -> None:
    x = torch.randn(3, 10, 9)
    y = subsample2d(x, (3, 4))
    assert torch.equal(y, x[:, [0, 3, 6, 9]][:, :, [0, 4, 8]])
    assert y.data_ptr() == x.data_ptr()  # a view, no copy


# --- the lecture's shapes ------------------------------------------------------------------


def test_lecture_shapes_and_kept_indices() -> None:
    x = torch.randn(1, 2, 75, 75)
    pooled = pool2d(x, "max", 10)
    assert pooled.shape == (1, 2, 66, 66)
    assert subsample2d(pooled, 5).shape == (1, 2, 14, 14)
    assert pool_subsample2d(x, "max", 10, 5).shape == (1, 2, 14, 14)

    rows = torch.arange(66.0).view(66, 1).expand(66, 66)  # value = row index
    kept = subsample2d(torch.stack([rows, rows.T]), 5)  # (2, 14, 14)
    lecture_one_based = [1 + 5 * i for i in range(14)]  # 1, 6, ..., 66
    assert lecture_one_based[-1] == 66
    assert kept[0, :, 0].tolist() == [i - 1 for i in lecture_one_based]
    assert kept[1, 0, :].tolist() == list(range(0, 66, 5))


# --- fused equals pool-then-subsample --------------------------------------------------------


def test_fused_size_formula_equals_subsampled_pooled_size() -> None:
    x = torch.zeros(1, 1, 30, 1)
    for height in range(1, 31):
        for window in range(1, height + 1):
            for stride in range(1, 9):
                fused = (height - window) // stride + 1
                assert fused == math.ceil((height - window + 1) / stride)
                if window in (1, 4) and stride in (1, 3):  # the ops follow the formula
                    column = x[:, :, :height]
                    assert pool_subsample2d(column, "max", (window, 1), stride).shape[2] == fused


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    p=st.sampled_from([0.5, 1.0, 2.0]),
    k_h=st.integers(1, 6),
    k_w=st.integers(1, 6),
    extra_h=st.integers(0, 14),
    extra_w=st.integers(0, 14),
    s_h=st.integers(1, 6),
    s_w=st.integers(1, 6),
    double=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_pool_then_subsample_exactly(
    kind, p, k_h, k_w, extra_h, extra_w, s_h, s_w, double, channels_last, seed
) -> None:
    dtype = torch.float64 if double else torch.float32
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, k_h + extra_h, k_w + extra_w, dtype=dtype, generator=g)
    if kind == "lp":
        x = x.abs()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.randn(3, dtype=dtype), torch.randn(3, dtype=dtype)
    for w, b in ((None, None), (weight, bias)):
        fused = pool_subsample2d(x, kind, (k_h, k_w), (s_h, s_w), p, weight=w, bias=b)
        unfused = subsample2d(pool2d(x, kind, (k_h, k_w), 1, p, weight=w, bias=b), (s_h, s_w))
        assert fused.shape == unfused.shape
        assert torch.equal(fused, unfused)


@pytest.mark.parametrize("p", [3.0, 1.5])
def test_fused_lp_other_p_within_one_ulp(p: float) -> None:
    # torch.pow's vectorised and scalar paths may round the root differently by one ulp.
    x = torch.rand(4, 5, 23, 31, generator=torch.Generator().manual_seed(4))
    fused = pool_subsample2d(x, "lp", 4, 3, p)
    unfused = subsample2d(pool2d(x, "lp", 4, 1, p), 3)
    assert ((fused - unfused).abs() <= torch.finfo(x.dtype).eps * unfused.abs()).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fused_gradient_equals_pool_then_subsample(kind: str) -> None:
    x = _distinct(2, 3, 17, 14)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    g = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    (pool_subsample2d(a, kind, (5, 3), (4, 5)) * g).sum().backward()
    (subsample2d(pool2d(b, kind, (5, 3)), (4, 5)) * g).sum().backward()
    if kind == "max":
        assert torch.equal(a.grad, b.grad)
    else:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-14, atol=1e-14)


# --- the lecture's max derivative and identity -----------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5, 9])
@pytest.mark.parametrize("seed", range(4))
def test_max_derivative_matches_lecture(n: int, seed: int) -> None:
    xs = _distinct(1, 1, 1, n, seed=seed).requires_grad_()  # one window of n values
    pool2d(xs, "max", (1, n)).sum().backward()
    values = xs.detach().flatten().numpy()
    want = [reference.max_derivative(values, i) for i in range(n)]
    assert xs.grad.flatten().tolist() == want
    assert sum(want) == 1.0


def test_max_derivative_of_torch_maximum_two_arguments() -> None:
    for x1, x2 in [(0.3, -1.2), (-2.0, 5.0), (1.0, 0.999)]:
        a = torch.tensor(x1, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(x2, dtype=torch.float64, requires_grad=True)
        torch.maximum(a, b).backward()
        assert a.grad.item() == reference.max_derivative(np.array([x1, x2]), 0)
        assert b.grad.item() == reference.max_derivative(np.array([x1, x2]), 1)


@pytest.mark.parametrize(("x1", "x2"), [(0.3, -1.2), (-2.0, 5.0), (4.0, 4.0), (-0.5, -0.5)])
def test_max_identity(x1: float, x2: float) -> None:
    window = torch.tensor([[[x1, x2]]], dtype=torch.float64)  # (1, 1, 2)
    pooled = pool2d(window, "max", (1, 2)).item()
    assert pooled == max(x1, x2)
    assert reference.max_identity(x1, x2) == pytest.approx(pooled, rel=1e-15)
    a, b = torch.tensor(x1), torch.tensor(x2)
    assert (0.5 * ((a - b).abs() + a + b)).item() == pytest.approx(pooled)


def test_ties_how_each_form_of_max_resolves_them() -> None:
    x1 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x2 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    # The lecture's strict rule gives 0 to both (not a valid split of the gradient).
    assert [reference.max_derivative(np.array([2.0, 2.0]), i) for i in (0, 1)] == [0.0, 0.0]
    # The identity 1/2(|x1-x2| + x1 + x2), with d|u|/du = 0 at 0, splits it in halves ...
    (0.5 * ((x1 - x2).abs() + x1 + x2)).backward()
    assert (x1.grad.item(), x2.grad.item()) == (0.5, 0.5)
    # ... and so does torch.maximum.
    x1.grad = x2.grad = None
    torch.maximum(x1, x2).backward()
    assert (x1.grad.item(), x2.grad.item()) == (0.5, 0.5)
    # Max pooling gives all of it to the first of the tied values.
    pair_window = torch.stack([x1, x2]).view(1, 1, 2)  # (1, 1, 2)
    x1.grad = x2.grad = None
    pool2d(pair_window, "max", (1, 2)).sum().backward()
    assert (x1.grad.item(), x2.grad.item()) == (1.0, 0.0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_tie_goes_to_first_in_row_major_order(channels_last: bool) -> None:
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    x[:, :, 0, 2] = 1.0
    x[:, :, 1, 0] = 1.0  # tied with (0, 2); (0, 2) comes first row by row
    x[:, :, 2, 2] = 1.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    pool2d(x, "max", 3).sum().backward()
    want = torch.zeros(3, 3, dtype=torch.float64)
    want[0, 2] = 1.0
    assert torch.equal(x.grad[0, 0], want)
    assert torch.equal(x.grad[0, 1], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_max_pool_runs_channels_last_and_equals_the_literal_form_on_ties(dtype) -> None:
    # The lecture's layer-2 shapes, with values in {0, 1, 2}: every window has ties.
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (3, 5, 75, 75), generator=g).to(dtype)
    assert x.numel() >= pooling._CHANNELS_LAST_MIN_NUMEL
    grad = torch.randn(3, 5, 14, 14, generator=g, dtype=dtype)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    fused = pool_subsample2d(a, "max", 10, 5)
    literal = torch.nn.functional.max_pool2d(b, 10, 1)[..., ::5, ::5]  # torch's own kernel
    assert fused.is_contiguous() and torch.equal(fused, literal)
    (fused * grad).sum().backward()
    (literal * grad).sum().backward()
    assert torch.equal(a.grad, b.grad)
    unbatched = pool_subsample2d(x[0], "max", 10, 5)
    assert torch.equal(unbatched, literal[0].detach())


def test_channels_last_copy_in_and_out_of_inference_mode() -> None:
    # A window of 5 at stride 2 is not a whole number of strides: no block pooling, so
    # inference takes the channels-last path too.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 30, 30, generator=g)
    with torch.inference_mode():
        first = pool_subsample2d(x, "max", 5, 2)
    leaf = x.clone().requires_grad_()
    again = pool_subsample2d(leaf, "max", 5, 2)
    again.sum().backward()
    assert torch.equal(again.detach(), first)
    reference_leaf = x.clone().requires_grad_()
    torch.nn.functional.max_pool2d(reference_leaf, 5, 2).sum().backward()
    assert torch.equal(leaf.grad, reference_leaf.grad)


@settings(max_examples=40, deadline=None)
@given(
    blocks_h=st.integers(1, 3),
    blocks_w=st.integers(1, 3),
    s_h=st.integers(1, 5),
    s_w=st.integers(1, 5),
    extra_h=st.integers(0, 12),
    extra_w=st.integers(0, 12),
    values=st.sampled_from(["random", "ties", "nan"]),
    double=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.usefixtures("fast_paths")
def test_max_pool_without_a_gradient_by_blocks_equals_torch(
    blocks_h, blocks_w, s_h, s_w, extra_h, extra_w, values, double, channels_last, seed
) -> None:
    window, stride = (blocks_h * s_h, blocks_w * s_w), (s_h, s_w)
    g = torch.Generator().manual_seed(seed)
    shape = (2, 16, max(16, window[0] + extra_h), max(16, window[1] + extra_w))
    dtype = torch.float64 if double else torch.float32
    if values == "ties":
        x = torch.randint(0, 3, shape, generator=g).to(dtype)
    else:
        x = torch.randn(shape, generator=g, dtype=dtype)
        if values == "nan":
            x.view(-1)[torch.randint(0, x.numel(), (5,), generator=g)] = float("nan")
    want = torch.nn.functional.max_pool2d(x, window, stride)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    calls = []
    block = pooling._block_max_pool
    with mock.patch.object(pooling, "_block_max_pool", lambda *a: calls.append(1) or block(*a)):
        with torch.no_grad():
            got = pool2d(x.contiguous(memory_format=layout), "max", window, stride)
        with torch.inference_mode():
            unbatched = pool2d(x[0], "max", window, stride)
    assert got.is_contiguous(memory_format=layout) and unbatched.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(unbatched, want[0], rtol=0, atol=0, equal_nan=True)
    assert len(calls) == (2 if s_h > 1 and s_w > 1 else 0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.usefixtures("fast_paths")
def test_block_max_pool_runs_only_when_no_gradient_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    block = pooling._block_max_pool
    monkeypatch.setattr(pooling, "_block_max_pool", lambda *a: calls.append(1) or block(*a))
    x = torch.randn(2, 4, 75, 75)
    pool_subsample2d(x, "max", 10, 5)  # x needs no gradient
    assert len(calls) == 1
    leaf = x.clone().requires_grad_()
    with torch.no_grad():
        pool_subsample2d(leaf, "max", 10, 5)
    assert len(calls) == 2
    out = pool_subsample2d(leaf, "max", 10, 5)  # recorded: the path with indices
    assert len(calls) == 2 and out.grad_fn is not None
    pool_subsample2d(x, "max", 10, 4)  # 10 is not a whole number of strides of 4
    pool2d(x, "max", 10, 1)  # stride 1: no blocks to take maxima of
    with forward_ad.dual_level():  # a forward-mode derivative: the path with indices
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        assert forward_ad.unpack_dual(pool_subsample2d(dual, "max", 10, 5)).tangent is not None
    assert len(calls) == 2
    pool_subsample2d(x.to(memory_format=torch.channels_last), "max", 10, 5)
    assert len(calls) == 3


def test_channels_last_max_pool_gradcheck_and_gradgradcheck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pooling, "_CHANNELS_LAST_MIN_NUMEL", 0)
    x = _distinct(2, 3, 9, 8, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pool2d(t, "max", (4, 3), (2, 3)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: pool2d(t, "max", (4, 3), (2, 3)), (x,))


def test_max_pool_on_a_plateau_credits_each_window_top_left() -> None:
    x = torch.full((1, 1, 6, 7), 3.0, dtype=torch.float64, requires_grad=True)
    pool2d(x, "max", (3, 2)).sum().backward()  # 4x6 windows, all tied everywhere
    want = torch.zeros(6, 7, dtype=torch.float64)
    want[:4, :6] = 1.0
    assert torch.equal(x.grad[0, 0], want)


# --- gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride", [1, (2, 3)])
def test_gradcheck_pool2d(kind: str, stride) -> None:
    x = _distinct(1, 2, 6, 7).requires_grad_()
    w = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)
    for p in (2.0, 1.5) if kind == "lp" else (2.0,):
        assert torch.autograd.gradcheck(lambda t, p=p: pool2d(t, kind, (3, 2), stride, p), (x,))
        assert torch.autograd.gradcheck(
            lambda t, ww, bb, p=p: pool2d(t, kind, 3, stride, p, weight=ww, bias=bb), (x, w, b)
        )


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_pool_subsample2d(kind: str) -> None:
    x = _distinct(1, 2, 9, 8, seed=5).requires_grad_()
    w = torch.tensor([1.5, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, ww: pool_subsample2d(t, kind, 3, (2, 3), 3.0, weight=ww), (x, w)
    )


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 1.5])
def test_lp_agrees_with_torch_lp_pool2d_on_non_negative_input(p: float) -> None:
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = x.abs().requires_grad_()
    ours = pool2d(x, "lp", (4, 3), (3, 2), p)
    theirs = torch.nn.functional.lp_pool2d(x, p, (4, 3), (3, 2))
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)
    g = torch.randn(ours.shape, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    (grad_theirs,) = torch.autograd.grad(theirs, x, g)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-14)


def test_gradgradcheck_lp() -> None:
    x = _distinct(1, 2, 5, 6, seed=7).requires_grad_()
    for p in (2.0, 3.0):
        assert torch.autograd.gradgradcheck(lambda t, p=p: pool2d(t, "lp", 3, 2, p), (x,))


def test_gradcheck_subsample2d() -> None:
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: subsample2d(t, (3, 2)), (x,))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_lp_gradient_at_all_zero_window_is_zero_not_nan(p: float) -> None:
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    x[0, 0, 4, 4] = 2.0  # only the last window is non-zero
    x.requires_grad_()
    out = pool2d(x, "lp", 2, 1, p)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert out[0, 0, :3, :3].eq(0).all()
    assert x.grad[0, 0, :3, :3].eq(0).all()
    assert x.grad[0, 0, 4, 4].item() == pytest.approx(1.0)


# --- layouts, ranks, dtypes -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_noncontiguous_and_dtypes(kind: str) -> None:
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(2, 3, 12, 10, dtype=dtype) + 0.1
        batched = pool2d(x, kind, 3, 2)
        assert batched.dtype == dtype
        assert torch.equal(pool2d(x[1], kind, 3, 2), batched[1])
        transposed = x.transpose(2, 3)  # (2, 3, 10, 12), not contiguous
        assert not transposed.is_contiguous()
        assert torch.equal(
            pool2d(transposed, kind, (3, 4), 1),
            pool2d(transposed.contiguous(), kind, (3, 4), 1),
        )
        assert torch.equal(subsample2d(x[0], 3), subsample2d(x, 3)[0])


# --- errors ---------------------------------------------------------------------------------


def test_bad_arguments() -> None:
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(
        ValueError, match=r"window \(10, 10\) is larger than the input map \(6, 6\)"
    ):
        pool2d(x, "max", 10)
    with pytest.raises(ValueError, match=r"window \(3, 7\) is larger"):
        pool_subsample2d(x, "avg", (3, 7), 2)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        pool2d(x, "max", 2, 0)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        subsample2d(x, 0)
    with pytest.raises(ValueError, match="kind must be one of 'max', 'avg', 'lp', got 'mean'"):
        pool2d(x, "mean", 2)
    with pytest.raises(ValueError, match="p must be a finite number > 0, got 0"):
        pool2d(x, "lp", 2, p=0)
    with pytest.raises(ValueError, match="p must be a finite number > 0, got -1"):
        pool2d(x, "lp", 2, p=-1.0)
    with pytest.raises(ValueError, match="p must be a finite number > 0, got inf"):
        pool2d(x, "lp", 2, p=math.inf)
    with pytest.raises(TypeError, match="window must be a positive integer or a pair"):
        pool2d(x, "max", 2.5)
    with pytest.raises(ValueError, match=r"x must have shape \(C, H, W\) or \(N, C, H, W\)"):
        pool2d(x[0, 0], "max", 2)
    with pytest.raises(TypeError, match="x must have a real floating-point dtype"):
        subsample2d(torch.ones(1, 4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"weight must have shape \(2,\), one value per map"):
        pool2d(x, "max", 2, weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        pool_subsample2d(x, "max", 2, 2, bias=torch.ones(2, 1))
