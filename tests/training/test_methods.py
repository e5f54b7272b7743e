"""A run records the implementation choices it used, and a resume takes them again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnkit.kernels import table_conv, tuning
from cnnkit.training import TrainConfig, resume
from cnnkit.training.run_folder import RunFolder, read_methods

from .conftest import TINY_CONFIG, train_tiny


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CNNKIT_TUNE", "1")
    monkeypatch.setenv("CNNKIT_FAST", "1")  # the fast paths are what is timed
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "_choices", None)
    monkeypatch.setattr(tuning, "_used", {})
    monkeypatch.setattr(tuning, "_pinned", None)
    monkeypatch.setattr(tuning, "_announced", False)


def test_a_resume_computes_with_the_methods_the_run_recorded(
    tiny_files, tmp_path, measured, monkeypatch
) -> None:
    config = TrainConfig(**{**TINY_CONFIG, "epochs": 1})
    run = train_tiny(tiny_files, config, tmp_path / "run")
    methods = read_methods(RunFolder(run))
    # 128 images in batches of 8; the stage runs them in slices of the recorded size
    (slicing,) = [c for c in methods if c.startswith("stage_slice") and " grad " in c]
    images = int(methods[slicing])
    training = [
        case for case in methods if case.startswith(f"table_conv x({images}, ") and " grad " in case
    ]
    assert len(training) == 1 and methods[training[0]] in table_conv.METHODS
    # As if the machine had chosen otherwise when the run began: the resume must follow
    # the run's record, not the machine's file, whatever CNNKIT_TUNE says now.
    other = next(m for m in ("unfold", "fourier", "dense") if m != methods[training[0]])
    (run / "methods.json").write_text(json.dumps({**methods, training[0]: other}))
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    seen: set[str] = set()
    real_conv = table_conv.conv

    def spying(method, x, *args):
        if torch.is_grad_enabled():
            seen.add(method)
        return real_conv(method, x, *args)

    monkeypatch.setattr(table_conv, "conv", spying)
    resume(run, epochs=2)
    assert seen == {other}
    assert read_methods(RunFolder(run))[training[0]] == other  # the record is kept


def test_a_damaged_methods_file_is_named(trained: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "methods.json").write_text('["dense"]')
    with pytest.raises(ValueError, match="methods file .* must map each case to a method"):
        resume(run, epochs=5)
