"""Pool, Subsample and PoolSubsample modules: equal to their functions and to each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit.nn.pooling import Pool, PoolSubsample, Subsample
from cnnkit.ops.pooling import pool2d, pool_subsample2d, subsample2d

KINDS = ("max", "avg", "lp")


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=g))
    return module


# --- module equals function ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_modules_equal_functions(kind: str) -> None:
    x = torch.rand(2, 4, 13, 11) + 0.1
    assert torch.equal(Pool(kind, 3, p=3)(x), pool2d(x, kind, 3, 1, 3))
    assert torch.equal(
        PoolSubsample(kind, (3, 2), (2, 4), p=1.5)(x),
        pool_subsample2d(x, kind, (3, 2), (2, 4), 1.5),
    )
    assert torch.equal(Subsample((2, 3))(x), subsample2d(x, (2, 3)))
    trained = _randomize(Pool(kind, 4, maps=4, trainable=True))
    want = pool2d(x, kind, 4, weight=trained.weight, bias=trained.bias)
    assert torch.equal(trained(x), want)


def test_p_reaches_the_computation() -> None:
    x = torch.rand(1, 2, 6, 6) + 0.1
    assert not torch.equal(Pool("lp", 3, p=3)(x), Pool("lp", 3)(x))
    assert torch.equal(Pool("lp", 3, 3)(x), pool2d(x, "lp", 3, p=3))
    assert torch.equal(PoolSubsample("lp", 3, 2, 4)(x), pool_subsample2d(x, "lp", 3, 2, p=4))


# --- fused equals Subsample(Pool) ----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    window=st.integers(1, 7),
    stride=st.integers(1, 7),
    extra=st.integers(0, 16),
    trainable=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pool_subsample_equals_subsample_of_pool(kind, window, stride, extra, trainable, seed):
    size = window + extra
    x = torch.randn(2, 3, size, size + 1, generator=torch.Generator().manual_seed(seed))
    if kind == "lp":
        x = x.abs()
    maps = 3 if trainable else None
    fused = _randomize(PoolSubsample(kind, window, stride, maps=maps, trainable=trainable), seed)
    pool = Pool(kind, window, maps=maps, trainable=trainable)
    pool.load_state_dict(fused.state_dict())
    unfused = torch.nn.Sequential(pool, Subsample(stride))
    assert torch.equal(fused(x), unfused(x))


def test_lecture_layer_two_shapes() -> None:
    x = torch.randn(2, 64, 75, 75)
    pooled = Pool("max", 10)(x)
    assert pooled.shape == (2, 64, 66, 66)
    kept = Subsample(5)(pooled)
    assert kept.shape == (2, 64, 14, 14)
    fused = PoolSubsample("max", 10, 5)(x)
    assert torch.equal(fused, kept)


def test_unbatched_and_noncontiguous() -> None:
    x = torch.rand(3, 4, 12, 9) + 0.1
    layer = _randomize(PoolSubsample("avg", 3, 2, maps=4, trainable=True))
    assert torch.equal(layer(x[2]), layer(x)[2])
    transposed = x.transpose(2, 3)  # (3, 4, 9, 12), not contiguous
    assert torch.equal(layer(transposed), layer(transposed.contiguous()))


# --- trainable coefficient and bias ------------------------------------------------------------


def test_trainable_parameters_init_and_formula() -> None:
    layer = PoolSubsample("max", 2, 2, maps=3, trainable=True)
    assert layer.weight.shape == layer.bias.shape == (3,)
    assert layer.weight.eq(1).all() and layer.bias.eq(0).all()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(layer(x), PoolSubsample("max", 2, 2)(x))  # fresh layer: plain pooling
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    plain = F.max_pool2d(x, 2, 2)
    want = plain * torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1) + torch.tensor(
        [0.1, 0.2, 0.3]
    ).view(3, 1, 1)
    torch.testing.assert_close(layer(x), want)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((3,), 2.0 * 4 * 4))
    torch.testing.assert_close(layer.weight.grad, plain.sum(dim=(0, 2, 3)))
    layer.reset_parameters()
    assert layer.weight.eq(1).all() and layer.bias.eq(0).all()


def test_trainable_avg_is_torch7_subsampling_with_area_absorbed() -> None:
    # Torch7's SpatialSubSampling / LeNet-5's S-layer: w_sum * (sum over the window) + b.
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    w_sum = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    bias = torch.tensor([0.5, 0.0, -0.2], dtype=torch.float64)
    window_sums = x.unfold(2, 2, 2).unfold(3, 2, 2).sum(dim=(-2, -1))  # (2, 3, 4, 3)
    want = w_sum.view(3, 1, 1) * window_sums + bias.view(3, 1, 1)
    layer = PoolSubsample("avg", 2, 2, maps=3, trainable=True).double()
    with torch.no_grad():
        layer.weight.copy_(4 * w_sum)  # 4 = window area
        layer.bias.copy_(bias)
    torch.testing.assert_close(layer(x), want)


def test_gradcheck_trainable_module() -> None:
    layer = _randomize(PoolSubsample("lp", 2, 2, p=3, maps=2, trainable=True)).double()
    x = (torch.rand(1, 2, 5, 5, dtype=torch.float64) + 0.1).requires_grad_()

    def run(t, weight, bias):
        return pool_subsample2d(t, "lp", 2, 2, 3, weight=weight, bias=bias)

    assert torch.autograd.gradcheck(run, (x, layer.weight, layer.bias))
    assert torch.equal(layer(x), run(x, layer.weight, layer.bias))


def test_parameters_only_when_trainable() -> None:
    assert list(Pool("max", 2).parameters()) == []
    assert list(Pool("max", 2, maps=5).state_dict()) == []
    assert sorted(Pool("avg", 2, maps=5, trainable=True).state_dict()) == ["bias", "weight"]
    assert list(Subsample(2).parameters()) == []


# --- repr and errors ----------------------------------------------------------------------------


def test_extra_repr_shows_only_non_defaults() -> None:
    assert repr(Pool("max", 10)) == "Pool('max', window=10)"
    assert repr(Subsample(5)) == "Subsample(stride=5)"
    assert repr(Subsample((2, 3))) == "Subsample(stride=(2, 3))"
    layer = PoolSubsample("lp", (2, 3), 5, p=3, maps=4, trainable=True)
    assert (
        repr(layer) == "PoolSubsample('lp', window=(2, 3), stride=5, p=3, maps=4, trainable=True)"
    )
    assert repr(PoolSubsample("avg", 6, 4)) == "PoolSubsample('avg', window=6, stride=4)"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="trainable=True needs maps.*got maps=None"):
        Pool("max", 2, trainable=True)
    with pytest.raises(ValueError, match="trainable=True needs maps"):
        PoolSubsample("avg", 2, 2, trainable=True)
    with pytest.raises(ValueError, match="kind must be one of 'max', 'avg', 'lp', got 'l2'"):
        Pool("l2", 2)
    with pytest.raises(ValueError, match="p must be a finite number > 0, got 0"):
        PoolSubsample("lp", 2, 2, p=0)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        PoolSubsample("max", 2, 0)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        Subsample(0)
    with pytest.raises(ValueError, match="window must be a positive integer, got 0"):
        Pool("max", (3, 0))
    with pytest.raises(ValueError, match="maps must be a positive integer, got 0"):
        Pool("max", 2, maps=0)
    with pytest.raises(TypeError, match="trainable must be True or False, got 1"):
        Pool("max", 2, maps=3, trainable=1)
    with pytest.raises(ValueError, match=r"window \(10, 10\) is larger than the input map"):
        Pool("max", 10)(torch.randn(1, 2, 6, 6))
    with pytest.raises(ValueError, match="x must have 3 maps in dimension -3, got shape"):
        Pool("avg", 2, maps=3, trainable=True)(torch.randn(1, 4, 6, 6))
