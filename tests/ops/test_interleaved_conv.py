"""The compiled interleaved filter bank equals the plain path (one dense convolution) and
the float64 referee, forward and backward, on the lecture's second filter bank and on odd
shapes: a batch that does not fill its last block of images, one image, odd sizes,
uneven tables, channels-last input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit import reference, tables
from cnnkit._native import native_ops
from cnnkit.kernels.interleaved_conv import (
    interleaved_table_conv2d,
    interleaved_table_conv2d_applies,
)
from cnnkit.kernels.table_conv import auto_method
from cnnkit.ops.table_conv import table_conv2d
from cnnkit.tables import dense_weight, plan_table

pytestmark = [
    pytest.mark.usefixtures("fast_paths"),
    pytest.mark.skipif(native_ops() is None, reason="the compiled kernels are not built here"),
]

F64 = torch.float64
TOLERANCE = {F64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 2e-5}}


def _x(shape, dtype=F64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _conv(x, table, weight, bias):
    plan = plan_table(table, x.shape[1])
    return interleaved_table_conv2d(x, weight, bias, plan.table, plan.out_maps)


def _compare(x, table, kernel, dtype, with_bias=True):
    """Values and the three gradients against F.conv2d's with the dense weight, scaled by
    their largest (float32 sums of 1,296 products differ by their rounding)."""
    plan = plan_table(table, x.shape[1])
    x = x.requires_grad_()
    weight = _x((len(table), *kernel), dtype, 1).requires_grad_()
    bias = _x(plan.out_maps, dtype, 2).requires_grad_() if with_bias else None
    inputs = [x, weight] + ([bias] if with_bias else [])
    fast = _conv(x, table, weight, bias)
    plain = F.conv2d(x, dense_weight(weight, plan, x.shape[1]), bias)
    grad = _x(plain.shape, dtype, seed=9)
    for got, want in zip(
        (fast, *torch.autograd.grad(fast, inputs, grad)),
        (plain, *torch.autograd.grad(plain, inputs, grad)),
        strict=True,
    ):
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("batch", [16, 19])
def test_the_lecture_second_filter_bank(dtype, batch) -> None:
    """64 -> 256 maps, 16 inputs each, 9x9 kernels on 14x14; 19 images leave a block part
    empty (float32: 16 images a block; float64: 8)."""
    x = _x((batch, 64, 14, 14), dtype)
    weight = _x((4096, 9, 9), dtype)
    assert interleaved_table_conv2d_applies(x, weight, _x(256, dtype))
    _compare(x, tables.random(64, 256, 16), (9, 9), dtype)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    "x_shape, table, kernel",
    [
        ((1, 3, 9, 9), tables.full(3, 2), (9, 9)),  # one image, one output pixel
        ((3, 5, 13, 11), tables.random(5, 7, 2, seed=3), (4, 3)),  # odd sizes
        ((2, 6, 10, 12), tables.lenet5_c3(), (5, 5)),  # uneven fan-in
        ((5, 2, 8, 17), tables.full(2, 3), (2, 16)),  # the widest kernels it takes
        ((4, 4, 12, 7), tables.one_to_one(4), (1, 1)),  # one tap
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_odd_shapes(x_shape, table, kernel, with_bias, dtype) -> None:
    _compare(_x(x_shape, dtype), table, kernel, dtype, with_bias)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_input_in_any_layout(layout) -> None:
    x = _x((3, 4, 12, 14))
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    x = x.transpose(2, 3).contiguous().transpose(2, 3) if layout == "transposed" else x
    _compare(x, tables.random(4, 6, 2, seed=1), (3, 5), F64)


def test_the_float64_referee() -> None:
    """Against the lecture's formula in NumPy, image by image."""
    table = tables.random(6, 8, 3, seed=4)
    x, weight, bias = _x((3, 6, 10, 9)), _x((len(table), 3, 4), seed=1), _x(8, seed=2)
    got = _conv(x, table, weight, bias)
    for n in range(3):
        want = reference.table_correlate_2d(
            x[n].numpy(), table.numpy(), weight.numpy(), bias.numpy()
        )
        np.testing.assert_allclose(got[n].numpy(), want, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_gradgradcheck() -> None:
    table = tables.random(3, 4, 2, seed=5)
    x = _x((2, 3, 6, 7)).requires_grad_()
    weight = _x((len(table), 3, 2), seed=1).requires_grad_()
    bias = _x(4, seed=2).requires_grad_()

    def fn(x, weight, bias):
        return _conv(x, table, weight, bias)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_the_registered_operator_passes_opcheck(dtype) -> None:
    plan = plan_table(tables.random(4, 5, 2, seed=6), 4)
    x = _x((3, 4, 8, 9), dtype).requires_grad_()
    weight = _x((len(plan.table), 3, 3), dtype, 1).requires_grad_()
    op = torch.ops.cnnkit.interleaved_table_conv2d
    torch.library.opcheck(op, (x, weight, _x(5, dtype, 2), plan.table, plan.out_maps))
    torch.library.opcheck(op, (x, weight, None, plan.table, plan.out_maps))


@pytest.mark.parametrize("mapped", ["x", "weight", "bias"])
def test_vmap_over_any_argument(mapped) -> None:
    table = tables.random(3, 4, 2, seed=7)
    args = {
        "x": _x((2, 3, 3, 8, 9)),
        "weight": _x((2, len(table), 3, 3), seed=1),
        "bias": _x((2, 4), seed=2),
    }
    dims = tuple(0 if name == mapped else None for name in args)
    unmapped = {name: value if name == mapped else value[0] for name, value in args.items()}
    got = torch.vmap(lambda x, w, b: _conv(x, table, w, b), in_dims=dims)(*unmapped.values())
    plan = plan_table(table, 3)
    for i in range(2):
        x, w, b = (v[i] if n == mapped else v for n, v in unmapped.items())
        want = F.conv2d(x, dense_weight(w, plan, 3), b)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


def test_what_it_does_not_take() -> None:
    x, table = _x((2, 2, 9, 20)), tables.full(2, 3)
    assert not interleaved_table_conv2d_applies(x, _x((6, 3, 17)))  # wider than 16
    assert not interleaved_table_conv2d_applies(x, _x((6, 10, 3)))  # taller than the map
    assert not interleaved_table_conv2d_applies(x, _x((6, 3, 3), torch.float32))  # mixed dtypes
    assert not interleaved_table_conv2d_applies(x.half(), _x((6, 3, 3)).half())
    assert not interleaved_table_conv2d_applies(x, _x((6, 3, 3)), _x((3, 1)))  # bias not a vector
    with pytest.raises(ValueError, match=r'method="interleaved" cannot.*got stride \(2, 2\)'):
        table_conv2d(x, table, _x((6, 3, 3)), stride=2, method="interleaved")


def test_a_sparse_bank_with_a_batch_takes_it_by_default(monkeypatch) -> None:
    """With measuring off, the lecture's second bank takes the compiled kernel for a batch
    that fills its vectors, and not for one image."""
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    plan = plan_table(tables.random(64, 256, 16), 64)
    weight = _x((4096, 9, 9), torch.float32)
    x = _x((64, 64, 14, 14), torch.float32)
    assert auto_method(x, weight, plan, (1, 1)) == "interleaved"
    assert auto_method(x[:1], weight, plan, (1, 1)) != "interleaved"
    full = plan_table(tables.full(64, 64), 64)  # nothing to skip: the library's convolution
    assert auto_method(x, _x((4096, 9, 9), torch.float32), full, (1, 1)) != "interleaved"


def test_the_compiled_kernels_check_what_they_are_given() -> None:
    """Called directly, past the checks of table_conv2d: one-line errors, no stray reads."""
    ops = native_ops()
    x, weight = _x((2, 2, 9, 20)), _x((3, 3, 3))
    good = torch.tensor([[0, 0], [1, 0], [1, 1]])
    with pytest.raises(RuntimeError, match="names maps outside"):
        ops.interleaved_conv2d_forward(x, weight, None, torch.tensor([[0, 0], [-1, 0], [1, 1]]), 2)
    with pytest.raises(RuntimeError, match="one row per kernel"):
        ops.interleaved_conv2d_forward(x, weight, None, good[:2], 2)
    with pytest.raises(RuntimeError, match="at most 16 wide"):
        ops.interleaved_conv2d_forward(x, _x((3, 3, 17)), None, good, 2)
    grad = _x((2, 2, 7, 18))
    with pytest.raises(RuntimeError, match="names maps outside"):
        ops.interleaved_conv2d_input_grad(
            grad, weight, torch.tensor([[0, 0], [1, 5], [1, 1]]), 2, 9, 20
        )
    with pytest.raises(RuntimeError, match="one row per kernel"):
        ops.interleaved_conv2d_input_grad(grad, weight, good[:2], 2, 9, 20)
    with pytest.raises(RuntimeError, match="names maps outside"):
        ops.interleaved_conv2d_weight_grad(grad, x, torch.tensor([[0, 0], [2, 0], [1, 1]]), 3, 3)
