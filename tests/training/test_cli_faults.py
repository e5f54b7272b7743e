"""The command line under faults: every one is a single ``cnnkit: error:`` line, status 2,
no traceback, and the run folder's files unchanged."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnkit import _files
from cnnkit.cli import main

from .conftest import SRC, TINY_SPEC, lock_held_elsewhere, tiny_argv


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("cnnkit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (names, modes included in the digest) -> its sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# --------------------------------------------------------------------------------------
# Read-only targets and a full disk
# --------------------------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere
        pytest.skip("this user can write into read-only folders")
    yield folder
    folder.chmod(0o755)


def test_train_into_a_read_only_folder_is_one_line(tiny_files, read_only, capsys):
    assert main(tiny_argv(tiny_files, "--out", str(read_only / "run"), "--epochs", "1")) == 2
    error = one_line_error(capsys)
    assert str(read_only / "run") in error and "Permission denied" in error
    assert list(read_only.iterdir()) == []


def test_show_into_a_read_only_folder_is_one_line(tmp_path, read_only, capsys):
    from PIL import Image

    Image.new("L", (12, 12)).save(tmp_path / "x.png")
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    argv = ["show", str(tmp_path / "x.png"), "--spec", str(spec)]
    assert main([*argv, "--out", str(read_only / "maps.png")]) == 2
    assert "Permission denied" in one_line_error(capsys)


def test_a_full_disk_mid_checkpoint_is_one_line_and_keeps_the_run(run_copy, monkeypatch, capsys):
    """``write`` raising ENOSPC while the extended run saves its checkpoint."""
    before = snapshot(run_copy)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def fileno(self):
            return self.handle.fileno()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_files.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    assert main(["train", "--resume", str(run_copy), "--epochs", "5", "--progress", "none"]) == 2
    error = one_line_error(capsys)
    assert "No space left on device" in error and str(run_copy) in error
    assert snapshot(run_copy) == before
    assert not list(run_copy.glob(".*"))  # no temporary file, no lock file


# --------------------------------------------------------------------------------------
# Processes, specs, data
# --------------------------------------------------------------------------------------


def test_nproc_not_dividing_the_batch_is_checked_before_starting(capsys, monkeypatch):
    from cnnkit.training import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("processes started"))
    assert main(["train", "--nproc", "3"]) == 2
    assert "--nproc 3 does not divide the default batch size 64" in one_line_error(capsys)
    assert main(["train", "--nproc", "3", "--batch-size", "8"]) == 2
    assert "--nproc 3 does not divide --batch-size 8" in one_line_error(capsys)


def test_a_missing_spec_toml_is_named(run_copy, capsys):
    (run_copy / "spec.toml").unlink()
    before = snapshot(run_copy)
    for argv in (["evaluate", str(run_copy)], ["train", "--resume", str(run_copy)]):
        assert main(argv) == 2
        assert "lacks its spec.toml (config.json says it trained 'tiny')" in one_line_error(capsys)
        assert snapshot(run_copy) == before


def test_a_swapped_spec_toml_or_config_is_named(run_copy, capsys):
    from cnnkit.models import from_name

    from_name("lenet5").save(str(run_copy / "spec.toml"))
    before = snapshot(run_copy)
    assert main(["train", "--resume", str(run_copy), "--epochs", "5"]) == 2
    assert "spec.toml describes 'lenet5' but config.json says" in one_line_error(capsys)
    assert snapshot(run_copy) == before
    (run_copy / "spec.toml").write_text(TINY_SPEC.replace("maps = 4", "maps = 5"))
    assert main(["evaluate", str(run_copy)]) == 2
    assert "spec.toml is not the file the run started with" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("content", "kind"),
    [(b"hello, not arrays\n", "not a zip file"), (b"\x80\x04K\x01.", "a pickle"), (b"", "empty")],
)
def test_a_fake_npz_is_one_line_without_pickle_advice(tmp_path, content, kind, capsys):
    fake = tmp_path / "fake.npz"
    fake.write_bytes(content)
    assert main(["train", "--data", str(fake), "--out", str(tmp_path / "run")]) == 2
    error = one_line_error(capsys)
    assert kind in error and "allow_pickle" not in error
    assert not (tmp_path / "run").exists()


def test_bare_cnnkit_lists_the_verbs_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "summary" in err and "train" in err and "presets" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "(default: best)" in out and "(default: cpu)" in out


# --------------------------------------------------------------------------------------
# File modes, encodings, locks (subprocesses where the process matters)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        _files.write_atomic(tmp_path / "a.json", "{}")
        import torch

        from cnnkit.training.checkpoint import save_checkpoint

        save_checkpoint(tmp_path / "w.safetensors", {"x": torch.zeros(2)}, {"epoch": 0})
    finally:
        os.umask(before)
    for name in ("a.json", "w.safetensors", "w.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def run_cli(*argv: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *argv],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_an_ascii_terminal_gets_x_for_the_times_sign():
    done = run_cli("summary", "--preset", "lenet5", env={"PYTHONIOENCODING": "ascii"})
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert "32x32" in out or "28x28" in out or "x" in out
    assert "×" not in out


def test_one_writer_per_run_folder_and_free_after_kill_9(run_copy):
    with lock_held_elsewhere(run_copy) as holder:
        second = run_cli("train", "--resume", str(run_copy), "--progress", "none")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert err.count("\n") == 1 and f"process {holder} is writing" in err
    time.sleep(0.1)
    third = run_cli("train", "--resume", str(run_copy), "--progress", "lines")
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert "already finished" in out


def test_ctrl_c_prints_the_resume_command(tiny_files, tmp_path, monkeypatch, capsys):
    from cnnkit.training import epochs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(epochs, "train_step", interrupted)
    out = tmp_path / "run"
    assert main(tiny_argv(tiny_files, "--out", str(out), "--epochs", "1")) == 130
    err = capsys.readouterr().err
    assert err == f"cnnkit: interrupted; continue with: cnnkit train --resume {out}\n"
    assert not (out / ".lock").exists()


def test_summary_says_how_many_classes_it_assumed(capsys):
    assert main(["summary", "--preset", "lecun83"]) == 0
    assert capsys.readouterr().out.endswith("classes: 101 (the spec's; change with --classes N)\n")
    assert main(["summary", "--preset", "lecun83", "--classes", "10"]) == 0
    assert "339,520 weights + 330 biases" in capsys.readouterr().out


def test_the_memory_guard_names_the_need_and_the_bound(tmp_path, monkeypatch, capsys):
    from cnnkit.models.memory import activation_bytes

    spec = tmp_path / "big.toml"
    spec.write_text(
        TINY_SPEC.replace("height = 12", "height = 1500").replace("width = 12", "width = 1500")
    )
    from cnnkit.models import ArchitectureSpec

    # by hand: 1500² input + 4@1498² filters x (1 + 1 abs) + 4@749² pooled + 4@749² output
    need = activation_bytes(ArchitectureSpec.load(str(spec)), 1)
    assert need == 4 * (1500**2 + 4 * 1498**2 * 2 + 2 * 4 * 749**2)
    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "10M")
    from PIL import Image

    Image.new("L", (12, 12)).save(tmp_path / "x.png")
    assert main(["show", str(tmp_path / "x.png"), "--spec", str(spec)]) == 2
    error = one_line_error(capsys)
    assert "needs at least 94.2 MiB for the activations of one image" in error
    assert "but 10.0 MiB is available" in error
    assert not list(tmp_path.glob("*.png"))[1:]  # no figure written
    assert main(["train", "--spec", str(spec), "--out", str(tmp_path / "run")]) == 2
    assert "for the activations of a batch of 64" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("CNNKIT_MEMORY_LIMIT", "lots")
    assert main(["train", "--spec", str(spec)]) == 2
    assert "CNNKIT_MEMORY_LIMIT must be a number of bytes" in one_line_error(capsys)
