"""The rules of a training run, through ``fit`` and ``resume`` themselves (no command line):
clipping with averaged weight sharing, the options a resumed run refuses, its length,
and ``init_checkpoint`` without ``init_from``."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from cnnkit.cli import main
from cnnkit.data import load
from cnnkit.models import ArchitectureSpec
from cnnkit.training import RESUME_OVERRIDES, RuleError, TrainConfig, fit, resume
from cnnkit.training import epochs as training_epochs
from cnnkit.training.checkpoint import read_checkpoint
from cnnkit.training.config import DEFAULT_GRAD_CLIP
from cnnkit.training.rules import (
    Option,
    check_init_choice,
    check_resume_options,
    grad_clip_for,
)

# 128 training images in batches of 64: two steps per epoch
QUICK = {"epochs": 1, "batch_size": 64, "lr": 0.1, "threads": 1, "device": "cpu"}


def tiny(tiny_files: dict[str, Path], weight_sharing: str = "shared") -> ArchitectureSpec:
    spec = ArchitectureSpec.load(str(tiny_files["spec"]))
    return dataclasses.replace(spec, weight_sharing=weight_sharing)


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture
def clips(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """The ``clip`` each training step of ``fit`` or ``resume`` is given, in order."""
    seen: list[float | None] = []
    real_step = training_epochs.train_step

    def recording(model, optimizer, images, labels, lr, clip=None, **kwargs):
        seen.append(clip)
        return real_step(model, optimizer, images, labels, lr, clip, **kwargs)

    monkeypatch.setattr(training_epochs, "train_step", recording)
    return seen


# --------------------------------------------------------------------------------------
# Gradient clipping and weight sharing by averaging
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight_sharing", "grad_clip", "expected"),
    [
        ("averaged", "auto", None),  # the rule: off for averaged networks
        ("shared", "auto", DEFAULT_GRAD_CLIP),
        ("none", "auto", DEFAULT_GRAD_CLIP),
        ("averaged", 1.5, 1.5),  # a number asks for clipping anyway
        ("shared", None, None),
    ],
)
def test_fit_clips_by_the_rule(
    tiny_files, tmp_path, clips, weight_sharing, grad_clip, expected
) -> None:
    data = load(tiny_files["data"], (12, 12))
    config = TrainConfig(**QUICK, grad_clip=grad_clip)
    fit(tiny(tiny_files, weight_sharing), data, config, out=tmp_path / "run")
    assert clips == [expected, expected]


def test_an_averaged_run_without_clipping_is_the_default(tiny_files, tmp_path) -> None:
    """Independent of how the step is called: the default equals an explicit ``None``,
    bit for bit, and differs from a run clipped hard."""
    data = load(tiny_files["data"], (12, 12))
    spec = tiny(tiny_files, "averaged")
    runs = {}
    for name, clip in (("auto", "auto"), ("off", None), ("hard", 1e-3)):
        config = TrainConfig(**QUICK, grad_clip=clip)
        run = fit(spec, data, config, out=tmp_path / name)
        runs[name] = read_checkpoint(run / "last.safetensors").model
    key = "stage1.filters.weight"  # (H_out, W_out, K, kh, kw): a kernel per position
    assert torch.equal(runs["auto"][key], runs["off"][key])
    assert not torch.equal(runs["auto"][key], runs["hard"][key])


def test_resume_keeps_the_clipping_rule(tiny_files, tmp_path, clips) -> None:
    data = load(tiny_files["data"], (12, 12))
    run = fit(tiny(tiny_files, "averaged"), data, TrainConfig(**QUICK), out=tmp_path / "run")
    assert resume(run, epochs=2) == run
    assert clips == [None] * 4


def test_the_clip_for_a_module_without_a_spec_is_the_default() -> None:
    assert grad_clip_for(TrainConfig(), None) == DEFAULT_GRAD_CLIP
    assert grad_clip_for(TrainConfig(), torch.nn.Linear(2, 2)) == DEFAULT_GRAD_CLIP
    assert grad_clip_for(TrainConfig(grad_clip=2.0), None) == 2.0


# --------------------------------------------------------------------------------------
# A resumed run keeps its own options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    ["lr", "batch_size", "seed", "grad_clip", "augment", "init_from", "out", "config"],
)
def test_resume_refuses_an_option_of_the_run(trained, option) -> None:
    before = files(trained)
    with pytest.raises(RuleError) as caught:
        resume(trained, **{option: None})
    assert str(caught.value) == (
        "resume continues a run with its own options (only device, threads and epochs "
        f"may be given again); {option} cannot be given with it"
    )
    assert isinstance(caught.value, ValueError)
    assert files(trained) == before


def test_resume_names_a_misspelt_keyword(trained) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        resume(trained, learning_rate=0.1)


def test_resume_takes_the_overrides(trained, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = files(run)
    assert resume(run, device="cpu", threads=1, epochs=4) == run  # finished: nothing to do
    assert files(run) == before
    check_resume_options(RESUME_OVERRIDES)  # every override is allowed


def test_resume_refuses_fewer_epochs_than_done(trained, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = files(run)
    with pytest.raises(RuleError) as caught:
        resume(run, epochs=3)
    assert str(caught.value) == (
        f"epochs 3 is fewer than the 4 epochs run {str(run)!r} has already trained"
    )
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        resume(run, epochs=0)
    assert files(run) == before


# --------------------------------------------------------------------------------------
# init_checkpoint belongs to init_from
# --------------------------------------------------------------------------------------


def test_fit_refuses_init_checkpoint_without_init_from(tiny_files, tmp_path) -> None:
    data = load(tiny_files["data"], (12, 12))
    out = tmp_path / "run"
    with pytest.raises(RuleError) as caught:
        fit(tiny(tiny_files), data, TrainConfig(**QUICK), out=out, init_checkpoint="last")
    assert str(caught.value) == "init_checkpoint chooses the weights of init_from; give it with it"
    assert not out.exists()


def test_init_checkpoint_defaults_to_best_and_is_checked(trained) -> None:
    assert check_init_choice(None, None) is None
    assert check_init_choice(trained, None) == "best"
    assert check_init_choice(trained, "last") == "last"
    with pytest.raises(ValueError, match="init_checkpoint must be one of 'best', 'last'"):
        check_init_choice(trained, "middle")


# --------------------------------------------------------------------------------------
# The messages, as Python and as the command line name the options
# --------------------------------------------------------------------------------------


def test_a_rule_error_respells_its_options_and_survives_pickling() -> None:
    error = RuleError(Option("init_checkpoint"), " chooses the weights of ", Option("init_from"))
    assert str(error) == "init_checkpoint chooses the weights of init_from"
    assert error.spelled(str.upper) == "INIT_CHECKPOINT chooses the weights of INIT_FROM"
    copy = pickle.loads(pickle.dumps(error))
    assert copy.spelled(str.upper) == error.spelled(str.upper)


def test_the_command_line_names_its_flags(trained, capsys) -> None:
    assert main(["train", "--checkpoint", "last", "--epochs", "1"]) == 2
    assert capsys.readouterr().err == (
        "cnnkit: error: --checkpoint chooses the weights of --init-from; give it with it\n"
    )
    assert main(["train", "--resume", str(trained), "--seed", "3"]) == 2
    assert capsys.readouterr().err == (
        "cnnkit: error: --resume continues a run with its own options (only --device, "
        "--threads and --epochs may be given again); --seed cannot be given with it\n"
    )
