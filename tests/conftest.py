"""Fixtures shared by the whole suite."""

import os

import pytest

from cnnkit.training.device import using_threads as torch_threads

# The suite checks values, not speed: no case is timed (cnnkit.kernels.tuning), so every
# test and every process it starts takes the same safe defaults. Tests of the tuning
# itself turn it on with a cache folder of their own.
os.environ.setdefault("CNNKIT_TUNE", "0")


@pytest.fixture
def one_thread():
    # gradcheck runs thousands of tiny calls; extra threads only add barrier waits to them
    with torch_threads(1):
        yield


@pytest.fixture
def fast_paths(monkeypatch):
    """Fast paths on whatever ``CNNKIT_FAST`` says: for tests of the fast paths themselves
    (the rest of the suite passes either way)."""
    monkeypatch.setenv("CNNKIT_FAST", "1")
