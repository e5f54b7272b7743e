"""The one list of a spec's named layers, which ``build`` and ``analysis`` both follow."""

from __future__ import annotations

import dataclasses

import pytest

from cnnkit import analysis
from cnnkit.models import build, from_name, list_presets
from cnnkit.models.layers import layers_of_stage, stage_layers
from cnnkit.nn.pooling import Pool, PoolSubsample, Subsample


def _with_pools(spec, **changes):
    stages = tuple(
        dataclasses.replace(s, pool=dataclasses.replace(s.pool, **changes)) if s.pool else s
        for s in spec.stages
    )
    return dataclasses.replace(spec, stages=stages)


def test_lecun83_layers_by_hand():
    first, second = stage_layers(from_name("lecun83"))
    assert [layer.path for layer in first] == [
        "stage1.filters",
        "stage1.nonlin",
        "stage1.norm",
        "stage1.pool",
    ]
    assert [layer.output for layer in first] == [(64, 75, 75)] * 3 + [(64, 14, 14)]
    assert first[0].input == (1, 83, 83)
    assert first[-1].stride == 5  # fused: pooled only at the kept points
    assert second[0].input == (64, 14, 14) and second[-1].output == (256, 1, 1)


def test_unfused_pooling_is_pool_then_subsample():
    layers = stage_layers(_with_pools(from_name("lecun83"), fused=False))[0]
    pool, subsample = layers[-2:]
    assert (pool.name, pool.stride, pool.output) == ("pool", 1, (64, 66, 66))
    assert (subsample.name, subsample.stride, subsample.output) == ("subsample", 5, (64, 14, 14))


def test_several_nonlinearities_are_numbered_and_none_makes_no_layer():
    stage = dataclasses.replace(
        from_name("digits28").stages[0], nonlinearity=("abs", "none", "tanh")
    )
    names = [layer.name for layer in layers_of_stage(stage, 1, (28, 28))]
    assert names[:3] == ["filters", "nonlin1", "nonlin2"]


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("fused", [True, False])
def test_build_and_analysis_follow_the_list(name, fused):
    spec = _with_pools(from_name(name), fused=fused, trainable=True, activation="tanh")
    model = build(spec)
    listed = [layer.path for layers in stage_layers(spec) for layer in layers]
    built = [f"{s}.{n}" for s, stage in model.named_children() if s != "classifier"
             for n, _ in stage.named_children()]  # fmt: skip
    assert built == listed
    for layers in stage_layers(spec):
        for layer in layers:
            module = model.get_submodule(layer.path)
            if layer.kind == "pool":
                kind = PoolSubsample if layer.stride == layer.part.stride else Pool
                assert type(module) is kind
            if layer.kind == "subsample":
                assert isinstance(module, Subsample) and module.stride == (layer.stride,) * 2
    rows = [row.name for row in analysis.summarize(spec).rows[1:] if row.view is None]
    shown = [p for p in listed if not (fused and p.endswith(".pool"))]  # fused: lecture rows
    assert [r for r in rows if not r.startswith("classifier")] == shown


def test_stage_shapes_agree_with_the_spec():
    for name in list_presets():
        spec = from_name(name)
        for layers, shapes in zip(stage_layers(spec), spec.shapes(), strict=True):
            assert layers[0].output == shapes.filters
            assert layers[-1].output == shapes.output
