"""Stage: a stage with large maps runs a few images at a time, with the same result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cnnkit.models
from cnnkit.models import stages

pytestmark = pytest.mark.usefixtures("fast_paths")

DEFAULT_FUSED_SLICE_BYTES = stages.FUSED_SLICE_BYTES


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of 6 MiB, 4 images of lecun83's first stage: small batches get sliced."""
    monkeypatch.setattr(stages, "FUSED_SLICE_BYTES", stages.SLICE_BYTES)


def _lecun83(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return cnnkit.models.build(cnnkit.models.from_name("lecun83", classes=5)).to(dtype)


def _batches_seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (first layer's type, batch size) of every call that runs layers."""
    seen: list[tuple[str, int]] = []
    run = stages._run_fused

    def spy(stage: nn.Sequential, x: torch.Tensor, hooks: bool = True) -> torch.Tensor:
        seen.append((type(next(iter(stage.children()))).__name__, x.shape[0]))
        return run(stage, x, hooks)

    monkeypatch.setattr(stages, "_run_fused", spy)
    return seen


def test_a_fused_stage_s_default_slice_holds_23_images_of_lecun83(monkeypatch) -> None:
    # 64 maps of 75x75 float32 are 1.44 MB per image: 23 fit in the 32 MiB of a stage
    # that normalizes and pools in one op, 4 in the 6 MiB of any other.
    monkeypatch.setattr(stages, "FUSED_SLICE_BYTES", DEFAULT_FUSED_SLICE_BYTES)
    assert stages.FUSED_SLICE_BYTES // (64 * 75 * 75 * 4) == 23
    model = _lecun83(torch.float32)
    layers = list(model.stage1.children())
    x = torch.randn(30, 1, 83, 83)
    assert stages._default_slice(layers, x) == 23
    assert stages._default_slice(layers, x[:5]) == 5
    assert stages._default_slice(layers, x.double()) == 11
    averaging = [*layers[:3], nn.AvgPool2d(10, 5)]  # no fused op: cache-sized slices
    assert stages._default_slice(averaging, x) == 4


def test_lecun83_first_stage_runs_in_slices_of_four_images(monkeypatch) -> None:
    # 64 maps of 75x75 float32 are 1.44 MB per image: 4 fit in the 6 MiB slice.
    assert stages.SLICE_BYTES // (64 * 75 * 75 * 4) == 4
    model = _lecun83(torch.float32)
    seen = _batches_seen(monkeypatch)
    model(torch.randn(9, 1, 83, 83))
    assert seen == [("FilterBank", 4), ("FilterBank", 4), ("FilterBank", 1), ("FilterBank", 9)]
    seen.clear()
    model.double()(torch.randn(9, 1, 83, 83, dtype=torch.float64))  # 2.9 MB per image
    assert [n for _, n in seen] == [2, 2, 2, 2, 1, 9]


def test_sliced_forward_and_gradients_equal_the_whole_batch(monkeypatch) -> None:
    model = _lecun83()
    x = torch.randn(5, 1, 83, 83, dtype=torch.float64)
    sliced = model(x)
    g_sliced = torch.autograd.grad(sliced.square().sum(), list(model.parameters()))
    monkeypatch.setattr(stages, "FUSED_SLICE_BYTES", 2**40)  # one slice: the whole batch
    seen = _batches_seen(monkeypatch)
    whole = model(x)
    assert [n for _, n in seen] == [5, 5]
    g_whole = torch.autograd.grad(whole.square().sum(), list(model.parameters()))
    torch.testing.assert_close(sliced, whole, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_sliced, g_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        monkeypatch.undo()
        torch.testing.assert_close(model(x), whole.detach(), rtol=1e-12, atol=1e-14)


def test_hooks_see_slices_and_fast_false_keeps_the_whole_batch(monkeypatch) -> None:
    model = _lecun83(torch.float32)
    x = torch.randn(6, 1, 83, 83)
    seen_by_hook = []
    model.stage1.filters.register_forward_hook(
        lambda module, args, out: seen_by_hook.append(out.shape[0])
    )
    batches = _batches_seen(monkeypatch)
    model(x)
    assert seen_by_hook == [4, 2] and [n for _, n in batches] == [4, 2, 6]
    seen_by_hook.clear()
    batches.clear()
    model.stage1.fast = False  # nn.Sequential's forward: every layer on the whole batch
    model(x)
    assert seen_by_hook == [6] and [n for _, n in batches] == [6]
    model.stage1.fast = True
    model.stage1.append(nn.BatchNorm2d(64))  # statistics over the batch: never sliced
    batches.clear()
    model(x)
    assert [n for _, n in batches] == [6, 6]


def test_the_plain_path_runs_nn_sequential(monkeypatch) -> None:
    model = _lecun83()
    x = torch.randn(5, 1, 83, 83, dtype=torch.float64)
    fast = model(x)
    batches = _batches_seen(monkeypatch)
    monkeypatch.setenv("CNNKIT_FAST", "0")
    plain = model(x)
    assert batches == []
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)


def test_a_stage_with_small_maps_is_not_sliced() -> None:
    model = _lecun83(torch.float32)
    x = torch.randn(3, 64, 14, 14)
    assert stages._slice_images(model.stage2, x) >= 3
    # a slice of the first stage would hold 4 images: 3 run as one
    assert stages._slice_images(model.stage1, torch.randn(3, 1, 83, 83)) == 3


def test_empty_and_unbatched_input() -> None:
    model = _lecun83(torch.float32)
    with pytest.raises(ValueError, match="x must not be empty"):  # the layers' own check
        model(torch.empty(0, 1, 83, 83))
    x = torch.randn(3, 1, 83, 83)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x[1]), model.features(x)[1])


def test_a_forward_that_times_nothing_makes_no_synthetic_input(monkeypatch) -> None:
    """The candidates of a stage's slice size make their synthetic batch only when they
    are timed, not on every call that offers them."""
    model = _lecun83(torch.float32)
    x = torch.randn(6, 1, 83, 83)

    def refuse(*args, **kwargs):
        raise AssertionError("a synthetic batch was made")

    monkeypatch.setenv("CNNKIT_TUNE", "0")
    monkeypatch.setattr(torch.Tensor, "normal_", refuse)
    with torch.no_grad():
        model(x)
    trial = stages._slice_trial(model.stage1, x, 2, grad=False)
    with pytest.raises(AssertionError, match="synthetic"):
        trial()


def test_the_slice_candidates_include_the_whole_batch_and_the_default(monkeypatch) -> None:
    from cnnkit.kernels import tuning

    offered = {}

    def choose(case, default, candidates):
        offered.update(default=default, sizes=sorted(int(k) for k in candidates))
        return default

    monkeypatch.setattr(tuning, "choose", choose)
    model = _lecun83(torch.float64)
    assert stages._slice_images(model.stage1, torch.randn(6, 1, 83, 83, dtype=torch.float64)) == 2
    assert offered == {"default": "2", "sizes": [1, 2, 4, 6]}
