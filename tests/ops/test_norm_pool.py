"""Rectification, contrast normalization and max pooling as one operator equal the three
layers in turn: the values bit for bit where the order of sums allows, the gradients to
float rounding, on the lecture's shapes and on odd ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnkit import tables
from cnnkit._native import native_ops
from cnnkit.kernels import norm_pool as fast
from cnnkit.models.stages import Stage
from cnnkit.nn import ContrastNorm, FilterBank, Pool, PoolSubsample, Rectify
from cnnkit.ops.normalization import (
    _divide,
    _subtract,
    gaussian_window,
    rectified_contrast_norm_max_pool,
)

pytestmark = [
    pytest.mark.usefixtures("fast_paths"),
    pytest.mark.skipif(native_ops() is None, reason="the compiled kernels are not built here"),
]

F64 = torch.float64


def _x(shape, dtype=F64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _three_layers(x, window, threshold, border, pool_window, pool_stride):
    """Autograd through the plain ops: ``max_pool(_divide(_subtract(|x|)))``."""
    a = x.abs().unsqueeze(0) if x.dim() == 3 else x.abs()
    y = _divide(_subtract(a, window, border), window, border, threshold, 1e-4)
    out = F.max_pool2d(y, pool_window, pool_stride)
    return out.squeeze(0) if x.dim() == 3 else out


def _compare(x, window, threshold, border, pool_window, pool_stride, tolerance):
    x = x.requires_grad_()
    fused = rectified_contrast_norm_max_pool(
        x, window, threshold, border, 1e-4, pool_window, pool_stride
    )
    literal = _three_layers(x, window, threshold, border, pool_window, pool_stride)
    torch.testing.assert_close(fused, literal, **tolerance)
    assert fused.stride() == literal.stride()  # the layout the layers give
    grad = _x(fused.shape, x.dtype, seed=5)
    (g_fused,) = torch.autograd.grad(fused, x, grad)
    (g_literal,) = torch.autograd.grad(literal, x, grad)
    scale = g_literal.abs().max().clamp_min(1e-30)  # a flat image has no gradient
    torch.testing.assert_close(g_fused / scale, g_literal / scale, **tolerance)


TOLERANCE = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-13},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_lecture_first_stage_shapes(dtype, layout) -> None:
    x = _x((2, 64, 75, 75), dtype, seed=1).contiguous(memory_format=layout)
    window = gaussian_window(9, 9 / 4, 64, dtype=dtype)
    assert fast.contrast_norm_max_pool_applies(x, window, "renormalize", (10, 10))
    _compare(x, window, "mean", "renormalize", (10, 10), (5, 5), TOLERANCE[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("border", ["renormalize", "zero", "reflect"])
@pytest.mark.parametrize("threshold", ["mean", 0.3, 0.0])
@pytest.mark.parametrize(
    ("shape", "pool_window", "pool_stride"),
    [
        ((1, 5, 17, 19), (4, 4), (2, 2)),  # one image, odd sizes, a tiled window
        ((3, 4, 13, 11), (3, 5), (2, 3)),  # rectangular window, untiled
        ((2, 3, 9, 9), (2, 2), (1, 1)),  # stride 1: overlapping windows everywhere
        ((2, 6, 8, 8), (8, 8), (8, 8)),  # one window per map
    ],
)
def test_odd_shapes_borders_and_thresholds(
    dtype, border, threshold, shape, pool_window, pool_stride, layout
) -> None:
    x = _x(shape, dtype, seed=2).contiguous(memory_format=layout)
    window = gaussian_window(5, 1.3, shape[1], dtype=dtype)
    assert fast.contrast_norm_max_pool_applies(x, window, border, pool_window)
    _compare(x, window, threshold, border, pool_window, pool_stride, TOLERANCE[dtype])


def test_non_contiguous_channels_last_and_unbatched_input() -> None:
    window = gaussian_window(5, 1.3, 4, dtype=F64)
    base = _x((2, 4, 15, 13), seed=3)
    transposed = base.transpose(-1, -2)  # neither layout: the layers run in turn
    assert not fast.contrast_norm_max_pool_applies(transposed, window, "zero", (4, 4))
    _compare(transposed, window, "mean", "zero", (4, 4), (3, 3), TOLERANCE[F64])
    channels_last = base.contiguous(memory_format=torch.channels_last)
    assert fast.contrast_norm_max_pool_applies(channels_last, window, "zero", (4, 4))
    _compare(channels_last, window, 0.2, "zero", (4, 4), (3, 3), TOLERANCE[F64])
    _compare(base[0], window, "mean", "renormalize", (3, 3), (2, 2), TOLERANCE[F64])


def test_ties_send_the_gradient_to_the_first_maximum() -> None:
    # Maps constant over blocks: every window holds ties, broken towards the first element.
    blocks = _x((2, 3, 4, 4), seed=4).repeat_interleave(3, -1).repeat_interleave(3, -2)
    window = gaussian_window(3, 0.8, 3, dtype=F64)
    _compare(blocks, window, "mean", "renormalize", (6, 6), (3, 3), TOLERANCE[F64])
    zeros = torch.zeros(1, 3, 9, 9, dtype=F64)  # y = 0 everywhere
    _compare(zeros, window, "mean", "renormalize", (3, 3), (3, 3), TOLERANCE[F64])
    for layout in LAYOUTS:
        tied = blocks.contiguous(memory_format=layout)
        _compare(tied, window, 0.1, "zero", (4, 5), (2, 3), TOLERANCE[F64])


def test_gradcheck_and_second_derivatives() -> None:
    x = _x((2, 3, 8, 7), seed=6).requires_grad_()
    window = gaussian_window(3, 0.9, 3, dtype=F64)

    def fused(t):
        return rectified_contrast_norm_max_pool(t, window, "mean", "renormalize", 1e-4, 3, 2)

    assert torch.autograd.gradcheck(fused, (x,))
    assert torch.autograd.gradgradcheck(fused, (x,))


def test_a_derivative_into_the_window_takes_the_plain_path() -> None:
    x = _x((1, 3, 8, 8), seed=7)
    window = gaussian_window(3, 0.9, 3, dtype=F64).requires_grad_()
    assert not fast.contrast_norm_max_pool_applies(x, window, "zero", (2, 2))
    out = rectified_contrast_norm_max_pool(x, window, 0.1, "zero", 1e-4, 2, 2)
    (g_window,) = torch.autograd.grad(out.sum(), window)
    expected = torch.autograd.grad(_three_layers(x, window, 0.1, "zero", 2, 2).sum(), window)
    torch.testing.assert_close(g_window, expected[0])


def test_a_pool_window_larger_than_the_map_is_refused_by_the_pooling() -> None:
    window = gaussian_window(3, 0.9, 2, dtype=F64)
    with pytest.raises(ValueError, match="larger than the input map"):
        rectified_contrast_norm_max_pool(_x((1, 2, 5, 5)), window, "mean", "zero", 1e-4, 6, 1)


def test_a_stage_runs_the_three_layers_as_one_operator(monkeypatch) -> None:
    torch.manual_seed(0)
    filters = FilterBank(tables.full(1, 6), 5)
    layers = [filters, Rectify(), ContrastNorm(6, 5), PoolSubsample("max", 4, 2)]
    stage = Stage(*layers).double()
    calls = []
    run = fast.contrast_norm_max_pool
    monkeypatch.setattr(fast, "contrast_norm_max_pool", lambda *a: calls.append(1) or run(*a))
    x = _x((3, 1, 20, 20), seed=8)
    fused = stage(x)
    assert calls  # the fused operator ran
    (g_fused,) = torch.autograd.grad(fused.square().sum(), stage[0].weight)
    stage.fast = False
    literal = stage(x)
    (g_literal,) = torch.autograd.grad(literal.square().sum(), stage[0].weight)
    torch.testing.assert_close(fused, literal, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g_fused, g_literal, rtol=1e-10, atol=1e-12)
    # A pooling with coefficients, or of another kind, runs on its own.
    for pool in (PoolSubsample("max", 4, 2, maps=6, trainable=True), Pool("avg", 3)):
        calls.clear()
        mixed = Stage(*layers[:3], pool).double()
        assert torch.equal(mixed(x), torch.nn.Sequential.forward(mixed, x)) and not calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_windows_holding_nan_pick_the_library_s_index(layout) -> None:
    x = _x((1, 4, 20, 20), seed=9)
    x[0, 1, 3, 4] = float("nan")  # through the image's mean, every y becomes NaN
    x = x.contiguous(memory_format=layout)
    window = gaussian_window(3, 0.8, 4, dtype=F64)
    pooled, index, *_ = torch.ops.cnnkit.contrast_norm_max_pool(
        x, window, "zero", True, False, 0.3, 1e-4, 4, 4, 2, 2, True
    )
    y = _divide(_subtract(x.abs(), window, "zero"), window, "zero", 0.3, 1e-4)
    expected, expected_index = F.max_pool2d(y, 4, 2, return_indices=True)
    assert pooled.isnan().all()  # each window's index: its last NaN, as the library's
    torch.testing.assert_close(pooled, expected, equal_nan=True, rtol=1e-12, atol=1e-13)
    assert torch.equal(index, expected_index)


def test_the_operator_under_vmap_equals_one_call_per_entry() -> None:
    x = _x((3, 2, 4, 12, 12), seed=10)  # a mapped dimension of 3 over batches of 2
    window = gaussian_window(3, 0.8, 4, dtype=F64)
    options = ("renormalize", True, True, 0.0, 1e-4, 4, 4, 2, 2, True)

    def pooled(t):
        return torch.ops.cnnkit.contrast_norm_max_pool(t, window, *options)[0]

    mapped = torch.func.vmap(pooled)(x)
    torch.testing.assert_close(mapped, torch.stack([pooled(t) for t in x]), rtol=0, atol=0)
    windows = torch.stack([window, window * 1.0, window])
    per_window = torch.func.vmap(
        lambda t, w: torch.ops.cnnkit.contrast_norm_max_pool(t, w, *options)[0]
    )(x, windows)
    torch.testing.assert_close(per_window, mapped, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_a_gradient_the_same_values_come_without_the_sums(layout) -> None:
    x = _x((2, 8, 16, 16), torch.float32, seed=11).contiguous(memory_format=layout)
    window = gaussian_window(5, 1.3, 8)
    with torch.no_grad():
        plain = rectified_contrast_norm_max_pool(x, window, "mean", "renormalize", 1e-4, 4, 2)
    recorded = rectified_contrast_norm_max_pool(
        x.requires_grad_(), window, "mean", "renormalize", 1e-4, 4, 2
    )
    assert torch.equal(plain, recorded.detach())
    options = ("renormalize", True, True, 0.0, 1e-4, 4, 4, 2, 2)
    with_sums = fast._forward(x.detach(), window, *options, with_sums=True)
    without = fast._forward(x.detach(), window, *options, with_sums=False)
    assert with_sums[2][:, 4].isfinite().all() and without[2][:, 4].isnan().all()
    torch.testing.assert_close(with_sums[2][:, 4], _y_sum(x, window), rtol=1e-5, atol=1e-5)
    for a, b in zip(with_sums[:2], without[:2], strict=True):
        assert torch.equal(a, b)


def _y_sum(x, window):
    """``sum_i y_i`` of the plain normalization, ``(N, H, W)``."""
    a = x.detach().abs()
    return _divide(_subtract(a, window, "renormalize"), window, "renormalize", "mean", 1e-4).sum(1)


def test_the_pooled_maps_may_change_in_place_before_the_backward() -> None:
    x = _x((2, 4, 12, 12), seed=12).requires_grad_()
    window = gaussian_window(3, 0.8, 4, dtype=F64)
    out = rectified_contrast_norm_max_pool(x, window, "mean", "renormalize", 1e-4, 4, 2)
    (g_fused,) = torch.autograd.grad(out.clone().relu_().sum() + out.mul_(2).sum(), x)
    literal = _three_layers(x, window, "mean", "renormalize", 4, 2)
    (g_literal,) = torch.autograd.grad(literal.clone().relu_().sum() + literal.mul_(2).sum(), x)
    torch.testing.assert_close(g_fused, g_literal, **TOLERANCE[F64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("width", [3, 7, 8, 9, 16, 17, 33])
def test_maps_narrower_than_a_vector_or_not_a_whole_number_of_them(dtype, width) -> None:
    # The compiled pooling runs along whole vectors of 2 to 16 lanes, the last one
    # overlapping the one before; widths around those sizes reach every branch.
    x = _x((2, 3, 11, width), dtype, seed=13)
    window = gaussian_window(3, 0.8, 3, dtype=dtype)
    pool_window = (4, min(3, width))
    pool_stride = (2, 1 if width < 8 else 2)
    _compare(x, window, 0.2, "zero", pool_window, pool_stride, TOLERANCE[dtype])
    values, index = torch.ops.cnnkit.max_pool2d(x, *pool_window, *pool_stride)
    expected, expected_index = F.max_pool2d(x, pool_window, pool_stride, return_indices=True)
    assert torch.equal(values, expected) and torch.equal(index, expected_index)


def test_the_registered_operators_pass_opcheck() -> None:
    window = gaussian_window(3, 0.8, 3, dtype=F64)
    options = ("zero", True, False, 0.2, 1e-4, 4, 4, 2, 2, True)
    for layout in LAYOUTS:
        x = _x((2, 3, 10, 10), seed=14).contiguous(memory_format=layout).requires_grad_()
        torch.library.opcheck(torch.ops.cnnkit.contrast_norm_max_pool, (x, window, *options))


def test_a_stage_fuses_a_stride_1_pool_and_leaves_a_pool_of_other_maps_to_refuse() -> None:
    torch.manual_seed(1)
    layers = [FilterBank(tables.full(1, 4), 5), Rectify(), ContrastNorm(4, 5), Pool("max", 3)]
    stage = Stage(*layers).double()
    for x in (_x((3, 1, 16, 16), seed=15), _x((1, 1, 16, 16), seed=16), _x((1, 16, 16), seed=17)):
        fused = stage(x)
        stage.fast = False
        literal = stage(x)
        stage.fast = True
        torch.testing.assert_close(fused, literal, rtol=1e-12, atol=1e-13)
    wrong = Stage(*layers[:3], PoolSubsample("max", 3, 2, maps=5)).double()
    with pytest.raises(ValueError, match="5"):
        wrong(_x((2, 1, 16, 16), seed=18))
