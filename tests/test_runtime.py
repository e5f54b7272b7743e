"""tune_runtime: idempotent process settings."""

import sys

import pytest
import torch

from cnnkit.runtime import tune_runtime


def test_idempotent_and_sets_threads():
    before = torch.get_num_threads()
    try:
        first = tune_runtime(threads=1)
        assert torch.get_num_threads() == 1
        assert tune_runtime(threads=1) is first
        if sys.platform.startswith("linux"):
            assert first.allocator_tuned
    finally:
        torch.set_num_threads(before)
        tune_runtime(threads=before)


@pytest.mark.parametrize(("bad", "error"), [(0, ValueError), (-2, ValueError), ("2", TypeError)])
def test_bad_threads(bad, error):
    with pytest.raises(error, match="threads must be a positive integer"):
        tune_runtime(threads=bad)
