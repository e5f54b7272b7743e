"""LocallyConnected2d: a separate kernel and bias at every output position."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit import reference, tables
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.nn.locally_connected import (
    LocallyConnected2d,
    locally_connected2d,
    untie_filter_banks,
)
from cnnkit.ops.table_conv import table_conv2d

TABLE = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0], [2, 2], [1, 2]])  # 3 -> 3 maps, 6 rows


def by_input_then_output(table):
    """The permutation putting a table's rows in the layer's order."""
    return torch.tensor(sorted(range(len(table)), key=lambda r: tuple(table[r].tolist())))


def loop_reference(x, weight, bias, table, stride=(1, 1)):
    """Every position, every row, written out: the definition of the layer."""
    out_h, out_w, _, kh, kw = weight.shape
    n_out = bias.shape[0]
    out = torch.zeros(x.shape[0], n_out, out_h, out_w, dtype=x.dtype)
    for p in range(out_h):
        for q in range(out_w):
            out[:, :, p, q] += bias[:, p, q]
            for r, (i, o) in enumerate(table.tolist()):
                patch = x[
                    :, i, p * stride[0] : p * stride[0] + kh, q * stride[1] : q * stride[1] + kw
                ]
                out[:, o, p, q] += (patch * weight[p, q, r]).sum((1, 2))
    return out


@pytest.mark.parametrize(
    ("in_maps", "out_maps", "kernel", "hw", "table", "stride", "out_hw"),
    [
        (1, 4, 5, (28, 28), None, 1, (24, 24)),
        (3, 2, (3, 2), (7, 6), None, 1, (5, 5)),
        (3, 3, 3, (8, 9), TABLE, 1, (6, 7)),
        (3, 3, 3, (8, 9), TABLE, (2, 3), (3, 3)),
    ],
)
def test_output_shape(in_maps, out_maps, kernel, hw, table, stride, out_hw):
    layer = LocallyConnected2d(in_maps, out_maps, kernel, hw, table=table, stride=stride)
    x = torch.randn(2, in_maps, *hw)
    assert layer(x).shape == (2, out_maps, *out_hw)
    assert layer(x[0]).shape == (out_maps, *out_hw)
    rows = in_maps * out_maps if table is None else len(table)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    assert layer.weight.shape == (*out_hw, rows, kh, kw)
    assert layer.bias.shape == (out_maps, *out_hw)


@pytest.mark.parametrize("stride", [(1, 1), (2, 1)])
@pytest.mark.parametrize("table", [None, TABLE], ids=["full", "table"])
def test_matches_loop_reference(table, stride):
    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 3, (3, 2), (7, 6), table=table, stride=stride).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    expected = loop_reference(x, layer.weight, layer.bias, layer.table, stride)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_hand_worked_case():
    # One 3x3 input, 2x2 kernels, 2x2 positions, each position with its own kernel.
    layer = LocallyConnected2d(1, 1, 2, (3, 3)).double()
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # picks x[0,0] = 1
        layer.weight[0, 1, 0] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # picks x[1,2] = 6
        layer.weight[1, 0, 0] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # 4+5+7+8 = 24
        layer.weight[1, 1, 0] = torch.tensor([[0.0, -1.0], [2.0, 0.0]])  # -6 + 2*8 = 10
        layer.bias.copy_(torch.tensor([[[0.5, 0.0], [0.0, -1.0]]]))
    expected = torch.tensor([[[[1.5, 6.0], [24.0, 9.0]]]], dtype=torch.float64)
    torch.testing.assert_close(layer(x), expected)


def test_tied_full_table_equals_conv2d_forward_and_backward():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, (3, 4)).double()
    layer = LocallyConnected2d.from_filter_bank(conv, (8, 9))
    x = torch.randn(4, 2, 8, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-12)
    grad_out = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    layer(x).backward(grad_out)
    conv(x).backward(grad_out)
    # The shared weight's gradient is the sum of the per-position gradients.
    summed = layer.weight.grad.sum((0, 1)).view(2, 3, 3, 4).transpose(0, 1)  # (out, in, kh, kw)
    torch.testing.assert_close(summed, conv.weight.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad.sum((1, 2)), conv.bias.grad, rtol=0, atol=1e-10)


def test_tied_table_equals_reference_table_correlation():
    torch.manual_seed(2)
    kernels = torch.randn(len(TABLE), 3, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    layer = LocallyConnected2d.from_convolution(kernels, bias, (6, 7), table=TABLE, in_maps=3)
    x = torch.randn(3, 6, 7, dtype=torch.float64)
    expected = reference.table_correlate_2d(x.numpy(), TABLE.numpy(), kernels.numpy(), bias.numpy())
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "table",
    [TABLE, tables.random(4, 5, 2, seed=3), tables.full(3, 2)],
    ids=["small", "random", "full"],
)
def test_tied_table_equals_table_conv2d_forward_and_backward(table):
    torch.manual_seed(7)
    n_in = int(table[:, 0].max()) + 1
    kernels = torch.randn(len(table), 3, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(int(table[:, 1].max()) + 1, dtype=torch.float64, requires_grad=True)
    layer = LocallyConnected2d.from_convolution(kernels, bias, (7, 6), table=table, in_maps=n_in)
    x = torch.randn(2, n_in, 7, 6, dtype=torch.float64)
    expected = table_conv2d(x, table, kernels, bias, method="dense")
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(expected)
    layer(x).backward(grad_out)
    expected.backward(grad_out)
    order = by_input_then_output(table)
    assert torch.equal(layer.table, table[order])
    torch.testing.assert_close(
        layer.weight.grad.sum((0, 1)), kernels.grad[order], rtol=0, atol=1e-10
    )
    torch.testing.assert_close(layer.bias.grad.sum((1, 2)), bias.grad, rtol=0, atol=1e-10)


def test_default_table_is_tables_full_sorted_by_input_map():
    conv_weight = torch.randn(3, 2, 3, 3)
    by_conv = LocallyConnected2d.from_convolution(conv_weight, None, 5)
    by_table = LocallyConnected2d.from_convolution(
        conv_weight.reshape(6, 3, 3), None, 5, table=tables.full(2, 3)
    )
    assert by_conv.table.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    torch.testing.assert_close(by_conv.weight, by_table.weight, rtol=0, atol=0)
    torch.testing.assert_close(by_conv.weight[2, 1, 4], conv_weight[1, 1], rtol=0, atol=0)
    assert torch.equal(LocallyConnected2d(2, 3, 3, 5).table, by_conv.table)


def test_lecture_stage_three_sized_table_equals_dense_convolution():
    # 64 -> 256 maps, each output reading 16 random inputs, 9x9 kernels on 14x14: 6x6 positions.
    table = tables.random(64, 256, 16)
    kernels = torch.randn(len(table), 9, 9)
    layer = LocallyConnected2d.from_convolution(kernels, torch.randn(256), (14, 14), table=table)
    assert layer.weight.shape == (6, 6, 4096, 9, 9)
    dense = torch.zeros(256, 64, 9, 9)
    dense[table[:, 1], table[:, 0]] = kernels
    x = torch.randn(2, 64, 14, 14)
    expected = F.conv2d(x, dense, layer.bias[:, 0, 0])
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("maps", "table"), [(2, None), (3, TABLE)], ids=["full", "table"])
def test_gradcheck(maps, table):
    torch.manual_seed(3)
    layer = LocallyConnected2d(maps, maps, 2, (3, 5), table=table, stride=(1, 2)).double()
    x = torch.randn(2, maps, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, weight, bias):
        return locally_connected2d(x, weight, bias, table, stride=(1, 2))

    assert torch.autograd.gradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("table", [None, TABLE], ids=["full", "table"])
def test_module_equals_function(table):
    layer = LocallyConnected2d(3, 3, 3, (6, 5), table=table)
    x = torch.randn(2, 3, 6, 5)
    expected = locally_connected2d(x, layer.weight, layer.bias, layer.table)
    torch.testing.assert_close(layer(x), expected)
    if table is None:
        torch.testing.assert_close(layer(x), locally_connected2d(x, layer.weight, layer.bias))
    no_bias = LocallyConnected2d(3, 3, 3, (6, 5), table=table, bias=False)
    expected = locally_connected2d(x, no_bias.weight, None, no_bias.table)
    torch.testing.assert_close(no_bias(x), expected)
    # Rows in another order, weights following them: the same function.
    shuffle = torch.randperm(no_bias.rows)
    expected = locally_connected2d(x, no_bias.weight[:, :, shuffle], None, no_bias.table[shuffle])
    torch.testing.assert_close(no_bias(x), expected)


def test_non_contiguous_input():
    layer = LocallyConnected2d(3, 3, 3, (6, 5), table=TABLE)
    x = torch.randn(2, 5, 6, 3).permute(0, 3, 2, 1)  # (N, C, H, W), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


def test_float32_default_and_dtype_argument():
    assert LocallyConnected2d(1, 2, 3, 5).weight.dtype == torch.float32
    assert LocallyConnected2d(1, 2, 3, 5, dtype=torch.float64).bias.dtype == torch.float64


def test_init_bound_follows_the_table_fan_in():
    torch.manual_seed(4)
    table = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1]])  # map 0 reads 3 inputs, map 1 one
    layer = LocallyConnected2d(3, 2, 3, (9, 9), table=table)
    bound_0, bound_1 = 1 / (3 * 9) ** 0.5, 1 / 9**0.5
    rows_0 = layer.weight[:, :, layer.table[:, 1] == 0]
    rows_1 = layer.weight[:, :, layer.table[:, 1] == 1]
    assert rows_0.abs().max() <= bound_0
    assert rows_0.abs().max() > 0.9 * bound_0
    assert rows_1.abs().max() > bound_0  # wider for the one-input map
    assert rows_1.abs().max() <= bound_1
    assert layer.bias[1].abs().max() <= bound_1
    assert layer.bias[0].abs().max() <= bound_0


def test_meta_device_counts_the_lecture_first_stage_without_allocating():
    layer = LocallyConnected2d(1, 64, 9, (83, 83), device="meta")
    assert layer.weight.is_meta
    assert layer.weight.shape == (75, 75, 64, 9, 9)
    assert layer.weight.numel() == 64 * 75 * 75 * 81 == 29_160_000
    assert layer.bias.numel() == 64 * 75 * 75


def test_extra_repr_shows_only_non_defaults():
    assert repr(LocallyConnected2d(1, 4, 5, 28)) == (
        "LocallyConnected2d(1->4, kernel 5x5, input 28x28, 24x24 positions)"
    )
    text = repr(LocallyConnected2d(3, 3, 3, (8, 9), table=TABLE, bias=False, stride=(2, 1)))
    assert text == (
        "LocallyConnected2d(3->3, kernel 3x3, input 8x9, 3x7 positions, stride 2x1, "
        "bias=False, table fan-in 2 (6 kernels))"
    )


def test_state_dict_holds_table_weight_and_bias_only():
    assert set(LocallyConnected2d(3, 3, 3, 6, table=TABLE).state_dict()) == {
        "table",
        "weight",
        "bias",
    }


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"table row 1 names input map 3, but only 3 input maps"):
        LocallyConnected2d(3, 1, 3, 6, table=torch.tensor([[0, 0], [3, 0]]))
    with pytest.raises(ValueError, match="table row 0 names output map 5, but only 3 output maps"):
        LocallyConnected2d(3, 3, 3, 6, table=torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="table gives output map 1 no input map"):
        LocallyConnected2d(3, 2, 3, 6, table=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match=r"table must have shape \(K, 2\)"):
        LocallyConnected2d(3, 3, 3, 6, table=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="table must have an integer dtype, got torch.float32"):
        LocallyConnected2d(3, 3, 3, 6, table=torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"kernel_size \(7, 7\) does not fit in input_hw \(6, 6\)"):
        LocallyConnected2d(1, 1, 7, 6)
    with pytest.raises(ValueError, match="in_maps must be a positive integer, got 0"):
        LocallyConnected2d(0, 1, 3, 6)
    with pytest.raises(TypeError, match="bias must be True or False, got 1"):
        LocallyConnected2d(1, 1, 3, 6, bias=1)
    layer = LocallyConnected2d(2, 1, 3, (6, 5))
    with pytest.raises(ValueError, match=r"x must have spatial size input_hw=\(6, 5\)"):
        layer(torch.randn(1, 2, 6, 6))
    with pytest.raises(ValueError, match="x must have 2 maps"):
        layer(torch.randn(1, 3, 6, 5))
    with pytest.raises(ValueError, match="weight has 4x3 positions, but a 3x3 kernel"):
        locally_connected2d(torch.randn(1, 2, 7, 5), layer.weight)
    with pytest.raises(ValueError, match="weight has K=6 kernels per position but table has 2"):
        locally_connected2d(torch.randn(1, 3, 8, 8), torch.randn(6, 6, 6, 3, 3), None, TABLE[:2])


def test_from_filter_bank_conv2d_with_stride_and_bad_padding():
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, stride=2).double()
    layer = LocallyConnected2d.from_filter_bank(conv, (9, 8))
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-12)
    assert layer.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="padding=0, got groups=1, dilation=.*padding=.1, 1."):
        LocallyConnected2d.from_filter_bank(nn.Conv2d(2, 3, 3, padding=1), (9, 8))
    with pytest.raises(TypeError, match="bank must be a FilterBank or an nn.Conv2d, got Linear"):
        LocallyConnected2d.from_filter_bank(nn.Linear(2, 3), (9, 8))


def test_untie_filter_banks_keeps_the_function_and_returns_the_layers():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 3, 2)), nn.Flatten()
    ).double()
    x = torch.randn(2, 1, 8, 7, dtype=torch.float64)
    before = model(x)
    layers = untie_filter_banks(model, x[:1])
    assert [type(m) for m in (model[0], model[2][0])] == [LocallyConnected2d] * 2
    assert layers == [model[0], model[2][0]]
    assert layers[1].input_hw == (6, 5)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)


def test_from_filter_bank_copies_a_table_bank():
    torch.manual_seed(8)
    bank = FilterBank(tables.random(4, 6, 2, seed=1), (3, 2), stride=(1, 2), in_maps=5).double()
    layer = LocallyConnected2d.from_filter_bank(bank, (7, 8))
    assert (layer.in_maps, layer.out_maps, layer.stride) == (5, 6, (1, 2))
    assert torch.equal(layer.table, bank.table[by_input_then_output(bank.table)])
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), bank(x), rtol=0, atol=1e-12)
    back = layer.to_filter_bank()
    assert (back.in_maps, back.stride, back.weight.dtype) == (5, (1, 2), torch.float64)
    torch.testing.assert_close(back(x), bank(x), rtol=0, atol=1e-12)
    same_rows = layer.to_filter_bank(table=bank.table)
    assert torch.equal(same_rows.table, bank.table)
    torch.testing.assert_close(same_rows.state_dict(), bank.state_dict(), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="table must hold the same 12 rows as layer.table"):
        layer.to_filter_bank(table=tables.full(1, 6))


def test_untie_filter_banks_replaces_filter_banks():
    torch.manual_seed(9)
    model = nn.Sequential(
        FilterBank(tables.full(1, 4), 5),
        nn.ReLU(),
        nn.AvgPool2d(2),
        FilterBank(tables.random(4, 6, 2), 3),
    ).double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    before = model(x)
    layers = untie_filter_banks(model, x[:1])
    assert [layer.input_hw for layer in layers] == [(16, 16), (6, 6)]
    assert isinstance(model[3], LocallyConnected2d) and model[3].rows == 12
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="model must contain filter banks, not be one"):
        untie_filter_banks(FilterBank(tables.full(1, 1), 3), x)


def test_untie_filter_banks_rejects_an_unreached_bank():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="filter bank 'unused' was not reached"):
        untie_filter_banks(Skips(), torch.randn(1, 1, 5, 5))
