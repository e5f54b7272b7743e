"""The lecture's analysis: Section 2's numbers and Section 4's weight counts."""

import json

import pytest

from cnnkit import analysis
from cnnkit.models import from_name


@pytest.fixture(scope="module")
def summary():
    return analysis.summarize(from_name("lecun83"))


def test_lecun83_rows(summary):
    assert summary.rows[0].units == 6889
    first = summary.row("stage1.filters")
    assert (first.maps, first.height, first.width) == (64, 75, 75)
    assert (first.weights, first.biases, first.kernels) == (5184, 64, 64)
    assert first.multiply_adds == 64 * 81 * 75 * 75 == 29_160_000
    pool = summary.row("stage1.pool")  # the lecture's Figure 3: 75 - 10 + 1 = 66
    assert (pool.maps, pool.height, pool.width, pool.units) == (64, 66, 66, 64 * 66 * 66)
    subsample = summary.row("stage1.subsample")  # Figure 4: points 1, 6, ..., 66
    assert (subsample.maps, subsample.height, subsample.width) == (64, len(range(1, 67, 5)), 14)
    third = summary.row("stage2.filters")
    assert (third.maps, third.height, third.width) == (256, 6, 6)
    assert (third.weights, third.biases, third.kernels) == (331_776, 256, 4096)
    assert third.multiply_adds == 4096 * 81 * 36
    assert summary.row("stage2.pool").units == 256
    assert summary.parameters == 363_237
    assert summary.kernels == 64 + 4096
    # 41.1 M useful multiply-adds per image in the two filter banks.
    assert round((first.multiply_adds + third.multiply_adds) / 1e6, 1) == 41.1


def _unfused(spec):
    import dataclasses

    stages = tuple(
        dataclasses.replace(s, pool=dataclasses.replace(s.pool, fused=False)) for s in spec.stages
    )
    return dataclasses.replace(spec, stages=stages)


def test_fused_pooling_is_shown_as_the_lectures_two_steps(summary):
    names = [r.name for r in summary.rows]
    assert names[4:6] == ["stage1.pool", "stage1.subsample"]
    lecture = [r for r in summary.rows if r.view == "lecture"]
    assert [r.name for r in lecture] == [
        "stage1.pool", "stage1.subsample", "stage2.pool", "stage2.subsample"
    ]  # fmt: skip
    pool, subsample = lecture[:2]
    assert (pool.operation, pool.shape) == ("max pooling 10×10, stride 1", "64@66×66")
    assert (subsample.operation, subsample.shape) == ("subsampling 5", "64@14×14")
    assert (pool.units, subsample.units) == (278_784, 12_544)
    # The counts are those of the fused layer: 12,544 kept windows of 100 inputs each.
    assert (pool.connections, subsample.connections) == (12_544 * 100, 0)
    assert pool.multiply_adds == subsample.multiply_adds == 0
    # The same names and shapes as the unfused network's layers, which the lecture draws;
    # those rows are what runs there (no view), with their own counts.
    unfused = analysis.summarize(_unfused(from_name("lecun83")))
    assert [(r.name, r.shape, r.units) for r in unfused.rows] == [
        (r.name, r.shape, r.units) for r in summary.rows
    ]
    assert all(r.view is None for r in unfused.rows)
    assert unfused.row("stage1.pool").connections == 64 * 66 * 66 * 100
    assert unfused.row("stage1.subsample").connections == 12_544


def test_totals_are_those_of_the_fused_layers_that_run(summary):
    # Independent count of what the fused network computes, layer by layer.
    filters = 64 * 81 * 75 * 75 + 4096 * 81 * 6 * 6
    rectify = 64 * 75 * 75 + 256 * 6 * 6
    norm = 2 * (
        64 * 64 * analysis._window_pairs(75, 9) ** 2 + 256 * 256 * analysis._window_pairs(6, 9) ** 2
    )
    pooling = 64 * 14 * 14 * 100 + 256 * 1 * 1 * 36  # only the windows subsampling keeps
    classifier = 256 * 101
    assert summary.connections == filters + rectify + norm + pooling + classifier
    assert summary.connections == 3_708_854_656
    assert summary.multiply_adds == filters + classifier == 41_129_792
    assert analysis.summarize(_unfused(from_name("lecun83"))).multiply_adds == 41_129_792


def test_trainable_fused_pooling_keeps_its_counts_on_the_pooling_row():
    spec = from_name("lecun83", pooling="lp", p=2.0)
    import dataclasses

    stages = tuple(
        dataclasses.replace(s, pool=dataclasses.replace(s.pool, trainable=True))
        for s in spec.stages
    )
    fused = analysis.summarize(dataclasses.replace(spec, stages=stages))
    pool = fused.row("stage1.pool")
    assert pool.view == "lecture" and pool.operation == "L2 pooling 10×10, stride 1, trainable"
    assert (pool.weights, pool.biases, pool.multiply_adds) == (64, 64, 12_544)
    assert fused.row("stage1.subsample").weights == 0


def test_lecture_rows_in_text_and_json(summary):
    text = analysis.format_table(summary)
    lines = text.splitlines()
    pool = next(line for line in lines if line.startswith("stage1.pool "))
    subsample = next(line for line in lines if line.startswith("stage1.subsample "))
    assert "max pooling 10×10, stride 1 *" in pool and "64@66×66" in pool
    assert "278,784" in pool and "1,254,400" in pool
    assert "subsampling 5 *" in subsample and "64@14×14" in subsample and "12,544" in subsample
    assert "* the lecture's view of a fused pooling layer" in text
    data = json.loads(analysis.to_json(summary))
    rows = {row["name"]: row for row in data["rows"]}
    today = set(rows["stage1.filters"])  # the fields every row has
    assert "view" not in today and {"name", "operation", "maps", "units", "shape"} <= today
    for name, shape in (("stage1.pool", "64@66×66"), ("stage1.subsample", "64@14×14")):
        assert set(rows[name]) == today | {"view"}
        assert rows[name]["view"] == "lecture" and rows[name]["shape"] == shape
    assert (rows["stage1.pool"]["height"], rows["stage1.pool"]["units"]) == (66, 278_784)
    assert data["totals"]["connections"] == sum(row["connections"] for row in data["rows"])
    assert data["totals"]["connections"] == 3_708_854_656
    # An unfused network has the same rows and no "view" at all.
    unfused = analysis.summarize(_unfused(from_name("lecun83")))
    assert "view" not in analysis.to_json(unfused)
    assert "lecture's view" not in analysis.format_table(unfused)


def test_dense_equivalent_is_ten_to_the_ten():
    dense = analysis.dense_equivalent((1000, 1000), (100, 100))
    assert dense.input_units == 10**6
    assert dense.hidden_units == 10**4
    assert dense.weights == 10**10


def test_first_layer_weights_do_not_depend_on_image_size():
    import dataclasses

    spec = from_name("lecun83")
    big = dataclasses.replace(spec, input=dataclasses.replace(spec.input, height=200, width=300))
    assert analysis.summarize(big).row("stage1.filters").weights == 5184


def test_normalization_connections_count_window_pairs_inside_the_map():
    # A 3×3 window on a 3×3 map, one map: 3 positions per axis see 2, 3, 2 cells.
    assert analysis._window_pairs(3, 3) == 7
    from cnnkit.models import NormSpec

    assert analysis._norm_connections(NormSpec("subtractive", window=3), 1, 3, 3) == 49
    assert analysis._norm_connections(NormSpec("contrast", window=3), 2, 3, 3) == 2 * 4 * 49


def test_table_and_json_agree(summary):
    dense = analysis.dense_equivalent((1000, 1000), (100, 100))
    text = analysis.format_table(summary, dense)
    assert "6,889" in text and "64@75×75" in text and "363,237" in text
    assert "10,000,000,000" in text
    data = json.loads(analysis.to_json(summary, dense))
    assert data["rows"][0]["units"] == 6889
    assert data["rows"][0]["shape"] == "1@83×83"
    assert data["totals"]["parameters"] == 363_237
    assert data["dense"]["weights"] == 10**10


@pytest.mark.parametrize("bad", [(0, 5), (5,), (2.5, 3)])
def test_dense_equivalent_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="input_hw must be two positive integers"):
        analysis.dense_equivalent(bad, (10, 10))


def test_readme_summary_example_is_the_real_output(capsys):
    from pathlib import Path

    from cnnkit.cli import main

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    command = "$ cnnkit summary --dense 1000 1000 100 100\n"
    start = readme.index(command) + len(command)
    shown = readme[start : readme.index("```", start)]
    assert main(["summary", "--dense", "1000", "1000", "100", "100"]) == 0
    assert capsys.readouterr().out == shown
