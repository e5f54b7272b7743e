"""Choices measured once per machine: the cache file, CNNKIT_TUNE=0, pinned choices."""

from __future__ import annotations

import json

import pytest
import torch

from cnnkit.kernels import tuning
from cnnkit.models import build, from_name


@pytest.fixture
def tuned(monkeypatch, tmp_path, fast_paths):
    """Measuring on (and the fast paths, which are what is measured), with a cache folder
    of the test's own and a fresh process state."""
    monkeypatch.setenv("CNNKIT_TUNE", "1")
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_choices", None)
    monkeypatch.setattr(tuning, "_used", {})
    monkeypatch.setattr(tuning, "_pinned", None)
    monkeypatch.setattr(tuning, "_announced", False)
    return tmp_path


def _counting(delays: dict[str, int]):
    """Candidates that count their runs; ``delays`` makes some slower (busy loops)."""
    runs = dict.fromkeys(delays, 0)

    def make(name):
        def run():
            runs[name] += 1
            sum(range(delays[name]))

        return run

    return {name: make(name) for name in delays}, runs


def test_the_fastest_is_measured_once_and_kept_in_the_file(tuned, capsys):
    candidates, runs = _counting({"slow": 300_000, "fast": 0})
    assert tuning.choose("case a", "slow", candidates) == "fast"
    assert runs == {"slow": 6, "fast": 6}  # a warm-up and five timed runs each
    assert "timing the fastest methods" in capsys.readouterr().err
    saved = json.loads(tuning.cache_path().read_text())
    assert saved["choices"] == {"case a": "fast"} and saved["machine"] == tuning.machine_key()
    tuning._choices = None  # as a new process: read from the file, nothing measured
    assert tuning.choose("case a", "slow", candidates) == "fast"
    assert runs == {"slow": 6, "fast": 6}
    assert tuning.used() == {"case a": "fast"}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"machine": {"processor": "another one"}, "choices": {"case a": "slow"}}',
        '{"machine": MACHINE, "choices": {"case a": "gone"}}',  # a candidate that no longer is
        '{"machine": MACHINE, "choices": ["slow"]}',
        "",
    ],
)
def test_a_corrupt_truncated_or_foreign_file_is_ignored_and_rebuilt(tuned, content):
    path = tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.replace("MACHINE", json.dumps(tuning.machine_key())))
    candidates, runs = _counting({"slow": 300_000, "fast": 0})
    assert tuning.choose("case a", "slow", candidates) == "fast"
    assert runs["fast"] == 6
    assert json.loads(path.read_text())["choices"] == {"case a": "fast"}


def test_tune_zero_takes_the_default_and_measures_nothing(tuned, monkeypatch):
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    candidates, runs = _counting({"slow": 0, "fast": 0})
    assert tuning.choose("case a", "slow", candidates) == "slow"
    assert runs == {"slow": 0, "fast": 0} and not tuning.cache_path().exists()


def test_pinned_choices_win_over_the_file(tuned):
    candidates, _ = _counting({"slow": 300_000, "fast": 0})
    assert tuning.choose("case a", "slow", candidates) == "fast"
    with tuning.pinned({"case a": "slow"}):
        assert tuning.choose("case a", "fast", candidates) == "slow"
    assert tuning.choose("case a", "slow", candidates) == "fast"


def test_an_unwritable_cache_folder_still_keeps_each_choice_for_the_process(
    tuned, monkeypatch, tmp_path
):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(blocker / "below"))  # not a folder
    first, runs_first = _counting({"slow": 300_000, "fast": 0})
    second, runs_second = _counting({"slow": 300_000, "fast": 0})
    for _ in range(3):  # two cases in turn, as the layers of a network meet them
        assert tuning.choose("case a", "slow", first) == "fast"
        assert tuning.choose("case b", "slow", second) == "fast"
    assert runs_first["fast"] == runs_second["fast"] == 6  # each timed once only


def test_timing_is_not_seen_by_hooks_checkpointing_or_the_caller(tuned):
    """The synthetic runs happen in a thread of their own and call the layers' forward
    directly: a forward hook sees only the real images, ``torch.utils.checkpoint``'s
    saved-tensor hooks are not disturbed, and the global generator is untouched."""
    torch.manual_seed(0)
    model = build(from_name("lecun83", classes=5))
    seen = []
    model.stage1.filters.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    x = torch.randn(3, 1, 83, 83)
    state = torch.random.get_rng_state()
    y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    y.sum().backward()
    assert sum(seen) == 2 * 3  # the forward, and checkpoint's recomputation of it
    assert torch.equal(torch.random.get_rng_state(), state)
    assert any(case.startswith("stage_slice") for case in tuning.used())


def test_a_pinned_choice_that_is_no_candidate_is_ignored(tuned):
    candidates, _ = _counting({"slow": 300_000, "fast": 0})
    with tuning.pinned({"case a": "gone"}):
        assert tuning.choose("case a", "slow", candidates) == "fast"


def test_tuned_and_untuned_networks_give_the_same_values(tuned, monkeypatch):
    """Every candidate computes the same function: measured choices change only speed."""
    torch.manual_seed(0)
    model = build(from_name("lecun83", classes=5)).double()
    x = torch.randn(3, 1, 83, 83, dtype=torch.float64)
    tuned_out = model(x)
    (tuned_grad,) = torch.autograd.grad(tuned_out.sum(), model.stage2.filters.weight)
    assert any(case.startswith("table_conv") for case in tuning.used())
    assert any(case.startswith("stage_slice") for case in tuning.used())
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    default_out = model(x)
    (default_grad,) = torch.autograd.grad(default_out.sum(), model.stage2.filters.weight)
    torch.testing.assert_close(tuned_out, default_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tuned_grad, default_grad, rtol=1e-10, atol=1e-12)


def test_tune_network_fills_the_file_for_a_network(tuned):
    from cnnkit.models.tune import tune_network

    choices = tune_network("lenet5", batch_sizes=(2,))
    saved = json.loads(tuning.cache_path().read_text())["choices"]
    assert choices and set(saved) <= set(choices)
    assert any("nograd" in case for case in choices) and any(" grad " in case for case in choices)


def test_tune_network_refuses_when_measuring_is_off(monkeypatch):
    from cnnkit.models.tune import tune_network

    monkeypatch.setenv("CNNKIT_TUNE", "0")
    with pytest.raises(RuntimeError, match="CNNKIT_TUNE=0"):
        tune_network("lenet5", batch_sizes=(1,))


def test_read_mode_takes_kept_choices_and_measures_nothing(tuned, monkeypatch):
    candidates, runs = _counting({"slow": 300_000, "fast": 0})
    assert tuning.choose("case a", "slow", candidates) == "fast"
    monkeypatch.setattr(tuning, "_choices", None)
    monkeypatch.setenv("CNNKIT_TUNE", "read")
    assert not tuning.tuning_enabled()
    assert tuning.choose("case a", "slow", candidates) == "fast"  # from the file
    assert tuning.choose("case b", "slow", candidates) == "slow"  # not kept: the default
    assert runs == {"slow": 6, "fast": 6}


def test_workers_are_given_read_mode():
    assert tuning.worker_environment({})["CNNKIT_TUNE"] == "read"
    assert tuning.worker_environment({"CNNKIT_TUNE": "1"})["CNNKIT_TUNE"] == "read"
    assert tuning.worker_environment({"CNNKIT_TUNE": "0"})["CNNKIT_TUNE"] == "0"


def test_cnnkit_tune_keeps_the_choices_and_prints_them(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CNNKIT_TUNE": "1", "CNNKIT_FAST": "1", "CNNKIT_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "cnnkit", "tune", "--preset", "lenet5", "--batch", "2"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cases in" in out.stdout and str(tmp_path) in out.stdout
    files = list(tmp_path.glob("tuning-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["choices"]
    env["CNNKIT_TUNE"] = "0"
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("cnnkit: error: CNNKIT_TUNE=0 turns timing off")


def test_retiming_times_kept_cases_again_once(tuned):
    candidates, runs = _counting({"slow": 300_000, "fast": 0})
    assert tuning.choose("case a", "slow", candidates) == "fast"
    with tuning.retiming():
        tuning.choose("case a", "slow", candidates)
        tuning.choose("case a", "slow", candidates)  # once per retiming
    assert runs["fast"] == 12
    tuning.choose("case a", "slow", candidates)
    assert runs["fast"] == 12
