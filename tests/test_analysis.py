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
    pool = summary.row("stage1.pool")
    assert (pool.maps, pool.height, pool.width) == (64, 14, 14)
    third = summary.row("stage2.filters")
    assert (third.maps, third.height, third.width) == (256, 6, 6)
    assert (third.weights, third.biases, third.kernels) == (331_776, 256, 4096)
    assert third.multiply_adds == 4096 * 81 * 36
    assert summary.row("stage2.pool").units == 256
    assert summary.parameters == 363_237
    assert summary.kernels == 64 + 4096
    # 41.1 M useful multiply-adds per image in the two filter banks.
    assert round((first.multiply_adds + third.multiply_adds) / 1e6, 1) == 41.1


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
