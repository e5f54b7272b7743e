import pytest
import torch
from torch import nn

from cnnkit import tables
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.ops.table_conv import table_conv2d


def test_lecture_layer3_weights_and_shapes():
    bank = FilterBank(tables.random(64, 256, 16), 9)
    assert (bank.in_maps, bank.out_maps, bank.kernel_size) == (64, 256, (9, 9))
    assert bank.weight.shape == (4096, 9, 9)
    assert bank.bias.shape == (256,)
    assert sum(p.numel() for p in bank.parameters()) == 4096 * 81 + 256
    assert bank(torch.randn(2, 64, 14, 14)).shape == (2, 256, 6, 6)
    assert repr(bank) == "FilterBank(64->256, kernel 9x9, table fan-in 16 (4096 kernels))"


def test_lecture_layer1_shapes():
    bank = FilterBank(tables.full(1, 64), 9)
    assert sum(p.numel() for p in bank.parameters()) == 64 * 81 + 64
    assert bank(torch.randn(1, 83, 83)).shape == (64, 75, 75)
    assert repr(bank) == "FilterBank(1->64, kernel 9x9)"


@pytest.mark.parametrize("stride", [1, 2, (2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_module_equals_function(stride, bias):
    table = tables.lenet5_c3()
    bank = FilterBank(table, (5, 3), stride=stride, bias=bias).double()
    x = torch.randn(2, 6, 12, 11, dtype=torch.float64)
    expected = table_conv2d(x, table, bank.weight, bank.bias, stride)
    torch.testing.assert_close(bank(x), expected, rtol=0, atol=0)
    assert (bank.bias is None) == (not bias)


def test_kernel_size_int_or_pair():
    table = tables.one_to_one(2)
    assert FilterBank(table, 3).weight.shape == (2, 3, 3)
    assert FilterBank(table, (3, 5)).weight.shape == (2, 3, 5)
    assert FilterBank(table, [4, 2]).kernel_size == (4, 2)


def test_init_uses_each_outputs_own_fan_in():
    torch.manual_seed(0)
    table = tables.lenet5_c3()  # fan-in 3 for maps 0-5, 4 for 6-14, 6 for map 15
    bank = FilterBank(table, 5)
    bounds = {3: 1 / (3 * 25) ** 0.5, 4: 1 / (4 * 25) ** 0.5, 6: 1 / (6 * 25) ** 0.5}
    fan = tables.fan_in(table)
    for fan_in, bound in bounds.items():
        rows = fan[table[:, 1]] == fan_in
        spread = bank.weight[rows].abs().max().item()
        assert 0.9 * bound < spread <= bound  # fills its own range, not a wider or narrower one
        assert bank.bias[fan == fan_in].abs().max().item() <= bound
    # a 3-input output does not get the all-6-inputs bound (Torch7's real fan-in rule)
    assert bank.weight[fan[table[:, 1]] == 3].abs().max().item() > bounds[6]


def test_reset_parameters_redraws():
    bank = FilterBank(tables.random(4, 4, 2), 3)
    before = bank.weight.detach().clone()
    bank.reset_parameters()
    assert not torch.equal(before, bank.weight)


def test_extra_repr_shows_only_non_defaults():
    table = tables.lenet5_c3()
    assert (
        repr(FilterBank(table, 5)) == "FilterBank(6->16, kernel 5x5, table fan-in 3-6 (60 kernels))"
    )
    text = repr(FilterBank(table, (5, 3), stride=(2, 1), bias=False))
    assert (
        text
        == "FilterBank(6->16, kernel 5x3, stride 2x1, bias=False, table fan-in 3-6 (60 kernels))"
    )
    assert (
        repr(FilterBank(tables.full(2, 3), 3, stride=2)) == "FilterBank(2->3, kernel 3x3, stride 2)"
    )
    assert "table one-to-one (4 kernels)" in repr(FilterBank(tables.one_to_one(4), 3))


def test_table_is_a_saved_buffer_and_reloads():
    table = tables.random(8, 6, 3, seed=1)
    bank = FilterBank(table, 3)
    state = bank.state_dict()
    assert torch.equal(state["table"], table)
    other = FilterBank(table, 3)
    other.load_state_dict(state)
    x = torch.randn(1, 8, 7, 7)
    torch.testing.assert_close(other(x), bank(x))
    assert bank.double().table.dtype == torch.int64  # casting parameters leaves the table alone


def test_in_maps_beyond_the_table():
    bank = FilterBank(torch.tensor([[0, 0], [1, 1]]), 3, in_maps=4)
    assert bank.in_maps == 4
    assert bank(torch.randn(1, 4, 5, 5)).shape == (1, 2, 3, 3)
    assert repr(bank) == "FilterBank(4->2, kernel 3x3, table fan-in 1 (2 kernels))"
    full_of_three = FilterBank(tables.full(3, 2), 3, in_maps=4)
    assert repr(full_of_three) == "FilterBank(4->2, kernel 3x3, table fan-in 3 (6 kernels))"


def test_gradcheck_through_the_module(one_thread):
    bank = FilterBank(tables.random(3, 4, 2, seed=2), (2, 3)).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bank, (x,))
    bank(x).sum().backward()
    assert bank.weight.grad.shape == (8, 2, 3) and bank.bias.grad.shape == (4,)


def test_is_a_module_with_named_parameters():
    bank = FilterBank(tables.one_to_one(2), 3)
    assert isinstance(bank, nn.Module)
    assert [name for name, _ in bank.named_parameters()] == ["weight", "bias"]
    assert [name for name, _ in bank.named_buffers()] == ["table", "slot_rows", "slot_outputs"]
    assert list(bank.state_dict()) == ["weight", "bias", "table"]  # the plan is not saved


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (
            (torch.tensor([[0, 0], [70, 1]]), 3),
            {"in_maps": 64},
            ValueError,
            r"table row 1 names input map 70, but only 64 input maps exist \(0..63\)",
        ),
        (
            (torch.tensor([[0, 0], [0, 0]]), 3),
            {},
            ValueError,
            "table rows 0 and 1 both connect input map 0 to output map 0",
        ),
        ((torch.tensor([[0, 0], [0, 2]]), 3), {}, ValueError, "table gives output map 1 no input"),
        ((tables.full(2, 2), 0), {}, ValueError, "kernel_size must be a positive integer, got 0"),
        (
            (tables.full(2, 2), (3, 3, 3)),
            {},
            TypeError,
            "kernel_size must be a positive integer or",
        ),
        ((tables.full(2, 2), 3), {"stride": 0}, ValueError, "stride must be a positive integer"),
        (
            (tables.full(2, 2), 3),
            {"bias": "yes"},
            TypeError,
            "bias must be True or False, got 'yes'",
        ),
        ((tables.full(2, 2), 3), {"in_maps": 0}, ValueError, "in_maps must be a positive integer"),
        (([[0, 0]], 3), {}, TypeError, "table must be a torch.Tensor"),
    ],
)
def test_construction_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        FilterBank(*args, **kwargs)


def test_wrong_number_of_input_maps():
    bank = FilterBank(tables.random(64, 256, 16), 9)
    with pytest.raises(
        ValueError, match=r"x must have 64 maps in dimension -3, got shape \(2, 63, 14, 14\)"
    ):
        bank(torch.randn(2, 63, 14, 14))
    with pytest.raises(ValueError, match="weight kernels of 9x9 do not fit in x maps of 6x6"):
        bank(torch.randn(64, 6, 6))


def test_the_table_plan_follows_the_table():
    torch.manual_seed(0)
    bank = FilterBank(tables.random(4, 6, 2, seed=1), 3).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    before = bank(x)
    rewired = tables.random(4, 6, 2, seed=7)
    assert not torch.equal(rewired, bank.table)
    bank.table = rewired  # a new table is planned when it is assigned
    after = bank(x)
    torch.testing.assert_close(after, table_conv2d(x, rewired, bank.weight, bank.bias))
    assert not torch.allclose(after, before)
    other = FilterBank(tables.random(4, 6, 2, seed=9), 3).double()
    bank.load_state_dict(other.state_dict())
    torch.testing.assert_close(bank(x), other(x), rtol=0, atol=0)


@pytest.mark.usefixtures("fast_paths")
def test_a_bank_made_or_first_run_under_inference_mode_still_trains():
    x = torch.randn(2, 64, 14, 14)
    with torch.inference_mode():
        made = FilterBank(tables.random(64, 256, 16), 9)  # its table is an inference tensor
        made(x[:1])
    trained = FilterBank(tables.random(64, 256, 16), 9)
    with torch.inference_mode():
        trained(x[:1])  # plans the table, and caches the plan, here
    for bank in (made, trained):
        leaf = x[:1].clone().requires_grad_()
        bank(leaf).sum().backward()  # batch 1: the "unfold" method indexes with the plan
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("batch", [1, 6])  # unfold and Fourier methods for layer 3
def test_kept_kernels_follow_a_change_of_dtype_and_a_training_step(batch):
    torch.manual_seed(0)
    bank = FilterBank(tables.random(16, 32, 4, seed=1), 5)
    x = torch.randn(batch, 16, 10, 10)
    with torch.no_grad():
        bank(x)  # kernels transformed and kept
    bank.double()  # swaps each parameter's memory, not its version counter
    with torch.no_grad():
        y = bank(x.double())
    expected = table_conv2d(x.double(), bank.table, bank.weight.clone(), bank.bias, method="dense")
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    optimizer = torch.optim.SGD(bank.parameters(), lr=0.5)
    bank(x.double()).square().sum().backward()
    optimizer.step()  # an in-place update
    with torch.no_grad():
        after = bank(x.double())
    expected = table_conv2d(x.double(), bank.table, bank.weight.clone(), bank.bias, method="dense")
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(after, y)
