"""SubtractiveNorm, DivisiveNorm and ContrastNorm: thin modules over the ops."""

from __future__ import annotations

import pytest
import torch

from cnnkit.nn.normalization import ContrastNorm, DivisiveNorm, SubtractiveNorm
from cnnkit.ops.normalization import (
    contrast_norm,
    divisive_norm,
    gaussian_window,
    subtractive_norm,
)

MODULES = [SubtractiveNorm, DivisiveNorm, ContrastNorm]
NON_DEFAULT = [
    {},
    {"window": 5},
    {"sigma": 0.8},
    {"border": "zero"},
    {"border": "reflect", "window": 5},
    {"threshold": 0.5},
    {"threshold": 0.0, "floor": 2.0},
]


def _function_call(cls, x, window, kwargs):
    border = kwargs.get("border", "renormalize")
    if cls is SubtractiveNorm:
        return subtractive_norm(x, window, border)
    fn = divisive_norm if cls is DivisiveNorm else contrast_norm
    return fn(x, window, kwargs.get("threshold", "mean"), border, kwargs.get("floor", 1e-4))


CASES = [
    pytest.param(cls, kwargs, id=f"{cls.__name__}-{kwargs}")
    for cls in MODULES
    for kwargs in NON_DEFAULT
    if cls is not SubtractiveNorm or not ({"threshold", "floor"} & kwargs.keys())
]


@pytest.mark.parametrize(("cls", "kwargs"), CASES)
def test_module_equals_function_and_keywords_reach_it(cls, kwargs):
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    module = cls(4, **kwargs).double()
    size = kwargs.get("window", 9)
    window = gaussian_window(size, kwargs.get("sigma", size / 4), 4, dtype=torch.float64)
    assert torch.equal(module.window, window)
    expected = _function_call(cls, x, window, kwargs)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-12)
    if kwargs:  # the setting changes the output: it reached the computation
        default = cls(4).double()(x)
        assert not torch.allclose(module(x), default)


@pytest.mark.parametrize("cls", MODULES)
def test_window_is_a_buffer_not_a_parameter(cls):
    module = cls(64)
    assert list(module.parameters()) == []
    assert module.window.shape == (64, 9, 9) and module.window.dtype == torch.float32
    assert not module.window.requires_grad
    assert list(module.state_dict()) == ["window"]
    assert module.sigma == 2.25  # window / 4
    assert module.double().window.dtype == torch.float64


@pytest.mark.parametrize("cls", MODULES)
def test_a_wider_dtype_recomputes_the_gaussian_but_keeps_a_changed_window(cls):
    module = cls(3, window=5).double()
    # not the float32 window widened: that one is not separable to float64 precision
    exact = gaussian_window(5, 1.25, 3, dtype=torch.float64)
    assert torch.equal(module.window, exact)
    assert not torch.equal(gaussian_window(5, 1.25, 3).double(), exact)
    assert torch.equal(module.float().window, gaussian_window(5, 1.25, 3))
    changed = cls(3, window=5)
    with torch.no_grad():
        changed.window[0, 2, 2] += 0.25
    kept = changed.window.double()
    assert torch.equal(changed.double().window, kept)


@pytest.mark.parametrize("cls", MODULES)
def test_lecture_shapes_and_unbatched(cls):
    module = cls(256)  # layer 3: 256 maps of 6x6 under a 9x9 window
    x = torch.randn(2, 256, 6, 6)
    y = module(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(module(x[1]), y[1])


def test_extra_repr_shows_only_non_defaults():
    assert repr(ContrastNorm(64)) == "ContrastNorm(64)"
    assert repr(SubtractiveNorm(3, sigma=2.25)) == "SubtractiveNorm(3)"
    assert repr(DivisiveNorm(8, window=7)) == "DivisiveNorm(8, window=7)"
    module = ContrastNorm(64, window=5, sigma=1.0, border="zero", threshold=0.5, floor=1e-3)
    assert repr(module) == (
        "ContrastNorm(64, window=5, sigma=1.0, border='zero', threshold=0.5, floor=0.001)"
    )


def test_gradient_reaches_input_only():
    module = ContrastNorm(3, window=3).double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), fast_mode=True)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ContrastNorm(0), ValueError, "maps must be a positive integer, got 0"),
        (lambda: ContrastNorm(4, window=8), ValueError, "window must be odd .* got 8"),
        (lambda: SubtractiveNorm(4, sigma=-1.0), ValueError, "sigma must be a finite number > 0"),
        (
            lambda: DivisiveNorm(4, border="wrap"),
            ValueError,
            "border must be one of 'renormalize', 'zero', 'reflect', got 'wrap'",
        ),
        (
            lambda: ContrastNorm(4, threshold="max"),
            ValueError,
            "threshold must be 'mean' or a number >= 0, got 'max'",
        ),
        (lambda: DivisiveNorm(4, floor=0), ValueError, "floor must be a finite number > 0"),
        (
            lambda: ContrastNorm(4)(torch.randn(3, 6, 6)),
            ValueError,
            r"x must have 4 maps in dimension -3, got shape \(3, 6, 6\)",
        ),
        (
            lambda: ContrastNorm(2, border="reflect")(torch.randn(2, 6, 6)),
            ValueError,
            "border='reflect' needs a window no larger than the map, got a 9x9 window on 6x6",
        ),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
