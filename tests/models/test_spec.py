"""Architecture specs: validation, shape walk, TOML/JSON round trips, bad-spec messages."""

import dataclasses
import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cnnkit.models import (
    ArchitectureSpec,
    ClassifierSpec,
    FilterBankSpec,
    InputSpec,
    NormSpec,
    PoolSpec,
    StageSpec,
    from_name,
    list_presets,
    load_spec,
)


def tiny(**stage2) -> ArchitectureSpec:
    return ArchitectureSpec(
        name="tiny",
        input=InputSpec(height=12, width=12),
        stages=(
            StageSpec(FilterBankSpec(maps=4, kernel=5), pool=PoolSpec("max", 2, 2)),
            StageSpec(FilterBankSpec(**{"maps": 6, "kernel": 3, **stage2})),
        ),
        classifier=ClassifierSpec(classes=3),
    )


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_presets_round_trip_exactly(name, fmt, tmp_path):
    spec = from_name(name)
    path = tmp_path / f"spec.{fmt}"
    spec.save(path)
    assert load_spec(path) == spec
    text = spec.to_toml() if fmt == "toml" else spec.to_json()
    again = ArchitectureSpec.from_toml(text) if fmt == "toml" else ArchitectureSpec.from_json(text)
    assert again == spec


def test_explicit_table_round_trips():
    spec = tiny(table="explicit", connections=((0, 0), (1, 1), (2, 2), (3, 3), (0, 4), (1, 5)))
    assert ArchitectureSpec.from_toml(spec.to_toml()) == spec
    assert ArchitectureSpec.from_json(spec.to_json()) == spec


def test_balanced_round_trips_and_is_omitted_when_unset():
    spec = tiny(table="random", fan_in=2, balanced=False)
    assert "balanced = false" in spec.to_toml()
    assert ArchitectureSpec.from_toml(spec.to_toml()) == spec
    assert ArchitectureSpec.from_json(spec.to_json()) == spec
    # A spec written before the field existed has no such key, and loads as unset.
    unset = tiny(table="random", fan_in=2)
    assert "balanced" not in unset.to_toml() and "balanced" not in unset.to_json()
    text = unset.to_toml()
    assert ArchitectureSpec.from_toml(text).stages[1].filters.balanced is None


def test_balanced_in_a_spec_file_reaches_the_table(tmp_path):
    import torch

    from cnnkit import tables
    from cnnkit.models import build

    path = tmp_path / "plain.toml"
    path.write_text(tiny(table="random", fan_in=2, seed=3).to_toml().replace(
        "fan_in = 2", "fan_in = 2\nbalanced = false"
    ))  # fmt: skip
    model = build(load_spec(path))
    plain = tables.random(4, 6, 2, seed=3, balanced=False)
    assert torch.equal(model.stage2.filters.table, plain)
    assert not torch.equal(plain, tables.random(4, 6, 2, seed=3))
    default = build(tiny(table="random", fan_in=2, seed=3))
    assert torch.equal(default.stage2.filters.table, tables.random(4, 6, 2, seed=3))


def test_lecun83_shapes_follow_the_lecture():
    shapes = from_name("lecun83").shapes()
    assert shapes[0].filters == (64, 75, 75)
    assert shapes[0].output == (64, 14, 14)
    assert shapes[1].filters == (256, 6, 6)
    assert shapes[1].output == (256, 1, 1)


def test_unfused_pooling_gives_the_same_shapes():
    fused = from_name("lecun83")
    stage = fused.stages[0]
    unfused_stage = dataclasses.replace(stage, pool=dataclasses.replace(stage.pool, fused=False))
    unfused = dataclasses.replace(fused, stages=(unfused_stage, fused.stages[1]))
    assert unfused.shapes()[0].pooled == (64, 14, 14)


def test_input_too_small_names_the_stage():
    spec = from_name("lecun83")
    with pytest.raises(
        ValueError,
        match=r"stage 2: a 9×9 filter bank needs at least 9×9 input, but stage 1 leaves 4×4",
    ):
        dataclasses.replace(spec, input=InputSpec(height=35, width=35))


def test_input_smaller_than_first_kernel():
    with pytest.raises(ValueError, match=r"stage 1: a 9×9 filter bank .* but the input is 5×5"):
        dataclasses.replace(from_name("lecun83"), input=InputSpec(height=5, width=5))


def test_table_naming_missing_input_map():
    with pytest.raises(ValueError, match=r"stage 2: table row 1 names input map 7, but only 4"):
        tiny(table="explicit", connections=((0, 0), (7, 1)))


def test_table_output_without_input():
    with pytest.raises(ValueError, match=r"stage 2: output map 2 has no input in the table"):
        tiny(maps=3, table="explicit", connections=((0, 0), (1, 1)))


def test_random_fan_in_larger_than_maps():
    with pytest.raises(ValueError, match=r"stage 2: a random table cannot draw fan_in = 9"):
        tiny(table="random", fan_in=9)


def test_pool_window_larger_than_map():
    with pytest.raises(ValueError, match=r"stage 1: a 10×10 pooling window does not fit the 8×8"):
        ArchitectureSpec(
            name="x",
            input=InputSpec(height=12, width=12),
            stages=(StageSpec(FilterBankSpec(maps=4, kernel=5), pool=PoolSpec("max", 10, 1)),),
            classifier=ClassifierSpec(classes=2),
        )


def test_normalization_window_may_exceed_the_map():
    spec = tiny()
    stage = dataclasses.replace(spec.stages[1], norm=NormSpec(window=9))
    assert dataclasses.replace(spec, stages=(spec.stages[0], stage)).output_shape == (6, 2, 2)


def test_unknown_layer_kind_in_file(tmp_path):
    data = from_name("lecun83").to_dict()
    data["stages"][0]["pool"]["kind"] = "median"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"stage 1 pool: kind must be one of 'max', 'avg', 'lp', got 'median'"
    ):
        load_spec(path)


def test_unknown_key_in_file_is_named(tmp_path):
    text = from_name("digits28").to_toml().replace("window = 2\n", "windw = 2\n", 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad.toml: stage 1 pool: unknown key 'windw'"):
        load_spec(path)


def test_malformed_toml_names_the_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[input\nheight = 3\n')
    with pytest.raises(ValueError, match=r"not valid TOML: .*line 2"):
        load_spec(path)


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  "input": \n}\n')
    with pytest.raises(ValueError, match=r"not valid JSON: .*line 4"):
        load_spec(path)


def test_missing_key_is_named():
    data = from_name("digits28").to_dict()
    del data["stages"][1]["filters"]["kernel"]
    with pytest.raises(ValueError, match=r"stage 2 filters: missing key\(s\) kernel"):
        ArchitectureSpec.from_dict(data)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: InputSpec(height=0, width=3), r"input.height must be a positive integer, got 0"),
        (
            lambda: FilterBankSpec(maps=4, kernel=3, table="diagonal"),
            r"filters.table must be one of .*, got 'diagonal'",
        ),
        (lambda: FilterBankSpec(maps=4, kernel=3, table="random"), r"random table needs fan_in"),
        (
            lambda: FilterBankSpec(maps=4, kernel=3, balanced=False),
            r"filters: balanced applies only to a random table, not 'full'",
        ),
        (
            lambda: FilterBankSpec(maps=4, kernel=3, table="random", fan_in=2, balanced=0),
            r"filters.balanced must be true or false, got 0",
        ),
        (lambda: NormSpec(border="wrap"), r"norm.border must be one of .*, got 'wrap'"),
        (
            lambda: NormSpec(threshold=-1.0),
            r"norm.threshold must be 'mean' or a finite number > 0, got -1.0",
        ),
        (lambda: PoolSpec(p=float("nan")), r"p must be a finite number > 0"),
        (
            lambda: StageSpec(FilterBankSpec(4, 3), nonlinearity=("sigmoid",)),
            r"stage.nonlinearity must be one of .*, got 'sigmoid'",
        ),
        (lambda: ClassifierSpec(classes=1), r"classifier.classes must be an integer >= 2, got 1"),
    ],
)
def test_field_errors(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_unknown_preset_and_option():
    with pytest.raises(ValueError, match=r"unknown preset 'lecun84'; expected one of"):
        from_name("lecun84")
    with pytest.raises(ValueError, match=r"preset 'lenet5' has no option 'pooling'"):
        from_name("lenet5", pooling="avg")


def test_overrides_reach_the_spec():
    spec = from_name("lecun83", classes=10, pooling="avg", nonlinearity="relu", normalization=False)
    assert spec.classifier.classes == 10
    assert all(s.pool.kind == "avg" for s in spec.stages)
    assert all(s.nonlinearity == ("relu",) for s in spec.stages)
    assert all(s.norm is None for s in spec.stages)


@st.composite
def random_specs(draw):
    size = draw(st.integers(8, 24))
    maps = 1
    stages = []
    for _ in range(draw(st.integers(1, 2))):
        kernel = draw(st.integers(1, 4))
        out = draw(st.integers(1, 5))
        table = draw(st.sampled_from(["full", "random", "one-to-one"]))
        if table == "one-to-one":
            out = maps
        fan_in = draw(st.integers(1, maps)) if table == "random" else None
        balanced = draw(st.sampled_from([None, True, False])) if table == "random" else None
        pool = None
        if draw(st.booleans()):
            pool = PoolSpec(
                kind=draw(st.sampled_from(["max", "avg", "lp"])),
                window=draw(st.integers(1, 2)),
                stride=draw(st.integers(1, 2)),
                fused=draw(st.booleans()),
                trainable=draw(st.booleans()),
            )
        norm = NormSpec(window=3) if draw(st.booleans()) else None
        stages.append(
            StageSpec(
                FilterBankSpec(
                    maps=out, kernel=kernel, table=table, fan_in=fan_in, balanced=balanced
                ),
                nonlinearity=(draw(st.sampled_from(["abs", "relu", "tanh", "none"])),),
                norm=norm,
                pool=pool,
            )
        )
        maps = out
    hidden = draw(st.one_of(st.none(), st.integers(1, 6)))
    try:
        return ArchitectureSpec(
            name="random",
            input=InputSpec(height=size, width=size + 1),
            stages=tuple(stages),
            classifier=ClassifierSpec(classes=draw(st.integers(2, 4)), hidden=hidden),
        )
    except ValueError:  # maps shrank below a later window: not a valid network
        assume(False)


@settings(max_examples=25, deadline=None)
@given(random_specs())
def test_random_specs_round_trip(spec):
    assert ArchitectureSpec.from_toml(spec.to_toml()) == spec
    assert ArchitectureSpec.from_json(spec.to_json()) == spec
