"""``cnnkit export``: a trained run as ONNX or a torch.export archive, loaded back and
checked against the eager network; one-line errors for a user's mistakes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.cli import main
from cnnkit.export import export_run

from .conftest import TINY_SPEC, lock_held_elsewhere, train_tiny
from .test_cli_training import one_line_error

pytest.importorskip("onnxruntime")

WITH_NORM = TINY_SPEC.replace(
    "[stages.pool]", '[stages.norm]\nkind = "contrast"\nwindow = 3\n[stages.pool]'
)


@pytest.fixture(scope="module")
def run(tiny_files, tmp_path_factory) -> Path:
    from cnnkit.training import TrainConfig

    folder = tmp_path_factory.mktemp("export")
    spec = folder / "norm.toml"
    spec.write_text(WITH_NORM, encoding="utf-8")
    config = TrainConfig(epochs=1, batch_size=16, lr=0.1, threads=1, device="cpu")
    return train_tiny({**tiny_files, "spec": spec}, config, folder / "run")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_onnx_round_trip_with_metadata_and_any_batch(run, capsys):
    import onnx
    import onnxruntime

    assert main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    assert "model.onnx (onnx); checked on 40 test images" in out
    assert "100.00% of predictions agree: every prediction agrees" in out
    path = run / "model.onnx"
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 18
    meta = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(meta["class_names"]) == json.loads((run / "classes.json").read_text())
    assert json.loads(meta["input_shape"]) == [1, 12, 12]
    assert meta["input_rule"] == "gray-unit/fit-bilinear/pad-edge-mean"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 256):
        images = np.random.default_rng(0).random((batch, 1, 12, 12), dtype=np.float32)
        (logits,) = session.run(None, {"images": images})
        assert logits.shape == (batch, 4)


def test_pt2_round_trip(run, tmp_path):
    result = export_run(run, format="pt2", checkpoint="last", out=tmp_path / "net.pt2")
    assert result.ok and result.split == "test" and result.images == 40
    assert result.max_difference < 1e-4
    program = torch.export.load(str(tmp_path / "net.pt2"))
    for batch in (1, 256):
        assert program.module()(torch.rand(batch, 1, 12, 12)).shape == (batch, 4)
    extra = {"cnnkit.json": ""}
    torch.export.load(str(tmp_path / "net.pt2"), extra_files=extra)
    assert json.loads(json.loads(extra["cnnkit.json"])["class_names"])[0] == "horizontal"


def test_a_failed_check_keeps_the_file_and_exits_1(run, tmp_path, monkeypatch, capsys):
    from cnnkit import export

    monkeypatch.setattr(export, "_compare", lambda model, run, images: (3.0, 0.5))
    out = tmp_path / "net.pt2"
    assert main(["export", str(run), "--format", "pt2", "--out", str(out)]) == 1
    assert "PREDICTIONS DIFFER (file kept)" in capsys.readouterr().out
    assert out.is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "{missing}"], "missing' does not exist"),
        (["export", "{run}", "--format", "tflite"], "argument --format: invalid choice"),
        (["export", "{run}", "--out", "{run}"], "is a folder; name the file to write"),
        (["export", "{run}", "--out", "{run}/no/such/model.onnx"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(run, tmp_path, argv, message, capsys):
    argv = [a.format(run=run, missing=tmp_path / "missing") for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert message in one_line_error(capsys)


def test_export_into_a_run_folder_another_process_writes_is_refused(run, tmp_path, capsys):
    with lock_held_elsewhere(run) as holder:
        assert main(["export", str(run), "--format", "pt2"]) == 2
        assert f"process {holder} is writing" in one_line_error(capsys)
        elsewhere = tmp_path / "net.pt2"  # a file outside the run: no lock needed
        assert main(["export", str(run), "--format", "pt2", "--out", str(elsewhere)]) == 0
