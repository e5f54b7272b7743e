"""The weight-sharing study's three networks: weight counts by hand, connectivity, tying."""

import dataclasses

import pytest
import torch

from cnnkit import analysis
from cnnkit.experiments import FAMILIES, families, first_layer_weights
from cnnkit.experiments.families import DENSE_LIMIT_BYTES
from cnnkit.models import ArchitectureSpec, build, from_name
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.nn.locally_connected import LocallyConnected2d

# By hand, for the tiny spec (conftest): 8×8 input, 3 kernels 3×3 -> 3@6×6, pool -> 3@3×3,
# 4 maps from 2 of 3 (8 kernels 2×2) -> 4@2×2, classifier 16 -> 2.
CONV = (3 * 9 + 3) + (8 * 4 + 4) + (16 * 2 + 2)  # 30 + 36 + 34 = 100
LOCAL = (3 * 9 + 3) * 36 + (8 * 4 + 4) * 4 + (16 * 2 + 2)  # 1080 + 144 + 34 = 1258
DENSE = (64 * 108 + 108) + (108 * 2 + 2)  # 108 hidden units (3@6×6): 7020 + 218 = 7238


def _count(spec: ArchitectureSpec) -> int:
    return sum(p.numel() for p in build(spec).parameters() if p.requires_grad)


def test_weight_counts_by_hand(tiny_spec):
    trio = {f.name: f.spec for f in families(tiny_spec)}
    assert list(trio) == list(FAMILIES)
    assert _count(trio["convolutional"]) == CONV == 100
    assert _count(trio["locally_connected"]) == LOCAL == 1258
    assert _count(trio["fully_connected"]) == DENSE == 7238
    for spec in trio.values():  # the summary counts the untied weights as free weights
        assert analysis.summarize(spec).parameters == _count(spec)


def test_first_layer_weights_by_hand(tiny_spec):
    assert [first_layer_weights(f, tiny_spec, 8) for f in FAMILIES] == [30, 1080, 7020]
    assert first_layer_weights("convolutional", tiny_spec, 1000) == 30  # no size in it
    assert first_layer_weights("locally_connected", tiny_spec, 10) == 30 * 64
    assert first_layer_weights("fully_connected", tiny_spec, 10) == (100 + 1) * 3 * 64
    with pytest.raises(ValueError, match="unknown family 'dense'"):
        first_layer_weights("dense", tiny_spec, 8)


def _pattern(layer: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """Which output unit depends on which input unit: the Jacobian's non-zero pattern."""
    x = torch.rand(shape, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(layer, x)
    return jacobian.reshape(-1, x.numel()) != 0


def test_locally_connected_has_the_convolutions_connectivity(tiny_spec):
    trio = {f.name: build(f.spec).double() for f in families(tiny_spec)}
    conv, local = trio["convolutional"], trio["locally_connected"]
    for stage, shape in (("stage1", (1, 1, 8, 8)), ("stage2", (1, 3, 3, 3))):
        shared = getattr(conv, stage).filters
        untied = getattr(local, stage).filters
        assert isinstance(shared, FilterBank) and isinstance(untied, LocallyConnected2d)
        assert torch.equal(_pattern(shared, shape), _pattern(untied, shape))
    assert local.tie_groups() is None  # nothing ties the positions


def test_locally_connected_positions_move_apart(tiny_spec):
    local = build(dataclasses.replace(tiny_spec, weight_sharing="none"))
    bank = local.stage1.filters
    before = bank.weight.detach().clone()  # (6, 6, K, 3, 3)
    optimizer = torch.optim.SGD(local.parameters(), lr=0.5)
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    torch.nn.functional.cross_entropy(local(images), labels).backward()
    optimizer.step()
    local.project_ties()  # no ties: changes nothing
    moved = bank.weight.detach() - before
    assert float((moved[0, 0] - moved[5, 5]).abs().max()) > 1e-6


def test_dense_family_is_capped_to_256_mib():
    trio = {f.name: f for f in families(from_name("lecun83", classes=10))}
    dense = trio["fully_connected"]
    units = dense.spec.stages[0].filters.maps
    assert units == DENSE_LIMIT_BYTES // (4 * 83 * 83) == 9741
    assert units * 83 * 83 * 4 <= DENSE_LIMIT_BYTES < (units + 1) * 83 * 83 * 4
    assert "360,000 hidden units" in dense.note and "capped to 9,741 units" in dense.note
    small = {f.name: f for f in families(from_name("digits28"))}["fully_connected"]
    assert small.note is None and small.spec.stages[0].filters.maps == 16 * 24 * 24


def test_new_spec_fields_round_trip(tiny_spec):
    frozen = dataclasses.replace(
        tiny_spec,
        weight_sharing="none",
        stages=tuple(
            dataclasses.replace(s, filters=dataclasses.replace(s.filters, trainable=False))
            for s in tiny_spec.stages
        ),
    )
    assert ArchitectureSpec.from_toml(frozen.to_toml()) == frozen
    model = build(frozen)
    assert not any(p.requires_grad for p in model.stage1.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    with pytest.raises(TypeError, match="trainable must be true or false, got 'no'"):
        dataclasses.replace(tiny_spec.stages[0].filters, trainable="no")
