"""The training loop through the Python API: files, metrics, evaluation, blow-ups."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnkit.data import load
from cnnkit.models import ArchitectureSpec
from cnnkit.training import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    evaluate_run,
    fit,
    load_run,
    predict,
    read_checkpoint,
    resume,
)
from cnnkit.training.loop import epoch_order, epoch_shifts, shift_images
from cnnkit.training.run_folder import METRICS_COLUMNS

from .conftest import CLASS_NAMES, TINY_CONFIG, train_tiny

CONFIG = TrainConfig(**TINY_CONFIG)


def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_short_run_lowers_the_loss_and_writes_every_file(
    trained: Path, tiny_files: dict[str, Path]
) -> None:
    names = sorted(p.name for p in trained.iterdir())
    assert names == [
        "best.json",
        "best.safetensors",
        "classes.json",
        "config.json",
        "last.json",
        "last.safetensors",
        "methods.json",
        "metrics.csv",
        "spec.toml",
    ]
    header = (trained / "metrics.csv").read_text().splitlines()[0]
    assert header == ",".join(METRICS_COLUMNS)
    rows = metrics(trained)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    for row in rows:
        for column in ("train_accuracy", "val_accuracy", "test_accuracy"):
            assert 0.0 <= float(row[column]) <= 1.0
        assert float(row["images_per_s"]) > 0 and float(row["seconds"]) > 0
    assert float(rows[-1]["test_accuracy"]) > 0.75  # 4 classes: chance is 0.25

    config = json.loads((trained / "config.json").read_text())
    assert config["training"] == CONFIG.to_dict()
    assert config["data"]["source"] == str(tiny_files["data"].resolve())
    assert len(config["data"]["digest"]) == 64
    assert {"cnnkit", "torch", "python"} <= config["versions"].keys()
    assert json.loads((trained / "classes.json").read_text()) == CLASS_NAMES
    assert ArchitectureSpec.load(str(trained / "spec.toml")).name == "tiny"

    last = json.loads((trained / "last.json").read_text())
    assert (last["epoch"], last["batch_in_epoch"], last["step"]) == (4, 0, 4 * 16)
    assert read_checkpoint(trained / "last.safetensors").optimizer  # momentum buffers
    assert read_checkpoint(trained / "best.safetensors").optimizer == {}


def test_evaluate_agrees_with_the_recorded_test_accuracy(trained: Path) -> None:
    best_epoch = json.loads((trained / "best.json").read_text())["epoch"]
    row = metrics(trained)[best_epoch - 1]
    result = evaluate_run(trained)
    assert (result.split, result.epoch) == ("test", best_epoch)
    assert result.result.accuracy == float(row["test_accuracy"])
    assert result.result.loss == pytest.approx(float(row["test_loss"]), rel=1e-6)
    confusion = np.asarray(result.result.confusion)
    assert confusion.shape == (4, 4) and confusion.sum() == 40
    per_class = result.result.per_class
    assert per_class["vertical"] == confusion[1, 1] / confusion[1].sum()
    assert "confusion matrix (rows: true class, columns: predicted class):" in result.to_text()


def test_load_run_gives_model_classes_transform_and_metadata(trained: Path, tmp_path: Path) -> None:
    run = load_run(trained, "last")
    assert run.class_names == CLASS_NAMES
    assert run.transform.input_hw == (12, 12)
    assert run.metadata["epoch"] == 4 and not run.model.training
    saved = read_checkpoint(trained / "last.safetensors").model
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, saved[key])

    image = np.zeros((24, 24), dtype=np.uint8)
    image[:, 10:12] = 255  # a vertical stripe, twice the size of the training images
    Image.fromarray(image).save(tmp_path / "vertical.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = [tmp_path / "vertical.png", tmp_path / "broken.png", tmp_path / "missing.png"]
    results = predict(run, paths, top_k=10)
    good, broken, missing = results
    assert [c for c, _ in good.top][0] == "vertical" and len(good.top) == 4
    probabilities = [p for _, p in good.top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert broken.error and "not a readable image" in broken.error
    assert missing.error and "does not exist" in missing.error


def test_float64_training_keeps_float64_everywhere_and_tracks_float32(
    tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    options = {**TINY_CONFIG, "epochs": 2}
    wide = train_tiny(tiny_files, TrainConfig(**options, dtype="float64"), tmp_path / "f64")
    narrow = train_tiny(tiny_files, TrainConfig(**options), tmp_path / "f32")
    saved = read_checkpoint(wide / "last.safetensors").model
    reference = read_checkpoint(narrow / "last.safetensors").model
    for key, value in saved.items():
        if value.is_floating_point():
            assert value.dtype == torch.float64, key
            # same trajectory; float32 rounding alone separates the two runs
            torch.testing.assert_close(value.float(), reference[key], rtol=0, atol=1e-4)
    run = load_run(wide, "last")
    assert next(run.model.parameters()).dtype == torch.float64
    result = evaluate_run(wide, "last")
    assert result.result.accuracy == float(metrics(wide)[-1]["test_accuracy"])
    assert result.result.loss == pytest.approx(float(metrics(wide)[-1]["test_loss"]), rel=1e-12)
    image = tmp_path / "stripe.png"
    Image.fromarray(np.full((12, 12), 40, dtype=np.uint8)).save(image)
    (answer,) = predict(run, [image], top_k=4)
    assert answer.error is None and sum(p for _, p in answer.top) == pytest.approx(1.0)


def test_resuming_a_finished_run_changes_nothing(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (trained / "last.safetensors").read_bytes()
    assert resume(trained, progress="lines") == trained
    assert "already finished (4 of 4 epochs); nothing to do" in capsys.readouterr().out
    assert (trained / "last.safetensors").read_bytes() == before


def test_resume_refuses_a_damaged_checkpoint(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in trained.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    blob = (copy / "last.safetensors").read_bytes()
    (copy / "last.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="last.safetensors' is damaged or truncated"):
        resume(copy)


class BlowsUp(nn.Module):
    """A linear classifier whose training forward returns NaN from call ``at`` on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.linear = nn.Linear(144, 4)
        self.calls, self.at = 0, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= self.at:
                return logits * float("nan")
        return logits


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(
    tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    data = load(tiny_files["data"], (12, 12))
    model = BlowsUp(at=19)  # 16 steps per epoch: step 19 is batch 3 of epoch 2
    with pytest.raises(NonFiniteLossError) as caught:
        fit(model, data, CONFIG, out=tmp_path / "run")
    message = str(caught.value)
    assert "the loss is nan at epoch 2, step 19 (batch 3)" in message
    assert "learning rate" in message and "try a lower --lr" in message
    assert "last.safetensors (end of epoch 1) is kept" in message
    assert model.calls == 19  # stopped at once
    assert read_checkpoint(tmp_path / "run" / "last.safetensors").meta["epoch"] == 1
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == ["1"]


def test_data_order_depends_only_on_seed_and_epoch() -> None:
    first = epoch_order(100, seed=3, epoch=5)
    assert torch.equal(first, epoch_order(100, seed=3, epoch=5))
    assert torch.equal(first.sort().values, torch.arange(100))
    assert not torch.equal(first, epoch_order(100, seed=3, epoch=6))
    assert not torch.equal(first, epoch_order(100, seed=4, epoch=5))
    shifts = epoch_shifts(100, 2, seed=3, epoch=5)
    assert torch.equal(shifts, epoch_shifts(100, 2, seed=3, epoch=5))
    assert shifts.abs().max() <= 2 and shifts.shape == (100, 2)


def test_shift_moves_the_content_and_repeats_the_border() -> None:
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    moved = shift_images(image, torch.tensor([[1, -2]]))
    expected = torch.tensor(
        [[2.0, 3, 3, 3], [2, 3, 3, 3], [6, 7, 7, 7], [10, 11, 11, 11]]
    )  # down by 1, left by 2
    assert torch.equal(moved[0, 0], expected)
    assert torch.equal(shift_images(image, torch.zeros(1, 2, dtype=torch.int64)), image)


def test_training_works_after_evaluating_the_lecture_network() -> None:
    from cnnkit.data.splits import ImageSet
    from cnnkit.models import build, from_name
    from cnnkit.training import evaluate, train_step

    torch.manual_seed(0)
    model = build(from_name("lecun83", classes=3))
    images = ImageSet(torch.rand(3, 1, 83, 83), torch.tensor([0, 1, 2]), ["a", "b", "c"])
    assert evaluate(model, images).images == 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss, correct = train_step(model, optimizer, images.images, images.labels, lr=0.01)
    assert loss > 0 and 0 <= correct <= 3
