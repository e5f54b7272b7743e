"""The seam between the math and the speed work: one eligibility check, and every fast
path equal to the plain path, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from cnnkit import kernels, tables
from cnnkit._native import native_ops
from cnnkit.kernels import normalization as fast_norm
from cnnkit.kernels import pooling as fast_pool
from cnnkit.kernels.direct_conv import direct_conv2d_applies
from cnnkit.models import build, from_name
from cnnkit.ops import contrast_norm, gaussian_window, pool2d, rectified_contrast_norm
from cnnkit.ops.table_conv import METHODS, table_conv2d

pytestmark = pytest.mark.usefixtures("fast_paths")

F64 = torch.float64


def _x(shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _plain(monkeypatch, fn, *args):
    with monkeypatch.context() as patch:
        patch.setenv("CNNKIT_FAST", "0")
        return fn(*args)


def _forward_and_backward(fn, x):
    leaf = x.clone().requires_grad_()
    y = fn(leaf)
    probe = _x(y.shape, seed=5, dtype=y.dtype)
    (grad,) = torch.autograd.grad(y, leaf, probe)
    return y.detach(), grad


# ---------------------------------------------------------------------------------------
# The eligibility check
# ---------------------------------------------------------------------------------------


def test_fast_paths_are_allowed_for_ordinary_tensors_only(monkeypatch):
    x = torch.randn(2, 3)
    assert kernels.fast_path_allowed(x)
    assert not kernels.fast_path_allowed(x.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.fast_path_allowed(x)
    with forward_ad.dual_level():
        assert not kernels.fast_path_allowed(forward_ad.make_dual(x, torch.ones_like(x)))
    seen = []
    torch.func.vmap(lambda t: seen.append(kernels.fast_path_allowed(t)) or t)(x)
    torch.func.grad(lambda t: seen.append(kernels.fast_path_allowed(t)) or t.sum())(x)
    assert seen == [False, False]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not kernels.fast_path_allowed(fake)
        assert kernels.fast_path_allowed(fake, traced=True)  # a registered op has a fake
    monkeypatch.setenv("CNNKIT_FAST", "0")
    assert not kernels.fast_path_allowed(x)


def test_the_contrast_norm_operator_applies_to_float_maps_and_a_fixed_window():
    x = torch.randn(1, 3, 6, 6)
    window = gaussian_window(3, 1.0, 3)
    assert fast_norm.contrast_norm_applies(x, window)
    assert not fast_norm.contrast_norm_applies(x.to(torch.bfloat16), window)
    learned = window.clone().requires_grad_()
    assert not fast_norm.contrast_norm_applies(x, learned)
    with torch.no_grad():
        assert fast_norm.contrast_norm_applies(x, learned)


def test_max_pooling_variants_apply_to_large_cpu_maps():
    assert fast_pool.max_pool_applies(torch.randn(2, 4, 40, 40))
    assert not fast_pool.max_pool_applies(torch.randn(1, 2, 8, 8))  # a copy would cost more
    assert not fast_pool.max_pool_applies(torch.randn(2, 4, 40, 40, device="meta"))


def test_jit_trace_and_export_take_the_plain_path():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(kernels.fast_path_allowed(x, traced=True))
            return x * 2

    torch.jit.trace(Probe(), (torch.randn(2),), check_trace=False)
    torch.export.export(Probe(), (torch.randn(2),))
    assert seen == [False, False]


# ---------------------------------------------------------------------------------------
# Fast path == plain path
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("border", ["renormalize", "zero", "reflect"])
@pytest.mark.parametrize("threshold", ["mean", 0.3])
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_contrast_norm_fast_equals_plain(border, threshold, rectify, layout, monkeypatch):
    op = rectified_contrast_norm if rectify else contrast_norm
    x = _x((2, 5, 11, 9), seed=1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = _x((2, 5, 11, 18), seed=1)[..., ::2]
    window = gaussian_window(5, 1.3, 5, dtype=F64)

    def fn(t):
        return op(t, window, threshold, border)

    fast = _forward_and_backward(fn, x)
    plain = _plain(monkeypatch, _forward_and_backward, fn, x)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_contrast_norm_fast_equals_plain_in_float32_on_the_lecture_shapes(monkeypatch):
    x = _x((2, 64, 75, 75), seed=2, dtype=torch.float32)
    window = gaussian_window(9, 2.25, 64)

    def fn(t):
        return rectified_contrast_norm(t, window)

    fast = _forward_and_backward(fn, x)
    plain = _plain(monkeypatch, _forward_and_backward, fn, x)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_window_that_is_not_separable_takes_the_plain_sums_inside_the_operator(monkeypatch):
    window = torch.rand(3, 3, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    window = window / window.sum()
    x = _x((2, 3, 7, 8), seed=4)
    assert fast_norm._bands(window, "zero", 7, 8, x) is None

    def fn(t):
        return contrast_norm(t, window, "mean", "zero")

    fast = _forward_and_backward(fn, x)
    plain = _plain(monkeypatch, _forward_and_backward, fn, x)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "table",
    [
        tables.full(3, 4),
        tables.random(6, 8, 3, seed=1),
        tables.one_to_one(8),
        tables.lenet5_c3(),
        tables.full(1, 16),
        tables.random(4, 16, 2, seed=2),
    ],
    ids=["full", "random", "one_to_one", "lenet5_c3", "one_to_16", "random_to_16"],
)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "auto"])
@pytest.mark.parametrize("batch", [1, 3])
def test_table_conv_methods_equal_the_plain_path(table, method, batch, monkeypatch):
    if method == "depthwise" and len(table) != tables.n_outputs(table):
        pytest.skip("depthwise needs one input per output")
    c_in = tables.n_inputs(table)
    x = _x((batch, c_in, 11, 10), seed=6)
    dense = x.new_empty(()).expand(tables.n_outputs(table), c_in, 3, 3)
    if method == "direct" and not direct_conv2d_applies(x, dense):
        pytest.skip("direct needs output maps in whole vectors and the compiled kernels")
    if method == "interleaved" and native_ops() is None:
        pytest.skip("interleaved needs the compiled kernels")
    weight = _x((len(table), 3, 3), seed=7).requires_grad_()
    bias = _x((tables.n_outputs(table),), seed=8)

    def by(method):
        def fn(t):
            return table_conv2d(t, table, weight, bias, method=method)

        return fn

    y, grad = _forward_and_backward(by(method), x)
    plain_y, plain_grad = _plain(monkeypatch, _forward_and_backward, by("auto"), x)
    torch.testing.assert_close(y, plain_y, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("window, stride", [((10, 10), (5, 5)), ((3, 3), (1, 1)), ((5, 4), (2, 3))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_max_pool_fast_equals_plain(window, stride, layout, dtype, monkeypatch):
    x = _x((3, 5, 31, 29), seed=9, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def fn(t):
        return pool2d(t, "max", window, stride)

    fast = _forward_and_backward(fn, x)
    plain = _plain(monkeypatch, _forward_and_backward, fn, x)
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # the block path
        assert torch.equal(fn(x), _plain(monkeypatch, fn, x))
    assert torch.equal(fn(x[0]), fn(x)[0])  # unbatched


def test_a_network_fast_equals_plain_forward_and_backward(monkeypatch):
    torch.manual_seed(0)
    model = build(from_name("lecun83", classes=5)).double()
    x = _x((5, 1, 83, 83), seed=10)

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = run()
    plain, plain_grads = _plain(monkeypatch, run)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------
# No state between calls: a module's outputs follow its tensors
# ---------------------------------------------------------------------------------------


def test_outputs_follow_dtype_loaded_state_and_edits_through_data():
    torch.manual_seed(0)
    model = build(from_name("lecun83", classes=5)).eval()
    x = _x((3, 1, 83, 83), seed=11, dtype=torch.float32)
    with torch.no_grad():
        model(x)  # run once, so that anything kept from it would show
    model.to(F64)
    torch.manual_seed(1)
    fresh = build(from_name("lecun83", classes=5)).eval()
    fresh.load_state_dict(model.state_dict())
    fresh.to(F64)
    torch.testing.assert_close(model(x.double()), fresh(x.double()), rtol=0, atol=0)
    with torch.no_grad():
        model(x.double())
    model.stage2.filters.weight.data.mul_(-0.5)  # behind autograd's back
    model.stage1.norm.window.data.copy_(gaussian_window(9, 1.5, 64, dtype=F64))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x.double()), fresh(x.double()), rtol=0, atol=0)
    other = build(from_name("lecun83", classes=5)).double().eval()
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model(x.double()), other(x.double()), rtol=0, atol=0)


def test_a_window_set_by_hand_is_checked():
    from cnnkit.nn import ContrastNorm

    layer = ContrastNorm(3, 5)
    with pytest.raises(ValueError, match="window must sum to 1"):
        layer.window = 2 * gaussian_window(5, 1.0, 3)
    with pytest.raises(ValueError, match="window must have 3 maps"):
        layer.window = gaussian_window(5, 1.0, 4)
    layer.window = gaussian_window(5, 0.7, 3)
    torch.testing.assert_close(
        layer(_x((3, 6, 6), dtype=torch.float32)), layer(_x((3, 6, 6), dtype=torch.float32))
    )


@pytest.mark.parametrize("name", ["subtractive_norm", "divisive_norm", "contrast_norm"])
def test_every_normalization_rejects_a_window_that_does_not_sum_to_one(name):
    from cnnkit import ops

    op = getattr(ops, name)
    x = _x((2, 3, 6, 6))
    doubled = 2 * gaussian_window(3, 1.0, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"window must sum to 1 .*got a sum of 2\b"):
        op(x, doubled)
    nearly = gaussian_window(3, 1.0, 3, dtype=F64) * (1 + 1e-8)  # within 1e-6: accepted
    torch.testing.assert_close(op(x, nearly), op(x, gaussian_window(3, 1.0, 3, dtype=F64)))
    from cnnkit.ops.normalization import check_window

    for dtype in (torch.float16, torch.bfloat16):  # a few units of their rounding: accepted
        assert check_window(gaussian_window(9, 2.25, 64, dtype=dtype)) is not None
    with pytest.raises(ValueError, match="window must hold finite numbers"):
        op(x, torch.full((3, 3, 3), float("nan"), dtype=F64))
    # never inside a traced call: compiled, the same window is not read
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: op(t, doubled), fullgraph=True, backend="aot_eager")
    assert compiled(x).shape == x.shape


def test_max_pool_with_a_gradient_runs_the_registered_operator():
    from cnnkit._native import native_ops

    if native_ops() is None:
        pytest.skip("the compiled kernels are not built here")
    x = _x((2, 4, 40, 40)).requires_grad_()
    y = pool2d(x, "max", 10, 5)
    assert "cnnkit_max_pool2d" in type(y.grad_fn).__name__
    with torch.no_grad():  # nothing to record: the block maxima, no operator
        assert pool2d(x, "max", 10, 5).grad_fn is None
    y = pool2d(x, "max", (3, 4), (2, 3))  # not a whole number of strides: the operator too
    assert "cnnkit_max_pool2d" in type(y.grad_fn).__name__
