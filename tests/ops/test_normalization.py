"""Local contrast normalization ops against the float64 reference, and their promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit import reference
from cnnkit.kernels import normalization as fast
from cnnkit.ops.normalization import (
    BORDERS,
    contrast_norm,
    divisive_norm,
    gaussian_window,
    subtractive_norm,
)

F64 = torch.float64


def _image(maps: int, height: int, width: int, seed: int = 0, batch: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    shape = (maps, height, width) if batch is None else (batch, maps, height, width)
    return torch.randn(shape, generator=gen, dtype=F64)


def _windows(maps: int, size: int) -> dict[str, torch.Tensor]:
    """A Gaussian, a rank-one window with unequal map weights, and a non-separable one."""
    gen = torch.Generator().manual_seed(1)
    gauss = gaussian_window(size, size / 4, maps, dtype=F64)
    map_weights = torch.linspace(0.5, 1.5, maps, dtype=F64)
    weighted = map_weights[:, None, None] * gauss[0]  # sums to maps * mean(map_weights)
    weighted = weighted / weighted.sum()
    general = torch.rand(maps, size, size, generator=gen, dtype=F64)
    general = general / general.sum()  # the lecture's sum of w = 1
    return {"gaussian": gauss, "weighted": weighted, "general": general}


def _ref_sub(x, w, border):
    return reference.subtractive_norm(x.numpy(), w.detach().numpy(), border)


def _ref_div(x, w, threshold, border, floor=1e-4):
    return reference.divisive_norm(x.numpy(), w.detach().numpy(), threshold, border, floor)


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------
# gaussian_window
# ---------------------------------------------------------------------------------------


def test_gaussian_window_equals_reference_and_sums_to_one():
    w = gaussian_window(9, 2.25, 4, dtype=F64)
    assert w.shape == (4, 9, 9)
    np.testing.assert_allclose(w.numpy(), reference.gaussian_window(9, 2.25, 4), atol=1e-15)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-14)
    assert torch.equal(w[0], w[3]) and torch.equal(w[0], w[0].T)
    assert w[0].argmax().item() == 4 * 9 + 4  # the peak is the centre pixel


def test_gaussian_window_dtype_and_device():
    w = gaussian_window(3, 1.0, 2, dtype=torch.float16, device="cpu")
    assert w.dtype == torch.float16 and w.device.type == "cpu" and w.is_contiguous()
    assert gaussian_window(3, 1.0, 2).dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 8}, ValueError, "size must be odd .* got 8"),
        ({"size": 0}, ValueError, "size must be a positive integer, got 0"),
        ({"sigma": 0.0}, ValueError, "sigma must be a finite number > 0, got 0.0"),
        ({"maps": 0}, ValueError, "maps must be a positive integer, got 0"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating-point torch.dtype"),
    ],
)
def test_gaussian_window_bad_arguments(kwargs, error, match):
    args = {"size": 5, "sigma": 1.0, "maps": 2} | kwargs
    with pytest.raises(error, match=match):
        gaussian_window(**args)


# ---------------------------------------------------------------------------------------
# Against the reference: every border, window kind and threshold
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("kind", ["gaussian", "weighted", "general"])
def test_subtractive_matches_reference(border, kind):
    x = _image(3, 6, 7)
    w = _windows(3, 5)[kind]
    _close(subtractive_norm(x, w, border), _ref_sub(x, w, border))


@pytest.mark.parametrize("border", ["renormalize", "zero"])
@pytest.mark.parametrize("kind", ["gaussian", "general"])
def test_window_larger_than_map_matches_reference(border, kind):
    x = _image(4, 6, 5, seed=2)  # the lecture's 6x6 maps under a 9x9 window, and narrower
    w = _windows(4, 9)[kind]
    _close(subtractive_norm(x, w, border), _ref_sub(x, w, border))
    _close(divisive_norm(x, w, "mean", border), _ref_div(x, w, "mean", border))


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("threshold", ["mean", 0.0, 0.6, 50.0])
@pytest.mark.parametrize("kind", ["gaussian", "weighted", "general"])
def test_divisive_matches_reference(border, threshold, kind):
    x = _image(3, 6, 7, seed=3)
    w = _windows(3, 5)[kind]
    _close(divisive_norm(x, w, threshold, border), _ref_div(x, w, threshold, border))


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("threshold", ["mean", 0.3])
def test_contrast_is_divisive_of_subtractive(border, threshold):
    x = _image(3, 7, 6, seed=4)
    w = _windows(3, 3)["gaussian"]
    expected = _ref_div(torch.from_numpy(_ref_sub(x, w, border)), w, threshold, border)
    _close(contrast_norm(x, w, threshold, border), expected)


def test_floor_matches_reference_when_it_wins():
    x = _image(2, 5, 5, seed=5) * 1e-3  # sigma ~ 1e-3, below a floor of 0.1
    w = _windows(2, 3)["gaussian"]
    for threshold in ("mean", 0.0):
        _close(
            divisive_norm(x, w, threshold, floor=0.1), _ref_div(x, w, threshold, "renormalize", 0.1)
        )


def test_batched_threshold_is_per_image():
    x = _image(3, 6, 6, seed=6, batch=3)
    x[1] *= 20.0  # a different contrast, hence a different mean sigma
    w = _windows(3, 5)["gaussian"]
    y = contrast_norm(x, w)
    for n in range(3):
        expected = _ref_div(
            torch.from_numpy(_ref_sub(x[n], w, "renormalize")), w, "mean", "renormalize"
        )
        _close(y[n], expected)


def test_gaussian_window_takes_the_separable_path():
    for dtype in (torch.float32, F64):
        for maps, size in ((64, 75), (256, 6)):
            x = torch.zeros(1, maps, size, size, dtype=dtype)
            window = gaussian_window(9, 2.25, maps, dtype=dtype)
            assert fast._bands(window, "zero", size, size, x) is not None
    general = _windows(3, 5)["general"]
    assert fast._bands(general, "zero", 6, 6, torch.zeros(1, 3, 6, 6, dtype=F64)) is None


# ---------------------------------------------------------------------------------------
# The lecture's formula by hand, and the border rules
# ---------------------------------------------------------------------------------------


def test_interior_pixels_follow_the_lecture_formula():
    x = _image(2, 9, 9, seed=7)
    w = gaussian_window(5, 1.3, 2, dtype=F64)
    j, k = 4, 4  # the 5x5 window around (4, 4) lies inside the 9x9 image
    mean = (w * x[:, j - 2 : j + 3, k - 2 : k + 3]).sum()
    v = subtractive_norm(x, w, "zero")
    sigma = (w * v[:, j - 2 : j + 3, k - 2 : k + 3] ** 2).sum().sqrt()
    for border in BORDERS:
        torch.testing.assert_close(subtractive_norm(x, w, border)[:, j, k], x[:, j, k] - mean)
        y = divisive_norm(v, w, threshold=0.01, border=border)  # sigma > 0.01: c loses
        torch.testing.assert_close(y[:, j, k], v[:, j, k] / sigma)


def test_zero_border_sees_zeros_outside():
    x = torch.ones(1, 1, 3, dtype=F64)
    w = torch.tensor([[[0.25, 0.5, 0.25]]], dtype=F64)
    # corners: 1 - (0.5 + 0.25), middle: 1 - 1
    torch.testing.assert_close(
        subtractive_norm(x, w, "zero"), torch.tensor([[[0.25, 0.0, 0.25]]], dtype=F64)
    )


def test_renormalize_divides_by_the_inside_mass():
    x = torch.tensor([[[1.0, 2.0, 4.0]]], dtype=F64)
    w = torch.tensor([[[0.25, 0.5, 0.25]]], dtype=F64)
    # left pixel: (0.5 * 1 + 0.25 * 2) / 0.75; middle: 0.25 + 1 + 1; right: (0.5 + 2) / 0.75
    means = torch.tensor([1.0 / 0.75, 2.25, 2.5 / 0.75], dtype=F64)
    torch.testing.assert_close(subtractive_norm(x, w)[0, 0], x[0, 0] - means)


def test_reflect_mirrors_without_repeating_the_edge():
    x = torch.tensor([[[1.0, 2.0, 4.0]]], dtype=F64)
    w = torch.tensor([[[0.25, 0.5, 0.25]]], dtype=F64)
    # left pixel sees (2, 1, 2), right pixel (2, 4, 2)
    means = torch.tensor([1.5, 2.25, 3.0], dtype=F64)
    torch.testing.assert_close(subtractive_norm(x, w, "reflect")[0, 0], x[0, 0] - means)


# ---------------------------------------------------------------------------------------
# Flat images, NaN, gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("maps", [1, 3, 64])
def test_constant_image_gives_zero(dtype, maps):
    # Exactly 0 under renormalize when the map sum is exact (as for integer pixel values).
    for value in (0.0, 3.0, 255.0, -17.25):
        x = torch.full((2, maps, 6, 7), value, dtype=dtype)
        w = gaussian_window(9, 2.25, maps, dtype=dtype)
        assert torch.equal(subtractive_norm(x, w), torch.zeros_like(x))
        assert torch.equal(contrast_norm(x, w), torch.zeros_like(x))
        # reflect sums the window's own weights, which add up to 1 only to rounding
        eps = torch.finfo(dtype).eps
        v = subtractive_norm(x, gaussian_window(5, 1.25, maps, dtype=dtype), "reflect")
        assert v.abs().max() <= 8 * eps * abs(value)


def test_constant_image_with_zero_border_is_darkened_only_near_the_border():
    x = torch.full((2, 9, 9), 5.0, dtype=F64)
    v = subtractive_norm(x, gaussian_window(3, 1.0, 2, dtype=F64), "zero")
    assert torch.allclose(v[:, 1:-1, 1:-1], torch.zeros(2, 7, 7, dtype=F64), atol=1e-14)
    assert (v[:, 0] > 0).all() and (v[:, :, -1] > 0).all()


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("threshold", ["mean", 0.0])
def test_flat_image_has_no_nan_in_value_or_gradient(border, threshold):
    for value in (0.0, 0.1, 7.0):
        x = torch.full((2, 3, 5, 5), value, requires_grad=True)
        y = contrast_norm(x, gaussian_window(3, 1.0, 3), threshold, border)
        y.backward(torch.randn_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        if border == "renormalize":  # rounding noise of v over the floor, at most
            assert y.abs().max() < 1e-2
        z = torch.zeros(3, 4, 4, dtype=F64, requires_grad=True)
        divisive_norm(z, gaussian_window(3, 1.0, 3, dtype=F64), threshold, border).sum().backward()
        torch.testing.assert_close(z.grad, torch.full_like(z, 1e4))  # d(z / floor)/dz


@settings(max_examples=25, deadline=None)
@given(
    scale=st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e6]),
    flat=st.booleans(),
    seed=st.integers(0, 2**16),
    border=st.sampled_from(BORDERS),
)
def test_finite_input_gives_finite_output_and_gradient(scale, flat, seed, border):
    x = _image(3, 5, 6, seed=seed).float() * scale
    if flat:
        x[:, :, :3] = 2.0  # a flat half
    x.requires_grad_(True)
    y = contrast_norm(x, gaussian_window(5, 1.25, 3), border=border)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


_GRAD_CASES = [(op, border) for op in ("subtractive", "divisive", "contrast") for border in BORDERS]


def _call(op: str, x: torch.Tensor, w: torch.Tensor, border: str, threshold="mean"):
    if op == "subtractive":
        return subtractive_norm(x, w, border)
    fn = divisive_norm if op == "divisive" else contrast_norm
    return fn(x, w, threshold, border)


@pytest.mark.parametrize(("op", "border"), _GRAD_CASES)
def test_gradcheck(op, border):
    x = _image(2, 4, 5, seed=8, batch=2).requires_grad_()
    windows = _windows(2, 3)
    assert torch.autograd.gradcheck(lambda t: _call(op, t, windows["gaussian"], border), (x,))
    for w in windows.values():  # fast mode: a random projection of the Jacobian
        for threshold in ("mean", 0.5):
            fn = lambda t, w=w, c=threshold: _call(op, t, w, border, c)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("op", ["subtractive", "divisive", "contrast"])
def test_gradcheck_window_and_second_order(op):
    x = _image(2, 3, 4, seed=9, batch=1).requires_grad_()
    w = gaussian_window(3, 1.0, 2, dtype=F64).requires_grad_()
    # the window stays one that sums to 1 as gradcheck perturbs it
    assert torch.autograd.gradcheck(lambda t, u: _call(op, t, u / u.sum(), "renormalize"), (x, w))
    w = w.detach()
    fn = lambda t: _call(op, t, w, "renormalize")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


def test_flat_region_gradient_matches_finite_differences():
    x = _image(2, 5, 5, seed=10, batch=1)
    x[..., :, :2] = 0.0  # zero variance on a strip: sigma is 0 there
    x.requires_grad_(True)
    w = gaussian_window(3, 1.0, 2, dtype=F64)
    assert torch.autograd.gradcheck(lambda t: divisive_norm(t, w, border="zero"), (x,))


# ---------------------------------------------------------------------------------------
# Every keyword reaches the computation
# ---------------------------------------------------------------------------------------


def test_border_changes_only_the_border_pixels():
    x = _image(2, 8, 8, seed=11)
    w = gaussian_window(3, 1.0, 2, dtype=F64)
    outs = {border: contrast_norm(x, w, threshold=0.1, border=border) for border in BORDERS}
    for a in BORDERS:
        for b in BORDERS:
            if a != b:
                assert not torch.allclose(outs[a][:, 0], outs[b][:, 0])
                # two 3x3 steps: pixels 2 away from the border never see it
                torch.testing.assert_close(outs[a][:, 2:-2, 2:-2], outs[b][:, 2:-2, 2:-2])


def test_threshold_keyword():
    v = subtractive_norm(_image(2, 6, 6, seed=12), gaussian_window(3, 1.0, 2, dtype=F64))
    w = gaussian_window(3, 1.0, 2, dtype=F64)
    torch.testing.assert_close(divisive_norm(v, w, threshold=1e3), v / 1e3)  # c wins everywhere
    by_mean, by_zero = divisive_norm(v, w, "mean"), divisive_norm(v, w, 0.0)
    assert not torch.allclose(by_mean, by_zero)
    assert (by_zero.abs() >= by_mean.abs() - 1e-12).all()  # a smaller c divides less
    torch.testing.assert_close(contrast_norm(v, w, threshold=1e3), subtractive_norm(v, w) / 1e3)


def test_floor_keyword():
    x = _image(2, 6, 6, seed=13)
    w = gaussian_window(3, 1.0, 2, dtype=F64)
    torch.testing.assert_close(divisive_norm(x, w, "mean", floor=1e3), x / 1e3)
    torch.testing.assert_close(divisive_norm(x, w, 0.0, floor=1e3), x / 1e3)
    torch.testing.assert_close(contrast_norm(x, w, floor=1e3), subtractive_norm(x, w) / 1e3)


def test_window_keyword():
    x = _image(2, 6, 6, seed=14)
    narrow, wide = gaussian_window(5, 0.5, 2, dtype=F64), gaussian_window(5, 3.0, 2, dtype=F64)
    for op in ("subtractive", "divisive", "contrast"):
        assert not torch.allclose(_call(op, x, narrow, "zero"), _call(op, x, wide, "zero"))


# ---------------------------------------------------------------------------------------
# Shapes, layouts, dtypes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["subtractive", "divisive", "contrast"])
def test_unbatched_and_non_contiguous_input(op):
    x = _image(3, 7, 6, seed=15, batch=2)
    w = gaussian_window(5, 1.25, 3, dtype=F64)
    batched = _call(op, x, w, "renormalize")
    assert batched.shape == x.shape
    torch.testing.assert_close(_call(op, x[1], w, "renormalize"), batched[1])
    transposed = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, new strides
    assert not transposed.is_contiguous()
    torch.testing.assert_close(_call(op, transposed, w, "renormalize"), batched)
    sliced = _image(3, 14, 6, seed=16, batch=2)[:, :, ::2]  # (2, 3, 7, 6), row stride 2
    expected = _call(op, sliced.contiguous(), w, "renormalize")
    torch.testing.assert_close(_call(op, sliced, w, "renormalize"), expected)
    channels_last = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(_call(op, channels_last, w, "renormalize"), batched)


@pytest.mark.parametrize("op", ["subtractive", "divisive", "contrast"])
def test_float32_follows_float64_and_window_dtype_follows_input(op):
    x = _image(3, 6, 6, seed=17, batch=2)
    w = gaussian_window(5, 1.25, 3, dtype=F64)
    y32 = _call(op, x.float(), w, "renormalize")  # float64 window, float32 input
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), _call(op, x, w, "renormalize"), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda x, w: subtractive_norm(x, w, "same"),
            ValueError,
            "border must be one of 'renormalize', 'zero', 'reflect', got 'same'",
        ),
        (
            lambda x, w: contrast_norm(x, gaussian_window(9, 2.0, 3), border="reflect"),
            ValueError,
            r"border='reflect' needs a window no larger than the map, got a 9x9 window on 6x6 maps",
        ),
        (
            lambda x, w: contrast_norm(x, gaussian_window(3, 1.0, 4)),
            ValueError,
            r"x must have 4 maps in dimension -3, got shape \(3, 6, 6\)",
        ),
        (
            lambda x, w: subtractive_norm(x, torch.ones(3, 4, 4) / 48),
            ValueError,
            r"window must have at least one map and odd sides .* got shape \(3, 4, 4\)",
        ),
        (
            lambda x, w: subtractive_norm(x, w * float("nan")),
            ValueError,
            "window must hold finite numbers, got NaN or infinity",
        ),
        (
            lambda x, w: subtractive_norm(x, w[0]),
            ValueError,
            r"window must have shape \(maps, size_h, size_w\), got \(3, 3\)",
        ),
        (
            lambda x, w: subtractive_norm(x, w.numpy()),
            TypeError,
            "window must be a torch.Tensor, got ndarray",
        ),
        (
            lambda x, w: subtractive_norm(x[0, 0], w),
            ValueError,
            r"x must have shape \(C, H, W\) or \(N, C, H, W\), got \(6,\)",
        ),
        (
            lambda x, w: subtractive_norm(x.long(), w),
            TypeError,
            "x must have a real floating-point dtype, got torch.int64",
        ),
        (
            lambda x, w: divisive_norm(x, w, threshold="median"),
            ValueError,
            "threshold must be 'mean' or a number >= 0, got 'median'",
        ),
        (
            lambda x, w: divisive_norm(x, w, threshold=-1.0),
            ValueError,
            "threshold must be 'mean' or a finite number >= 0, got -1.0",
        ),
        (
            lambda x, w: contrast_norm(x, w, threshold=True),
            TypeError,
            "threshold must be 'mean' or a number >= 0, got True",
        ),
        (
            lambda x, w: contrast_norm(x, w, floor=0.0),
            ValueError,
            "floor must be a finite number > 0, got 0.0",
        ),
    ],
)
def test_bad_arguments(call, error, match):
    x = torch.randn(3, 6, 6)
    w = gaussian_window(3, 1.0, 3)
    with pytest.raises(error, match=match):
        call(x, w)


def test_reflect_accepts_a_window_as_large_as_the_map():
    x = _image(2, 5, 5, seed=18)
    w = gaussian_window(5, 1.25, 2, dtype=F64)
    _close(subtractive_norm(x, w, "reflect"), _ref_sub(x, w, "reflect"))
    assert math.isfinite(contrast_norm(x, w, border="reflect").sum().item())


def test_an_edited_window_is_always_seen():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    window = gaussian_window(5, 1.25, 3, dtype=torch.float64)
    with torch.inference_mode():  # first computed here, then by a training step
        first = contrast_norm(x, window)
    leaf = x.clone().requires_grad_()
    contrast_norm(leaf, window).sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(contrast_norm(x, window), first, rtol=0, atol=0)
    with torch.no_grad():  # changed in place, still summing to 1
        window.copy_(gaussian_window(5, 0.8, 3, dtype=torch.float64))
    changed = contrast_norm(x, window)
    fresh = contrast_norm(x, window.clone())  # a window never seen before
    torch.testing.assert_close(changed, fresh, rtol=0, atol=1e-14)
    assert not torch.allclose(changed, first)
    window.data.copy_(gaussian_window(5, 2.0, 3, dtype=torch.float64))  # behind autograd's back
    torch.testing.assert_close(contrast_norm(x, window), contrast_norm(x, window.clone()))


def test_a_window_made_under_inference_mode_is_used_without_caching():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    with torch.inference_mode():
        window = gaussian_window(5, 1.25, 3, dtype=torch.float64)
        inside = contrast_norm(x, window)
    outside = contrast_norm(x, window)
    torch.testing.assert_close(outside, inside, rtol=0, atol=0)
