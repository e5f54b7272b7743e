"""Fixtures shared by the whole suite."""

import contextlib
import os

import pytest
import torch

# The suite checks values, not speed: no case is timed (cnnkit.kernels.tuning), so every
# test and every process it starts takes the same safe defaults. Tests of the tuning
# itself turn it on with a cache folder of their own.
os.environ.setdefault("CNNKIT_TUNE", "0")


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
