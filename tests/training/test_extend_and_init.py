"""``train --resume RUN --epochs N`` and ``train --init-from RUN``; ``presets`` and ``spec``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnkit.cli import main
from cnnkit.models import ArchitectureSpec, from_name
from cnnkit.training.checkpoint import read_checkpoint

from .conftest import TINY_SPEC, tiny_argv


def tiny_train(tiny_files, out: Path, *extra: str) -> list[str]:
    return tiny_argv(
        tiny_files,
        *("--device", "cpu", "--batch-size", "8", "--schedule", "constant"),
        *("--out", str(out), *extra),
    )


def weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return read_checkpoint(run / f"{which}.safetensors").model


def test_extending_a_run_equals_a_longer_run(tiny_files, tmp_path):
    """2 epochs then extended to 3 == 3 epochs at once (constant schedule; the warm-up is
    round(5% of 32 steps) = round(5% of 48 steps) = 2 steps in both)."""
    short, long = tmp_path / "short", tmp_path / "long"
    assert main(tiny_train(tiny_files, short, "--epochs", "2")) == 0
    assert main(["train", "--resume", str(short), "--epochs", "3", "--progress", "none"]) == 0
    assert main(tiny_train(tiny_files, long, "--epochs", "3")) == 0
    a, b = weights(short), weights(long)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config = json.loads((short / "config.json").read_text())
    assert config["training"]["epochs"] == 3
    assert config["extended"][0]["from_epochs"] == 2
    assert (short / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs


def test_extending_a_decaying_schedule_reports_the_jump_once(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", "--resume", str(run), "--epochs", "5", "--progress", "lines"]) == 0
    out = capsys.readouterr().out
    assert out.count("the learning rate jumps from ") == 1
    assert "schedule of a 5-epoch run" in out
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "--epochs 2 is fewer than the 5 epochs" in capsys.readouterr().err


def test_init_from_another_run_with_other_classes(trained, tiny_files, tmp_path, capsys):
    import numpy as np

    from .conftest import stripes

    images, labels = stripes(20, seed=5)
    keep = labels < 3  # three classes instead of four
    data = tmp_path / "three.npz"
    np.savez(data, images=images[keep], labels=labels[keep])
    out = tmp_path / "new"
    argv = ["train", "--spec", str(tiny_files["spec"]), "--data", str(data), "--epochs", "1"]
    argv += ["--init-from", str(trained), "--checkpoint", "last", "--out", str(out)]
    assert main([*argv, "--threads", "1", "--lr", "1e-12", "--progress", "lines"]) == 0
    text = capsys.readouterr().out
    assert f"weights from run {trained}, last checkpoint (epoch 4)" in text
    assert "output layer is re-initialised (4 classes there, 3 here)" in text
    source, new = weights(trained), weights(out)
    config = json.loads((out / "config.json").read_text())
    fresh = set(config["init_from"]["reinitialised"])
    assert fresh and all(new[k].shape != source[k].shape for k in fresh)
    for key, tensor in new.items():
        if key not in fresh:  # a learning rate of 1e-12: nothing visible moves
            assert torch.allclose(tensor, source[key], atol=1e-9), key
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"]["run"] == str(trained)


def test_init_from_another_architecture_is_refused(trained, tmp_path, capsys):
    other = tmp_path / "other.toml"
    other.write_text(TINY_SPEC.replace("kernel = 3", "kernel = 5"))
    argv = [
        "train",
        "--spec",
        str(other),
        "--init-from",
        str(trained),
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained another architecture ('tiny'): its 'stages'" in err
    assert not (tmp_path / "x").exists()


def test_presets_lists_every_preset_with_counts(capsys):
    from cnnkit import analysis
    from cnnkit.models import list_presets

    assert main(["presets", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_presets()
    for row in rows:
        summary = analysis.summarize(from_name(row["name"]))
        assert (row["weights"], row["biases"]) == (summary.weights, summary.biases)
        assert row["description"]


@pytest.mark.parametrize("name", ["lecun83", "lenet5", "digits28"])
def test_spec_prints_a_preset_that_loads_back_equal(name, tmp_path, capsys):
    assert main(["spec", name]) == 0
    assert ArchitectureSpec.from_toml(capsys.readouterr().out) == from_name(name)
    assert main(["spec", name, "--out", str(tmp_path / "s.toml")]) == 0
    assert ArchitectureSpec.load(str(tmp_path / "s.toml")) == from_name(name)
