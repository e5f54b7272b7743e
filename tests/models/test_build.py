"""Building networks: the lecture's numbers pinned on the built lecun83, LeNet-5's counts,
analysis counts equal to the model's parameters, forward shapes equal to the analysis."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from cnnkit import analysis, tables
from cnnkit.models import build, from_name, list_presets
from tests.models.test_spec import random_specs


@pytest.fixture(scope="module")
def lecun83():
    torch.manual_seed(0)
    return build(from_name("lecun83"))


def test_lecun83_every_number_of_the_lecture(lecun83):
    x = torch.randn(2, 1, 83, 83)
    assert x[0].numel() == 6889
    acts = lecun83.intermediates(x)
    assert acts["stage1.filters"].shape == (2, 64, 75, 75)
    assert acts["stage1.pool"].shape == (2, 64, 14, 14)
    assert acts["stage2.filters"].shape == (2, 256, 6, 6)
    assert acts["stage2.pool"].shape == (2, 256, 1, 1)
    assert acts["classifier"].shape == (2, 101)
    first, third = lecun83.stage1.filters, lecun83.stage2.filters
    assert first.weight.numel() == 64 * 9 * 9 == 5184
    assert first.bias.numel() == 64
    assert third.weight.shape[0] == 256 * 16 == 4096
    assert third.weight.numel() == 331_776
    assert third.bias.numel() == 256
    table = third.table
    assert torch.equal(torch.bincount(table[:, 1], minlength=256), torch.full((256,), 16))
    assert sum(p.numel() for p in lecun83.parameters()) == 363_237


def test_lecun83_pooling_then_subsampling_shapes():
    spec = from_name("lecun83")
    unfused = spec.stages[0].pool.__class__(kind="max", window=10, stride=5, fused=False)
    import dataclasses

    stage = dataclasses.replace(spec.stages[0], pool=unfused)
    model = build(dataclasses.replace(spec, stages=(stage, spec.stages[1])))
    acts = model.intermediates(torch.randn(1, 1, 83, 83))
    assert acts["stage1.pool"].shape == (1, 64, 66, 66)
    assert acts["stage1.subsample"].shape == (1, 64, 14, 14)


def test_layer_names_are_stable(lecun83):
    names = [name for name, _ in lecun83.named_children()]
    assert names == ["stage1", "stage2", "classifier"]
    assert [n for n, _ in lecun83.stage1.named_children()] == ["filters", "nonlin", "norm", "pool"]


def test_print_reads_like_the_layer_table(lecun83):
    text = str(lecun83)
    assert "(filters)" in text and "(norm)" in text and "(pool)" in text


def test_lenet5_counts_layer_by_layer():
    model = build(from_name("lenet5"))
    counts = {name: w + b for name, (w, b) in analysis.parameter_counts(model).items()}
    assert counts == {
        "stage1.filters": 156,
        "stage1.pool": 12,
        "stage2.filters": 1516,
        "stage2.pool": 32,
        "stage3.filters": 48_120,
        "classifier.hidden": 10_164,
        "classifier.output": 850,
    }
    assert sum(counts.values()) == 60_850
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)


def test_lenet5_preset_uses_the_published_c3_table():
    # tests/test_tables.py pins tables.lenet5_c3() against the paper's Table I.
    model = build(from_name("lenet5"))
    assert torch.equal(model.stage2.filters.table, tables.lenet5_c3())


@pytest.mark.parametrize("name", list_presets())
def test_analysis_matches_built_model(name):
    spec = from_name(name)
    model = build(spec)
    summary = analysis.summarize(spec)
    built = analysis.parameter_counts(model)
    from_spec = {r.name: (r.weights, r.biases) for r in summary.rows if r.weights or r.biases}
    assert built == from_spec
    x = torch.randn(2, spec.input.maps, spec.input.height, spec.input.width)
    acts = model.intermediates(x)
    # Rows in the lecture's view show a fused pooling layer as the unfused layers it equals.
    stages = tuple(
        s
        if s.pool is None
        else dataclasses.replace(s, pool=dataclasses.replace(s.pool, fused=False))
        for s in spec.stages
    )
    unfused = build(dataclasses.replace(spec, stages=stages)).intermediates(x)
    for row in summary.rows[1:]:
        if row.view == "lecture":
            assert unfused[row.name].shape[1:].numel() == row.units, row.name
            continue
        key = "classifier" if row.name.startswith("classifier.") else row.name
        if key == "classifier" and row.name != "classifier.output":
            continue
        assert acts[key].shape[1:].numel() == row.units, row.name


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_specs())
def test_random_specs_build_as_analysed(spec):
    model = build(spec)
    summary = analysis.summarize(spec)
    from_spec = {r.name: (r.weights, r.biases) for r in summary.rows if r.weights or r.biases}
    assert analysis.parameter_counts(model) == from_spec
    acts = model.intermediates(torch.randn(2, 1, spec.input.height, spec.input.width))
    for row in summary.rows[1:]:
        if row.name in acts and row.view is None:  # lecture rows: see the test above
            assert tuple(acts[row.name].shape[1:]) == (row.maps, row.height, row.width), row.name
    assert acts["classifier"].shape == (2, spec.classifier.classes)


def test_build_refuses_non_spec():
    with pytest.raises(TypeError, match="spec must be an ArchitectureSpec, got dict"):
        build({"name": "lecun83"})


def test_averaged_network_stores_untied_kernels_and_starts_as_the_shared_one():
    torch.manual_seed(0)
    shared_spec = from_name("digits28")
    shared = build(shared_spec)
    torch.manual_seed(0)
    untied = build(from_name("digits28", weight_sharing="averaged"))
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(untied(x), shared(x), rtol=1e-5, atol=1e-5)
    summary = analysis.summarize(untied.spec)
    stored = {r.name: (r.stored_weights, r.stored_biases) for r in summary.rows if r.stored_weights}
    built = analysis.parameter_counts(untied)
    assert {k: built[k] for k in stored} == stored
    assert summary.parameters == analysis.summarize(shared_spec).parameters
    assert untied.tie_groups().free == sum(
        r.weights + r.biases for r in summary.rows if r.stored_weights
    )


def test_lecture_first_layer_stored_versus_free():
    row = analysis.summarize(from_name("lecun83", weight_sharing="averaged")).row("stage1.filters")
    assert row.stored_weights == 64 * 75 * 75 * 81 == 29_160_000
    assert row.weights == 5184


def test_averaged_training_keeps_groups_tied():
    from cnnkit import tying

    torch.manual_seed(0)
    model = build(from_name("digits28", weight_sharing="averaged"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        assert not tying.is_tied(model.tie_groups(), atol=1e-6)
        model.project_ties()
        tying.check_tied(model.tie_groups(), atol=1e-6)
    assert build(from_name("digits28")).tie_groups() is None


def test_averaged_with_scaled_steps_trains_like_shared():
    torch.manual_seed(0)
    shared = build(from_name("digits28", normalization=False)).double()
    torch.manual_seed(0)
    averaged = build(from_name("digits28", normalization=False, weight_sharing="averaged"))
    averaged = averaged.double()
    x, y = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (shared, averaged)
    ]
    for _ in range(3):
        for model, optimizer in zip((shared, averaged), optimizers, strict=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            model.project_ties()
    torch.testing.assert_close(averaged(x), shared(x), rtol=1e-9, atol=1e-9)
