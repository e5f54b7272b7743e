"""``cnnkit train``, ``evaluate`` and ``predict``: output, and one-line errors for every
mistake a user can make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli import main

from .conftest import CLASS_NAMES, TINY_SPEC, stripes


@pytest.fixture
def run_dir(trained: Path) -> Path:
    return trained


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("cnnkit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "x"], "argument --epochs: expected an integer >= 1, got 'x'"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
        (["--lr", "0"], "argument --lr: must be a number > 0, got '0'"),
        (["--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["--val-fraction", "1"], "argument --val-fraction: must be a number in (0, 1), got '1'"),
        (["--weight-decay", "-1"], "argument --weight-decay: must be a number >= 0, got '-1'"),
        (["--threads", "0"], "argument --threads: must be an integer in [1, "),
        (["--threads", "100000"], "logical CPUs), got 100000"),
        (
            ["--seed", "99999999999999999999999"],
            "argument --seed: must be an integer in [0, 9223372036854775807], got 9999",
        ),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
    ],
)
def test_bad_train_options_are_one_line_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["train", *argv])
    assert caught.value.code == 2
    assert message in one_line_error(capsys)


def test_unknown_preset_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "lecun99"]) == 2
    assert "unknown preset 'lecun99'; expected one of" in one_line_error(capsys)


def test_resume_refuses_other_options(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(run_dir), "--lr", "0.5"]) == 2
    assert "--lr cannot be given with it" in one_line_error(capsys)


def test_missing_run_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for verb in (["evaluate"], ["predict"], ["train", "--resume"]):
        extra = ["x.png"] if verb == ["predict"] else []
        assert main([*verb, str(tmp_path / "nowhere"), *extra]) == 2
        error = one_line_error(capsys)
        assert "run folder" in error and "nowhere' does not exist" in error


def test_evaluate_json_agrees_with_the_metrics(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(run_dir), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    best = json.loads((run_dir / "best.json").read_text())
    assert report["accuracy"] == best["scalars"]["test_accuracy"]
    assert report["split"] == "test" and report["images"] == 40
    assert len(report["confusion"]) == 4 and set(report["per_class"]) == {
        "horizontal",
        "vertical",
        "diagonal",
        "antidiagonal",
    }
    assert main(["evaluate", str(run_dir), "--checkpoint", "last"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint last (epoch 4)" in text and "per-class accuracy:" in text


def damaged_copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_checkpoint_is_one_line(
    run_dir: Path, tmp_path: Path, keep: int, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = damaged_copy(run_dir, tmp_path)
    best = copy / "best.safetensors"
    best.write_bytes(best.read_bytes()[:keep])
    assert main(["evaluate", str(copy)]) == 2
    assert "best.safetensors' is" in one_line_error(capsys)


def test_checkpoint_of_another_architecture_is_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = damaged_copy(run_dir, tmp_path)
    (copy / "spec.toml").write_text(TINY_SPEC.replace("maps = 4", "maps = 6"))
    assert main(["evaluate", str(copy)]) == 2
    assert "spec.toml is not the file the run started with" in one_line_error(capsys)


def test_predict_reports_unreadable_images_and_goes_on(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = np.zeros((12, 12), dtype=np.uint8)
    image[5, :] = 255
    Image.fromarray(image).save(tmp_path / "line.png")
    (tmp_path / "notes.txt").write_text("hello")
    argv = ["predict", str(run_dir), str(tmp_path / "notes.txt"), str(tmp_path / "line.png")]
    assert main([*argv, "--top-k", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'notes.txt'}: error: ")
    assert lines[1].startswith(f"{tmp_path / 'line.png'}: horizontal ")
    assert len(lines[1].split(", ")) == 2
    assert main([*argv[:2], str(tmp_path / "line.png"), "--format", "json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["top"][0]["class"] == "horizontal" and len(result["top"]) == 3


def test_train_blow_up_is_one_line_and_non_zero(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--spec", str(tiny_files["spec"]), "--data", str(tiny_files["data"])]
    argv += ["--lr", "1e30", "--epochs", "2", "--out", str(tmp_path / "run"), "--progress", "none"]
    assert main(argv) == 1
    error = one_line_error(capsys)
    assert "training stopped: the loss is" in error and "try a lower --lr" in error


def test_train_prints_epoch_lines_and_a_summary(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--spec", str(tiny_files["spec"]), "--data", str(tiny_files["data"])]
    argv += ["--epochs", "1", "--out", str(tmp_path / "run"), "--threads", "1"]
    assert main(argv) == 0  # stderr is not a terminal here: plain lines
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("epoch 1/1  train loss ")
    assert out[-1].startswith("done in ") and ": test accuracy " in out[-1]
    assert "after epoch 1 (the last), also the best checkpoint; run folder" in out[-1]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["invocation"]["spec"] == str(tiny_files["spec"])


def test_train_on_an_image_folder_warns_about_unreadable_files(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, labels = stripes(8, seed=3)
    root = tmp_path / "folder"
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / CLASS_NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / CLASS_NAMES[label] / f"{k}.png")
    (root / "vertical" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "diagonal" / "readme.txt").write_text("not an image")
    out = tmp_path / "run"
    argv = ["train", "--spec", str(trained / "spec.toml"), "--data", str(root)]
    assert main([*argv, "--epochs", "1", "--out", str(out), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("cnnkit: warning: skipped 2 file(s)")
    assert "broken.jpg" in captured.err and "readme.txt" in captured.err
    (row,) = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert row[5:7] == ["", ""]  # no test split: empty test columns
    assert ": validation accuracy " in captured.out and "(no test split)" in captured.out
    assert main(["evaluate", str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "val"


def test_building_the_kernels_is_reported_once_on_stdout(monkeypatch, capsys):
    """The first run on a machine builds the compiled kernels: one line on stdout says
    so, and a mistake is still one line on stderr; a process that has them says nothing."""
    from cnnkit import _native

    monkeypatch.setattr(_native, "_status", None)
    monkeypatch.setattr(_native, "_load", lambda: _native.NativeStatus(True, 12.4, ""))
    assert main(["train", "--preset", "lecun99"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "compiled cnnkit's CPU kernels in 12 s (once per machine)\n"
    assert captured.err.startswith("cnnkit: error: ") and captured.err.count("\n") == 1
    monkeypatch.setattr(_native, "_status", _native.NativeStatus(True, 12.4, ""))
    assert main(["train", "--preset", "lecun99"]) == 2
    assert capsys.readouterr().out == ""


def test_a_failed_build_is_not_reported_as_compiled(monkeypatch, capsys):
    from cnnkit import _native

    monkeypatch.setattr(_native, "_status", None)
    failed = _native.NativeStatus(False, 3.5, "RuntimeError: c++: not found")
    monkeypatch.setattr(_native, "_load", lambda: failed)
    assert main(["train", "--preset", "lecun99"]) == 2
    assert capsys.readouterr().out == ""


PLAIN_RANDOM_STAGE = """
[[stages]]
nonlinearity = ["abs"]
[stages.filters]
maps = 6
kernel = 3
table = "random"
fan_in = 2
seed = 3
balanced = {balanced}
"""


def test_a_plain_random_table_in_a_spec_reaches_the_trained_network(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from cnnkit import tables, training

    head, classifier = TINY_SPEC.split("[classifier]")
    spec = tmp_path / "plain.toml"
    spec.write_text(
        head + PLAIN_RANDOM_STAGE.format(balanced="false") + "\n[classifier]" + classifier
    )
    argv = ["train", "--spec", str(spec), "--data", str(tiny_files["data"]), "--epochs", "1"]
    argv += ["--out", str(tmp_path / "run"), "--threads", "1", "--progress", "none"]
    assert main(argv) == 0
    capsys.readouterr()
    run = training.load_run(tmp_path / "run", "last")
    expected = tables.random(4, 6, 2, seed=3, balanced=False)
    assert torch.equal(run.model.stage2.filters.table, expected)
    assert run.model.spec.stages[1].filters.balanced is False
    assert not torch.equal(expected, tables.random(4, 6, 2, seed=3))

    spec.write_text(
        head + PLAIN_RANDOM_STAGE.format(balanced='"no"') + "\n[classifier]" + classifier
    )
    assert main(["summary", "--spec", str(spec)]) == 2
    assert "balanced must be true or false, got 'no'" in one_line_error(capsys)
