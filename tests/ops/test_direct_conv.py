"""The compiled direct convolution equals the library's convolution (and the float64
referee) forward and backward, on the lecture's first filter bank and on odd shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit import reference, tables
from cnnkit._native import native_ops
from cnnkit.kernels.direct_conv import direct_conv2d, direct_conv2d_applies
from cnnkit.ops.table_conv import table_conv2d

pytestmark = [
    pytest.mark.usefixtures("fast_paths"),
    pytest.mark.skipif(native_ops() is None, reason="the compiled kernels are not built here"),
]

F64 = torch.float64
TOLERANCE = {F64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 2e-5}}


def _x(shape, dtype=F64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _compare(x, weight, bias, dtype):
    """Values and the three gradients against F.conv2d's, scaled by their largest."""
    x, weight = x.requires_grad_(), weight.requires_grad_()
    inputs = [x, weight] + ([bias.requires_grad_()] if bias is not None else [])
    fast = direct_conv2d(x, weight, bias)
    plain = F.conv2d(x, weight, bias)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, **TOLERANCE[dtype])
    grad = _x(plain.shape, dtype, seed=9)
    for got, want in zip(
        torch.autograd.grad(fast, inputs, grad),
        torch.autograd.grad(plain, inputs, grad),
        strict=True,
    ):
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_the_lecture_first_filter_bank(dtype) -> None:
    x, weight, bias = _x((3, 1, 83, 83), dtype), _x((64, 1, 9, 9), dtype, 1), _x(64, dtype, 2)
    assert direct_conv2d_applies(x, weight, bias)
    _compare(x, weight, bias, dtype)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    "x_shape, weight_shape",
    [
        ((1, 1, 9, 9), (16, 1, 9, 9)),  # one image, one output pixel
        ((2, 3, 13, 11), (32, 3, 4, 2)),  # several input maps, odd sizes
        ((4, 2, 7, 30), (48, 2, 1, 7)),  # three vectors of outputs, a wide map
        ((1, 1, 20, 5), (80, 1, 3, 5)),  # five vectors, one output column
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_odd_shapes(x_shape, weight_shape, with_bias, dtype) -> None:
    bias = _x(weight_shape[0], dtype, 2) if with_bias else None
    _compare(_x(x_shape, dtype), _x(weight_shape, dtype, 1), bias, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_input_in_any_layout(layout) -> None:
    x = _x((2, 3, 12, 14))
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    x = x.transpose(2, 3).contiguous().transpose(2, 3) if layout == "transposed" else x
    _compare(x, _x((16, 3, 3, 3), seed=1), _x(16, seed=2), F64)


def test_the_float64_referee() -> None:
    """Against the lecture's formula in NumPy, map by map."""
    x, weight, bias = _x((2, 2, 10, 9)), _x((16, 2, 3, 4), seed=1), _x(16, seed=2)
    table = tables.full(2, 16)
    rows = weight[table[:, 1], table[:, 0]]  # row r: kernel from input table[r, 0]
    got = direct_conv2d(x, weight, bias)
    for n in range(2):
        want = reference.table_correlate_2d(x[n].numpy(), table.numpy(), rows.numpy(), bias.numpy())
        np.testing.assert_allclose(got[n].numpy(), want, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_gradgradcheck() -> None:
    x = _x((2, 2, 6, 7)).requires_grad_()
    weight, bias = _x((16, 2, 3, 2), seed=1).requires_grad_(), _x(16, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(direct_conv2d, (x, weight, bias))
    assert torch.autograd.gradgradcheck(direct_conv2d, (x, weight, bias))


def test_the_registered_operator_passes_opcheck() -> None:
    x, weight = _x((2, 1, 8, 9)).requires_grad_(), _x((16, 1, 3, 3), seed=1).requires_grad_()
    torch.library.opcheck(torch.ops.cnnkit.direct_conv2d, (x, weight, _x(16, seed=2)))
    torch.library.opcheck(torch.ops.cnnkit.direct_conv2d, (x, weight, None))


@pytest.mark.parametrize("mapped", ["x", "weight", "bias"])
def test_vmap_over_any_argument(mapped) -> None:
    x, weight, bias = _x((3, 2, 1, 8, 9)), _x((3, 16, 1, 3, 3), seed=1), _x((3, 16), seed=2)
    args = {"x": x, "weight": weight, "bias": bias}
    dims = tuple(0 if name == mapped else None for name in args)
    unmapped = {name: value if name == mapped else value[0] for name, value in args.items()}
    got = torch.vmap(direct_conv2d, in_dims=dims)(*unmapped.values())
    for i in range(3):
        entry = {n: v[i] if n == mapped else v for n, v in unmapped.items()}
        torch.testing.assert_close(got[i], F.conv2d(*entry.values()), rtol=1e-12, atol=1e-12)


def test_what_it_does_not_take() -> None:
    x = _x((1, 1, 9, 9))
    assert not direct_conv2d_applies(x, _x((12, 1, 3, 3)))  # outputs not in whole vectors
    assert not direct_conv2d_applies(x, _x((16, 1, 10, 3)))  # a kernel taller than the map
    assert not direct_conv2d_applies(x, _x((16, 1, 3, 3), torch.float32))  # mixed dtypes
    assert not direct_conv2d_applies(x.half(), _x((16, 1, 3, 3)).half())
    with pytest.raises(ValueError, match=r'method="direct" needs stride 1.*got stride \(2, 2\)'):
        table_conv2d(x, tables.full(1, 16), _x((16, 3, 3)), stride=2, method="direct")
    with pytest.raises(ValueError, match=r"12 output maps"):
        table_conv2d(x, tables.full(1, 12), _x((12, 3, 3)), method="direct")


def test_a_one_input_bank_takes_it_by_default(monkeypatch) -> None:
    """With measuring off, the lecture's first bank takes the compiled kernel."""
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    from cnnkit.kernels.table_conv import auto_method
    from cnnkit.tables import plan_table

    x = _x((2, 1, 83, 83), torch.float32)
    weight = _x((64, 9, 9), torch.float32)
    assert auto_method(x, weight, plan_table(tables.full(1, 64), 1), (1, 1)) == "direct"
    assert auto_method(x.double(), weight.double(), plan_table(tables.full(1, 64), 1), (2, 2)) != (
        "direct"
    )


def test_the_compiled_gradient_passes_opcheck() -> None:
    """Its two outputs (kernels' and biases' gradients) are tensors of their own."""
    grad = _x((2, 16, 6, 7)).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(native_ops().direct_conv2d_weight_grad, (grad, _x((2, 1, 8, 9)), 3, 3))


def test_auto_under_vmap_or_forward_mode_over_the_bias(monkeypatch) -> None:
    """A transformed bias sends "auto" to the plain path, not to this kernel."""
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    x, weight, biases = _x((2, 1, 8, 9)), _x((16, 3, 3), seed=1), _x((3, 16), seed=2)
    table = tables.full(1, 16)
    got = torch.vmap(lambda b: table_conv2d(x, table, weight, b))(biases)
    want = torch.stack([F.conv2d(x, weight.unsqueeze(1), b) for b in biases])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(biases[0], torch.ones(16, dtype=F64))
        tangent = forward_ad.unpack_dual(table_conv2d(x, table, weight, dual)).tangent
    torch.testing.assert_close(tangent, torch.ones_like(tangent))


def test_a_bias_of_another_shape_is_not_taken() -> None:
    x, weight = _x((1, 1, 9, 9)), _x((16, 1, 3, 3), seed=1)
    assert not direct_conv2d_applies(x, weight, _x((2, 8)))
    assert not direct_conv2d_applies(x, _x((16, 1, 0, 3)))
