"""Checkpoints: round trip, verification, refusal of damaged and foreign files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cnnkit.training.checkpoint import (
    CheckpointError,
    load_model_state,
    load_optimizer_state,
    optimizer_tensors,
    read_checkpoint,
    save_checkpoint,
    sidecar_path,
)
from cnnkit.training.run_folder import RunFolder, clean_leftovers


def small_model(hidden: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def trained_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=0.01)
    )
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    return opt


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = small_model()
    opt = trained_optimizer(model, "sgd")
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model.state_dict(), {"epoch": 2, "step": 7}, optimizer_tensors(opt))
    return path


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_round_trip_restores_weights_and_optimizer_state(tmp_path: Path, kind: str) -> None:
    model = small_model()
    opt = trained_optimizer(model, kind)
    path = tmp_path / "c.safetensors"
    meta = {"epoch": 3, "step": 11, "loss": 0.1 + 0.2}
    save_checkpoint(path, model.state_dict(), meta, optimizer_tensors(opt))

    loaded = read_checkpoint(path)
    assert loaded.meta == meta  # floats survive JSON exactly
    fresh = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    load_model_state(fresh, loaded)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    fresh_opt = (
        torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
        if kind == "sgd"
        else torch.optim.AdamW(fresh.parameters(), lr=0.01)
    )
    load_optimizer_state(fresh_opt, loaded)
    original, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert original.keys() == restored.keys()
    for index in original:
        for key, value in original[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored[index][key]))
    # the sidecar repeats the meta data for people
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["epoch"] == 3 and sidecar["checkpoint"] == "c.safetensors"


def test_stale_sidecar_is_rewritten_from_the_checkpoint(saved: Path) -> None:
    sidecar_path(saved).write_text('{"epoch": 1}')
    assert read_checkpoint(saved).meta["epoch"] == 2
    assert json.loads(sidecar_path(saved).read_text())["epoch"] == 1  # readers do not write
    assert read_checkpoint(saved, repair_sidecar=True).meta["epoch"] == 2
    assert json.loads(sidecar_path(saved).read_text())["epoch"] == 2


def test_truncated_checkpoint_is_refused_at_every_offset(saved: Path, tmp_path: Path) -> None:
    blob = saved.read_bytes()
    (header_length,) = struct.unpack("<Q", blob[:8])
    offsets = [0, 1, 7, 8, 9, 8 + header_length // 2, 8 + header_length, len(blob) - 100]
    offsets += [len(blob) - 1]
    for offset in offsets:
        cut = tmp_path / f"cut{offset}.safetensors"
        cut.write_bytes(blob[:offset])
        with pytest.raises(CheckpointError, match=r"truncated|damaged|not a cnnkit checkpoint"):
            read_checkpoint(cut)


def test_flipped_byte_in_the_weights_is_detected(saved: Path) -> None:
    blob = bytearray(saved.read_bytes())
    blob[-3] ^= 0x40
    saved.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="damaged: its tensors do not match the digest"):
        read_checkpoint(saved)


class _Trap:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_renamed_to_safetensors_is_refused_without_running(
    tmp_path: Path, writer: str
) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "last.safetensors"
    payload = {"weight": torch.zeros(2), "trap": _Trap(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="is not a cnnkit checkpoint"):
        read_checkpoint(path)
    assert not marker.exists()


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="no 'cnnkit-checkpoint/1' format tag"):
        read_checkpoint(path)


def test_checkpoint_of_another_architecture_is_refused(saved: Path) -> None:
    checkpoint = read_checkpoint(saved)
    with pytest.raises(CheckpointError, match=r"another architecture: '0.weight' is \(5, 3\)"):
        load_model_state(small_model(hidden=6), checkpoint)
    deeper = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="another architecture: it has no tensor '3.weight'"):
        load_model_state(deeper, checkpoint)


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.safetensors' does not exist"):
        read_checkpoint(tmp_path / "nothing.safetensors")


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    model = small_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    path = tmp_path / "last.safetensors"
    with pytest.raises(CheckpointError, match="0.weight holds NaN or inf"):
        save_checkpoint(path, model.state_dict(), {})
    assert not path.exists()


def test_leftover_temporary_files_are_cleaned(tmp_path: Path, saved: Path) -> None:
    leftover = saved.parent / ".last.safetensors.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    removed = clean_leftovers(RunFolder(saved.parent))
    assert removed == [leftover] and not leftover.exists() and saved.exists()
