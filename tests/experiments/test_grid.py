"""Grid files: the cross product of the named fields, and a clear message for each mistake."""

import csv

import pytest

from cnnkit import experiments
from cnnkit.experiments import load_grid


def _write(tmp_path, text, name="grid.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cross_product_in_order(tmp_path, tiny_spec_file):
    path = _write(
        tmp_path,
        f'spec = "{tiny_spec_file}"\n[training]\nepochs = 2\n'
        '[grid]\nweight_sharing = ["shared", "none"]\n'
        '"stages.1.filters.maps" = [2, 3, 5]\n"training.lr" = [0.01]\n',
    )
    grid = load_grid(path)
    choices = grid.combinations()
    assert [(c["weight_sharing"], c["stages.1.filters.maps"]) for c in choices] == [
        (w, m) for w in ("shared", "none") for m in (2, 3, 5)
    ]
    spec, training = grid.cell(choices[4])
    assert spec.weight_sharing == "none" and spec.stages[0].filters.maps == 3
    assert spec.stages[1].filters.maps == 4  # the other stage is untouched
    assert training == {"epochs": 2, "lr": 0.01}


def test_star_changes_every_stage(tmp_path, tiny_spec_file):
    path = _write(tmp_path, f'spec = "{tiny_spec_file}"\n[grid]\n"stages.*.pool.kind" = ["avg"]\n')
    spec, _ = load_grid(path).cell({"stages.*.pool.kind": "avg"})
    assert [s.pool.kind for s in spec.stages] == ["avg", "avg"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[grid]\n"stages.1.filters.mapz" = [2]',
            "field 'stages.1.filters.mapz' does not exist: "
            "filterbank has no .mapz. .it has maps, kernel",
        ),
        ('[grid]\n"stages.3.filters.maps" = [2]', "stage '3' is not 1..2 or *"),
        ('[grid]\n"stages.1" = [2]', "must name a stage and one of its fields"),
        ('[grid]\n"stages.1.filters" = [2]', "field 'stages.1.filters' is a section"),
        (
            '[grid]\n"stages.1.filters.maps" = [2, 0]',
            "stages.1.filters.maps = 0: filters.maps must be a positive integer, got 0",
        ),
        (
            '[grid]\nweight_sharing = ["tied"]',
            "weight_sharing = 'tied': weight_sharing must be one of "
            "'shared', 'averaged', 'none', got 'tied'",
        ),
        ('[grid]\n"classifier.hidden.width" = [3]', "the spec has no hidden there"),
        ("[grid]\ninput = [3]", "field 'input' is a section"),
        ('[grid]\n"training.lrr" = [0.1]', "field 'training.lrr' does not exist; training options"),
        ('[grid]\n"training.lr" = [-1.0]', "training.lr = -1.0: lr must be"),
        ("[grid]\nweight_sharing = 'none'", "weight_sharing must be a non-empty list of values"),
        ("[grid]\nweight_sharing = []", "weight_sharing must be a non-empty list of values"),
        ("[grid]", r"\[grid\] must list at least one field"),
        ("[training]\nepochz = 2\n[grid]\nseeds = [1]", "training option 'epochz' does not exist"),
        ('colour = "red"\n[grid]\nweight_sharing = ["none"]', "unknown key 'colour'"),
        ('preset = "lenet5"\n[grid]\nx = [1]', "give preset or spec, not both"),
        ("size = 0\n[grid]\nweight_sharing = ['none']", "size must be an integer >= 1, got 0"),
        ("[grid\n", "not valid TOML"),
    ],
)
def test_bad_grids(tmp_path, tiny_spec_file, body, message):
    path = _write(tmp_path, f'spec = "{tiny_spec_file}"\n{body}\n')
    with pytest.raises(ValueError, match=message):
        load_grid(path)


def test_missing_grid_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="grid file .*nope.toml' does not exist"):
        load_grid(tmp_path / "nope.toml")


def test_grid_end_to_end(tmp_path, tiny_spec_file, tiny_npz):
    path = _write(
        tmp_path,
        f'spec = "{tiny_spec_file}"\ndata = "{tiny_npz}"\nsize = 40\n'
        '[training]\nepochs = 1\n[grid]\n"stages.*.nonlinearity" = ["abs", "relu"]\n'
        'weight_sharing = ["shared", "none"]\n',
    )
    out = tmp_path / "out"
    experiments.grid(path, out)
    for name in ("results.csv", "results.json", "results.md", "grid.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == [
        "stages.*.nonlinearity", "weight_sharing", "seed", "weights", "train_accuracy",
        "test_accuracy", "gap", "seconds", "run",
    ]  # fmt: skip
    assert [(r["stages.*.nonlinearity"], r["weight_sharing"]) for r in rows] == [
        ("abs", "shared"), ("abs", "none"), ("relu", "shared"), ("relu", "none"),
    ]  # fmt: skip
    assert [r["weights"] for r in rows] == ["100", "1258", "100", "1258"]
    assert (out / rows[3]["run"] / "spec.toml").read_text().count('nonlinearity = ["relu"]') == 2
