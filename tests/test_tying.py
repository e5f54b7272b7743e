"""Tied weights by averaging (the lecture's Section 3), and its equivalence to convolution."""

from __future__ import annotations

import copy
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit import reference, tying
from cnnkit.nn.locally_connected import LocallyConnected2d, untie_filter_banks
from tests.conftest import torch_threads

# ---------------------------------------------------------------------------------------
# project_
# ---------------------------------------------------------------------------------------


def spanning_groups(dtype=torch.float64):
    """Two parameters whose five groups span both of them, plus one singleton."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, 4, dtype=dtype))
    b = nn.Parameter(torch.randn(6, dtype=dtype))
    labels_a = torch.tensor([[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1]])
    labels_b = torch.tensor([2, 3, 4, 0, 1, 5])  # label 5: a group of one
    return a, b, {a: labels_a, b: labels_b}


def group_values(labels, a, b):
    values = torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)])
    flat = torch.cat([labels[a].reshape(-1), labels[b].reshape(-1)])
    return values, flat


def test_project_matches_the_lecture_rule_in_every_group():
    a, b, labels = spanning_groups()
    values, flat = group_values(labels, a, b)
    tying.project_(tying.TieGroups(labels))
    after, _ = group_values(labels, a, b)
    for label in range(6):
        in_group = flat == label
        expected = reference.tie_average(values[in_group].numpy())
        np.testing.assert_allclose(after[in_group].numpy(), expected, rtol=0, atol=1e-15)


def test_project_makes_groups_constant_preserves_means_and_is_idempotent():
    a, b, labels = spanning_groups()
    values, flat = group_values(labels, a, b)
    means = torch.zeros(6, dtype=torch.float64).index_add_(0, flat, values) / torch.bincount(flat)
    groups = tying.TieGroups(labels)
    assert not tying.is_tied(groups)
    tying.project_(groups)
    assert tying.is_tied(groups)
    after, _ = group_values(labels, a, b)
    torch.testing.assert_close(after, means[flat], rtol=0, atol=1e-15)
    again = [a.detach().clone(), b.detach().clone()]
    tying.project_(groups)
    torch.testing.assert_close([a.detach(), b.detach()], again, rtol=0, atol=1e-15)


def test_arbitrary_labels_give_the_same_groups_as_compact_ones():
    a, b, labels = spanning_groups()
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    odd = {a2: labels[a] * 1000 - 7, b2: labels[b] * 1000 - 7}  # negative and sparse
    tying.project_(labels)  # a plain mapping is accepted too
    tying.project_(odd)
    torch.testing.assert_close([a2, b2], [a, b], rtol=0, atol=1e-15)
    groups = tying.TieGroups(odd)
    assert (groups.free, groups.stored) == (6, 18)


def test_expanded_labels_behave_like_materialized_ones():
    torch.manual_seed(2)
    a = nn.Parameter(torch.randn(4, 3, 5, dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    base = torch.tensor([[0, 1, 2, 3, 4]]).view(1, 1, 5)
    expanded = (base * 7 - 3).expand(4, 3, 5)  # stride 0 on dims 0 and 1, odd labels
    lazy, eager = tying.TieGroups({a: expanded}), tying.TieGroups({b: expanded.contiguous()})
    assert (lazy.free, lazy.stored) == (eager.free, eager.stored) == (5, 60)
    assert torch.equal(lazy.group_sizes(), eager.group_sizes())
    assert torch.equal(lazy[a], eager[b])
    tying.project_(lazy)
    tying.project_(eager)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    torch.testing.assert_close(a[2, 1], b.detach().mean((0, 1)), rtol=0, atol=1e-15)
    with torch.no_grad():
        a[1, 2, 3] = b[1, 2, 3] = 10.0
    messages = []
    for groups in (lazy, eager):
        with pytest.raises(ValueError) as error:
            tying.check_tied(groups)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert (
        "tie group 18 is not tied: parameter 0 (shape (4, 3, 5)) at index (1, 2, 3)" in messages[0]
    )
    with tying.scale_gradients_by_group_size(lazy), tying.scale_gradients_by_group_size(eager):
        a.sum().backward()
        b.sum().backward()
    assert a.grad.eq(12).all() and b.grad.eq(12).all()


def test_project_mixed_dtypes_and_float32():
    a, b, labels = spanning_groups(torch.float32)
    with torch.no_grad():
        b.data = b.data.double()
    values, flat = group_values(labels, a, b)
    tying.project_(labels)
    assert (a.dtype, b.dtype) == (torch.float32, torch.float64)
    after, _ = group_values(labels, a, b)
    means = torch.zeros(6, dtype=torch.float64).index_add_(0, flat, values.double())
    means /= torch.bincount(flat)
    torch.testing.assert_close(after, means[flat], rtol=0, atol=1e-6)


def test_parameters_outside_the_groups_are_untouched():
    a, b, labels = spanning_groups()
    before = b.detach().clone()
    tying.project_({a: labels[a]})
    torch.testing.assert_close(b.detach(), before, rtol=0, atol=0)
    assert tying.is_tied({a: labels[a]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_project_on_cuda_matches_cpu():
    a, b, labels = spanning_groups()
    on_cpu = [p.detach().clone() for p in (a, b)]
    a_cuda, b_cuda = (nn.Parameter(p.detach().cuda()) for p in (a, b))
    groups = tying.TieGroups({a_cuda: labels[a], b_cuda: labels[b]})
    tying.project_(groups)
    tying.project_({a: labels[a], b: labels[b]})
    torch.testing.assert_close([a_cuda.cpu(), b_cuda.cpu()], [a, b])
    assert not torch.equal(on_cpu[0], a.detach())
    assert tying.is_tied(groups)


# ---------------------------------------------------------------------------------------
# checks, counts and errors
# ---------------------------------------------------------------------------------------


def test_check_tied_names_the_parameter_and_the_group():
    a, b, labels = spanning_groups()
    groups = tying.TieGroups(labels, names={a: "features.weight", b: "features.bias"})
    tying.project_(groups)
    tying.check_tied(groups)
    with torch.no_grad():
        b[1] += 0.25  # label 3
    assert not tying.is_tied(groups)
    assert tying.is_tied(groups, atol=0.3)
    tying.check_tied(groups, atol=0.3)
    with pytest.raises(
        ValueError,
        match=r"tie group 3 is not tied: features.bias at index \(1,\) holds .*, "
        r"features.weight at index \(0, 3\) holds .* \(spread 0.25 > atol 0\)",
    ):
        tying.check_tied(groups)


def test_check_tied_reports_nan():
    a, b, labels = spanning_groups()
    tying.project_(labels)
    with torch.no_grad():
        a[0, 0] = float("nan")  # label 0
    assert not tying.is_tied(labels, atol=1e9)
    with pytest.raises(
        ValueError, match=r"tie group 0 is not tied: parameter 0 \(shape \(3, 4\)\)"
    ):
        tying.check_tied(labels)


def test_renamed_takes_names_from_the_module():
    layer = LocallyConnected2d(1, 2, 2, 3)
    groups = tying.convolution_groups(layer).renamed(nn.Sequential(layer))
    assert groups.names == ("0.weight", "0.bias")
    tying.project_(groups)
    with torch.no_grad():
        layer.bias[1, 0, 0] = 5.0
        layer.bias[1, 0, 1] = -5.0
    with pytest.raises(ValueError, match=r"tie group 9 is not tied: 0.bias at index \(1, 0, 0\)"):
        tying.check_tied(groups)


def test_the_lecture_first_layer_stores_29160000_weights_and_5184_are_free():
    layer = LocallyConnected2d(1, 64, 9, (83, 83), device="meta")
    counts = tying.stored_and_free(layer)
    assert counts.stored_weights == 64 * 75 * 75 * 81 == 29_160_000
    assert counts.free_weights == 64 * 9 * 9 == 5_184
    assert (counts.stored_biases, counts.free_biases) == (64 * 75 * 75, 64)
    assert (counts.stored, counts.free) == (29_160_000 + 360_000, 5_184 + 64)


def test_the_lecture_third_layer_counts():
    table = torch.stack([torch.arange(4096) % 64, torch.arange(4096) // 16], 1)  # 16 per output
    layer = LocallyConnected2d(64, 256, 9, (14, 14), table=table, bias=False, device="meta")
    counts = tying.stored_and_free(layer)
    assert counts.stored_weights == 6 * 6 * 4096 * 81
    assert counts.free_weights == 4096 * 81 == 331_776
    assert (counts.stored_biases, counts.free_biases) == (0, 0)


def test_group_counts_agree_with_the_shapes():
    table = torch.tensor([[0, 0], [1, 0], [1, 2], [0, 1]])
    layers = [LocallyConnected2d(2, 3, 3, (6, 7), table=table), LocallyConnected2d(3, 1, 2, 4)]
    groups = tying.convolution_groups(*layers)
    counts = [tying.stored_and_free(layer) for layer in layers]
    assert tying.free_parameters(groups) == sum(c.free for c in counts) == 4 * 9 + 3 + 3 * 4 + 1
    assert tying.stored_entries(groups) == sum(c.stored for c in counts)
    assert tying.stored_entries(groups) == sum(p.numel() for m in layers for p in m.parameters())
    sizes = groups.group_sizes()
    assert sizes[: 4 * 9].eq(4 * 5).all() and sizes[36:39].eq(20).all() and sizes[39:].eq(9).all()


def test_convolution_groups_make_the_layer_a_table_convolution():
    torch.manual_seed(1)
    table = torch.tensor([[0, 0], [1, 0], [1, 2], [0, 1]])
    layer = LocallyConnected2d(2, 3, 3, (6, 7), table=table).double()
    groups = tying.convolution_groups(layer)
    kernels = layer.weight.detach().mean((0, 1))  # (K, kh, kw)
    bias = layer.bias.detach().mean((1, 2))  # (C_out,)
    tying.project_(groups)
    dense = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    dense[layer.table[:, 1], layer.table[:, 0]] = kernels
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.conv2d(x, dense, bias), rtol=0, atol=1e-12)


def test_combine_keeps_groups_of_different_arguments_apart():
    first, second = LocallyConnected2d(1, 1, 2, 3), LocallyConnected2d(1, 1, 2, 3)
    combined = tying.TieGroups.combine(
        tying.convolution_groups(first), tying.convolution_groups(second)
    )
    assert combined.free == 2 * (4 + 1)
    tying.project_(combined)
    assert not torch.equal(first.weight, second.weight)
    with pytest.raises(ValueError, match="appears in two of the tie groups being combined"):
        tying.TieGroups.combine(combined, tying.convolution_groups(first))


def test_bad_groups():
    p = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"labels of parameter 0 \(shape \(2, 3\)\) must have"):
        tying.TieGroups({p: torch.zeros(3, 2, dtype=torch.int64)})
    with pytest.raises(TypeError, match="must have an integer dtype, got torch.float32"):
        tying.TieGroups({p: torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="keys of labels must be floating-point tensors"):
        tying.TieGroups({torch.zeros(2, dtype=torch.int64): torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="labels must name at least one parameter"):
        tying.TieGroups({})
    with pytest.raises(TypeError, match="groups must be a TieGroups or a mapping"):
        tying.project_([p])
    with pytest.raises(ValueError, match="atol must be a finite number >= 0, got -1"):
        tying.is_tied({p: torch.zeros(2, 3, dtype=torch.int64)}, atol=-1)
    with pytest.raises(TypeError, match="layer must be a locally connected layer"):
        tying.convolution_groups(nn.Conv2d(1, 1, 3))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        tying.tie_after_step([p], {p: torch.zeros(2, 3, dtype=torch.int64)})
    other = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=r"does not update: parameter 0 \(shape \(2, 3\)\)"):
        tying.tie_after_step(
            torch.optim.SGD([other], lr=0.1), {p: torch.zeros(2, 3, dtype=torch.int64)}
        )


# ---------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------


def test_tie_after_step_projects_after_every_step_until_removed():
    layer = LocallyConnected2d(1, 2, 2, 4)
    groups = tying.convolution_groups(layer)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    assert not tying.is_tied(groups)
    handle = tying.tie_after_step(optimizer, groups)
    assert tying.is_tied(groups)  # project_now
    x = torch.randn(3, 1, 4, 4)
    layer(x).square().sum().backward()
    optimizer.step()
    assert tying.is_tied(groups)
    handle.remove()
    handle.remove()  # a second call does nothing
    layer(x).square().sum().backward()
    optimizer.step()
    assert not tying.is_tied(groups)


def test_scale_gradients_multiplies_each_gradient_by_its_group_size():
    a, b, labels = spanning_groups()
    groups = tying.TieGroups(labels)
    sizes = torch.bincount(torch.cat([labels[a].reshape(-1), labels[b].reshape(-1)]))
    loss = lambda: a.square().sum() + (b**3).sum()  # noqa: E731
    loss().backward()
    plain = [a.grad.clone(), b.grad.clone()]
    a.grad = b.grad = None
    with tying.scale_gradients_by_group_size(groups):
        loss().backward()
    torch.testing.assert_close(a.grad, plain[0] * sizes[labels[a]])
    torch.testing.assert_close(b.grad, plain[1] * sizes[labels[b]])
    a.grad = b.grad = None
    loss().backward()  # hooks gone after the with block
    torch.testing.assert_close([a.grad, b.grad], plain)


# ---------------------------------------------------------------------------------------
# Equivalence with convolution, on real digits, float64
# ---------------------------------------------------------------------------------------

STEPS, BATCH = 20, 32
POSITIONS = 24 * 24  # N: a 5x5 kernel on 28x28 digits is used at 24x24 positions


@pytest.fixture(autouse=True, scope="module")
def one_thread_for_the_module():
    # Many tiny ops: extra threads only add overhead here, a lot of it on a busy machine.
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def digits():
    with resources.as_file(resources.files("cnnkit.data") / "digits.npz") as path:
        if not path.exists():
            pytest.skip("the bundled digits are missing")
        with np.load(path) as data:
            images = data["train_images"][: STEPS * BATCH]
            labels = data["train_labels"][: STEPS * BATCH]
    x = torch.from_numpy(images).to(torch.float64).div(255).unsqueeze(1)  # (N, 1, 28, 28)
    return x, torch.from_numpy(labels).long()


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 24 * 24, 10)
    ).double()


def run_both(
    digits,
    make_optimizer,
    lr,
    conv_lr,
    *,
    tie=True,
    scale_gradients=False,
):
    """Train the conv net and its untied copy side by side; yield both after each step.

    The conv net's filter bank learns at ``conv_lr``, its classifier at ``lr``; every
    parameter of the untied copy learns at ``lr``.
    """
    x, y = digits
    conv = conv_net()
    untied = copy.deepcopy(conv)
    layers = untie_filter_banks(untied, x[:1])
    conv_opt = make_optimizer(
        [
            {"params": conv[0].parameters(), "lr": conv_lr},
            {"params": conv[3].parameters(), "lr": lr},
        ]
    )
    untied_opt = make_optimizer([{"params": untied.parameters(), "lr": lr}])
    groups = tying.convolution_groups(*layers)
    if tie:
        tying.tie_after_step(untied_opt, groups, scale_gradients=scale_gradients)
    for step in range(STEPS):
        xb, yb = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]
        for model, optimizer in ((conv, conv_opt), (untied, untied_opt)):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        yield conv, untied, groups


def distance(conv, untied):
    """Largest gap between the conv net and the untied net, every parameter, every position."""
    kernels = conv[0].weight.detach()[:, 0]  # (4, 5, 5): one input map, rows = output maps
    gaps = [
        (untied[0].weight.detach() - kernels).abs().max(),  # (24, 24, 4, 5, 5) vs broadcast
        (untied[0].bias.detach() - conv[0].bias.detach().view(4, 1, 1)).abs().max(),
        (untied[3].weight - conv[3].weight).detach().abs().max(),
        (untied[3].bias - conv[3].bias).detach().abs().max(),
    ]
    return float(max(gaps))


SGD_CASES = {
    "sgd": (0.5, lambda groups: torch.optim.SGD(groups, momentum=0.0)),
    "nesterov-momentum": (
        0.05,
        lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=True),
    ),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_averaging_at_lr_follows_the_convolution_at_lr_over_n(digits, case):
    lr, make_optimizer = SGD_CASES[case]
    start = conv_net()[0].weight.detach()
    for conv, untied, groups in run_both(digits, make_optimizer, lr, lr / POSITIONS):
        assert distance(conv, untied) < 1e-10
        assert tying.is_tied(groups)
    moved = float((conv[0].weight.detach() - start).abs().max())
    assert moved > 1e-3  # the filters did learn, so the agreement means something


SCALED_CASES = {
    **SGD_CASES,
    # With scaled gradients the decay the optimizer adds matches too (see docs/tying.md).
    "momentum-decay": (
        0.05,
        lambda groups: torch.optim.SGD(groups, momentum=0.9, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("case", list(SCALED_CASES))
def test_scaled_averaging_at_lr_follows_the_convolution_at_lr(digits, case):
    lr, make_optimizer = SCALED_CASES[case]
    lr = lr / 10  # the shared-weight step is N times larger than the plain averaged one
    start = conv_net()[0].weight.detach()
    steps = run_both(digits, make_optimizer, lr, lr, scale_gradients=True)
    for conv, untied, _ in steps:
        assert distance(conv, untied) < 1e-10
    assert float((conv[0].weight.detach() - start).abs().max()) > 1e-2


def test_the_wrong_learning_rate_does_not_follow(digits):
    lr, make_optimizer = SGD_CASES["sgd"]
    *_, (conv, untied, _) = run_both(digits, make_optimizer, lr, lr)
    assert distance(conv, untied) > 1e-2


def test_untied_training_drifts_away_from_the_convolution(digits):
    lr, make_optimizer = SGD_CASES["sgd"]
    gaps = []
    for step in run_both(digits, make_optimizer, lr, lr / POSITIONS, tie=False):
        conv, untied, groups = step
        gaps.append(distance(conv, untied))
    assert gaps[-1] > 1e-3
    assert gaps[-1] > gaps[0]
    with pytest.raises(ValueError, match=r"tie group \d+ is not tied: layer.weight"):
        tying.check_tied(groups)


@pytest.mark.parametrize("scale_gradients", [False, True])
def test_with_adam_averaging_is_not_the_convolution(digits, scale_gradients):
    lr = 1e-3
    conv_lr = lr if scale_gradients else lr / POSITIONS  # the rates that agree under SGD
    *_, (conv, untied, groups) = run_both(
        digits, torch.optim.Adam, lr, conv_lr, scale_gradients=scale_gradients
    )
    assert tying.is_tied(groups)  # still a convolution, but a different one
    assert distance(conv, untied) > 1e-3


def test_old_doors_name_the_same_objects():
    import cnnkit.nn.locally_connected as old_layer
    import cnnkit.nn.tying as home
    from cnnkit.ops import locally_connected as op

    for name in tying.__all__:
        assert getattr(tying, name) is getattr(home, name), name
    assert old_layer.LocallyConnected2d is home.LocallyConnected2d
    assert old_layer.untie_filter_banks is home.untie_filter_banks
    assert old_layer.locally_connected2d is op.locally_connected2d


def test_methods_are_the_functions():
    torch.manual_seed(0)
    layer = LocallyConnected2d(2, 3, 3, (6, 5))
    groups = tying.convolution_groups(layer)
    assert not groups.is_tied() and not tying.is_tied(groups)
    with pytest.raises(ValueError, match="is not tied") as by_method:
        groups.check_tied()
    with pytest.raises(ValueError, match="is not tied") as by_function:
        tying.check_tied(groups)
    assert str(by_method.value) == str(by_function.value)
    means = layer.weight.detach().mean((0, 1))  # (K, kh, kw): each kernel over positions
    groups.project_()
    assert groups.is_tied() and tying.is_tied(groups)
    torch.testing.assert_close(layer.weight[1, 2], means)
    assert tying.free_parameters(groups) == groups.free == 2 * 3 * 9 + 3
    assert tying.stored_entries(groups) == groups.stored == 4 * 3 * (6 * 9 + 3)
