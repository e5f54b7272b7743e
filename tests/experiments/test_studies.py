"""The studies end to end on tiny data: every output file, cells as run folders, a rerun
that trains nothing, an interrupted cell that resumes exactly, foreign folders refused."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from cnnkit import experiments, training
from cnnkit.experiments import cells as cells_module
from cnnkit.experiments.jarrett import COLUMNS as JARRETT_COLUMNS
from cnnkit.experiments.sharing import COLUMNS as SHARING_COLUMNS
from cnnkit.models import build
from cnnkit.training import epochs as training_epochs  # the loop that calls train_step

ONE_CELL = {
    "filters": ["learned"],
    "nonlinearity": ["abs"],
    "normalization": ["on"],
    "pooling": ["max"],
    "stages": [2],
}


def _rows(folder):
    with open(folder / "results.csv", newline="") as stream:
        reader = csv.DictReader(stream)
        return reader.fieldnames, list(reader)


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(cells_module, "fit", refuse)
    monkeypatch.setattr(cells_module, "resume", refuse)


def test_sharing_end_to_end(tiny_npz, tiny_spec, tmp_path, monkeypatch):
    out = tmp_path / "sharing"
    lines = []
    options = {"data": str(tiny_npz), "spec": tiny_spec, "sizes": [20, 40], "seeds": 1}
    summary = experiments.sharing(out, **options, epochs=1, min_steps=0, report=lines.append)
    for name in ("results.csv", "results.json", "results.md", "accuracy.png", "weights.png"):
        assert (out / name).stat().st_size > 0, name
    columns, rows = _rows(out)
    assert tuple(columns) == SHARING_COLUMNS
    assert [(r["family"], r["size"]) for r in rows] == [
        (f, s) for s in ("20", "40") for f in experiments.FAMILIES
    ]
    assert {r["weights"] for r in rows} == {"100", "1258", "7238"}
    for row in rows:
        train, test = float(row["train_accuracy"]), float(row["test_accuracy"])
        assert 0 <= train <= 1 and 0 <= test <= 1
        assert float(row["gap"]) == pytest.approx(train - test, abs=1e-5)
        # every cell is a run folder that `cnnkit evaluate` reads: same test images
        evaluated = training.evaluate_run(out / row["run"])
        assert evaluated.split == "test" and evaluated.result.images == 20
        assert evaluated.result.accuracy == pytest.approx(test)
    assert len(lines) == 6 and lines[-1].startswith("[####################] 6/6")
    assert json.loads((out / "results.json").read_text())["table"] == summary["table"]
    assert "| convolutional | 20 | 100 |" in (out / "results.md").read_text()

    _no_training(monkeypatch)  # the same command again: nothing trains, same results
    again = experiments.sharing(out, **options, epochs=1, min_steps=0, report=lines.append)
    assert again["table"] == summary["table"]
    assert all(line.endswith("(done before)") for line in lines[6:])

    with pytest.raises(ValueError, match="with epochs = 1, not 2; rerun with the same options"):
        experiments.sharing(out, **options, epochs=2, min_steps=0)
    with pytest.raises(ValueError, match="holds a `cnnkit experiment sharing` experiment, not"):
        experiments.jarrett(out, data=str(tiny_npz), spec=tiny_spec, axes=ONE_CELL, epochs=1)


def test_sharing_refuses_a_size_larger_than_the_split(tiny_npz, tiny_spec, tmp_path):
    with pytest.raises(ValueError, match=r"--sizes: 61 is larger than the training split \(60"):
        experiments.sharing(tmp_path / "x", data=str(tiny_npz), spec=tiny_spec, sizes=[61])
    with pytest.raises(ValueError, match="--sizes: 3 is too small; each of the 2 classes"):
        experiments.sharing(tmp_path / "x", data=str(tiny_npz), spec=tiny_spec, sizes=[3])
    assert not (tmp_path / "x").exists()


def test_jarrett_end_to_end(tiny_npz, tiny_spec, tmp_path):
    out = tmp_path / "jarrett"
    summary = experiments.jarrett(out, data=str(tiny_npz), spec=tiny_spec, quick=True, epochs=1)
    for name in ("results.csv", "results.json", "results.md", "jarrett.png"):
        assert (out / name).stat().st_size > 0, name
    columns, rows = _rows(out)
    assert tuple(columns) == JARRETT_COLUMNS
    assert len(rows) == 16
    assert {(r["filters"], r["nonlinearity"], r["normalization"], r["stages"]) for r in rows} == {
        (f, n, m, s)
        for f in ("random", "learned")
        for n in ("none", "abs")
        for m in ("off", "on")
        for s in ("1", "2")
    }
    assert {r["pooling"] for r in rows} == {"max"}
    # random filters: only the classifier trains (two stages: 16 -> 2; one: 27 -> 2)
    weights = {(r["filters"], r["stages"], r["weights"]) for r in rows}
    assert weights == {
        ("random", "2", "34"),
        ("learned", "2", "100"),
        ("random", "1", "56"),
        ("learned", "1", "86"),
    }
    assert [f["finding"] for f in summary["findings"]] == [
        "rectification and normalization matter most",
        "random filters come close to learned ones with R and N",
        "two stages beat one",
    ]
    assert all(f["holds"] in (True, False) for f in summary["findings"])  # all tested
    text = (out / "results.md").read_text()
    assert "| `F-R_abs-N-P_M ×2` |" in text and "Legend:" in text


def test_random_filters_stay_as_drawn(tiny_npz, tiny_spec, tmp_path):
    axes = {**ONE_CELL, "filters": ["random"]}
    experiments.jarrett(tmp_path / "j", data=str(tiny_npz), spec=tiny_spec, axes=axes, epochs=2)
    run = tmp_path / "j" / "cells" / "random-abs-on-max-2-seed0"
    trained = load_file(run / "last.safetensors")
    spec = training.load_run(run).spec
    torch.manual_seed(0)  # fit draws a spec's weights after seeding with the run's seed
    drawn = build(spec).state_dict()
    assert torch.equal(trained["model.stage1.filters.weight"], drawn["stage1.filters.weight"])
    assert torch.equal(trained["model.stage2.filters.bias"], drawn["stage2.filters.bias"])
    moved = trained["model.classifier.output.weight"] - drawn["classifier.output.weight"]
    assert float(moved.abs().max()) > 0


def test_an_interrupted_cell_resumes_exactly(tiny_npz, tiny_spec, tmp_path, monkeypatch):
    options = {"data": str(tiny_npz), "spec": tiny_spec, "axes": ONE_CELL, "epochs": 2}
    options["training"] = {"checkpoint_every_steps": 1, "batch_size": 16}
    experiments.jarrett(tmp_path / "whole", **options)

    real_step, calls = training_epochs.train_step, []

    def dies_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training_epochs, "train_step", dies_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        experiments.jarrett(tmp_path / "killed", **options)
    cell = "cells/learned-abs-on-max-2-seed0"
    killed = tmp_path / "killed" / cell
    assert json.loads((killed / "last.json").read_text())["step"] == 2
    assert not (tmp_path / "killed" / f"{cell}.json").exists()

    monkeypatch.setattr(training_epochs, "train_step", real_step)
    lines = []
    experiments.jarrett(tmp_path / "killed", **options, report=lines.append)
    whole = load_file(tmp_path / "whole" / cell / "last.safetensors")
    resumed = load_file(killed / "last.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert _rows(tmp_path / "whole")[1] == [
        {**r, "seconds": _rows(tmp_path / "whole")[1][0]["seconds"]}
        for r in _rows(tmp_path / "killed")[1]
    ]


def test_a_run_folder_is_not_an_experiment_folder(tiny_npz, tiny_spec, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a run folder .made by `cnnkit train`., not an exp"):
        experiments.jarrett(run, data=str(tiny_npz), spec=tiny_spec, axes=ONE_CELL, epochs=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and is not an experiment folder"):
        experiments.jarrett(
            tmp_path / "other", data=str(tiny_npz), spec=tiny_spec, axes=ONE_CELL, epochs=1
        )
