"""The lecture's first stage as one op: the filter bank, rectification, contrast
normalization and max pooling (``torch.ops.cnnkit.filter_norm_max_pool``) give the
values and the kernels' and biases' gradients of the plain path, and the op runs only
where it may."""

from __future__ import annotations

import pytest
import torch

import cnnkit.models
from cnnkit._native import native_ops
from cnnkit.kernels import norm_pool
from cnnkit.models import stages

pytestmark = [
    pytest.mark.usefixtures("fast_paths"),
    pytest.mark.skipif(native_ops() is None, reason="the compiled kernels are not built here"),
]


def _lecun83(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cnnkit.models.build(cnnkit.models.from_name("lecun83", classes=5)).to(dtype)
    return model.eval()


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch sizes the four-layer op is called with."""
    seen: list[int] = []
    whole = norm_pool.filter_norm_max_pool

    def spy(x, *args):  # noqa: ANN001, ANN002, ANN202
        seen.append(x.shape[0])
        return whole(x, *args)

    monkeypatch.setattr(stages.fast_stage, "filter_norm_max_pool", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_it_equals_the_plain_path(dtype, batch, monkeypatch) -> None:
    monkeypatch.setenv("CNNKIT_TUNE", "0")  # the first bank takes its direct method
    model = _lecun83(dtype)
    x = torch.randn(batch, 1, 83, 83, dtype=dtype)
    calls = _calls(monkeypatch)
    with torch.no_grad():
        fast = model.stage1(x)
        assert calls and sum(calls) == batch
        assert fast.is_contiguous(memory_format=torch.channels_last)
        monkeypatch.setenv("CNNKIT_FAST", "0")
        plain = model.stage1(x)
    tolerance = (
        {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    )
    torch.testing.assert_close(fast, plain, **tolerance)


def test_the_whole_network_gives_the_same_logits(monkeypatch) -> None:
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    model = _lecun83(torch.float64)
    x = torch.randn(4, 1, 83, 83, dtype=torch.float64)
    calls = _calls(monkeypatch)
    with torch.no_grad():
        fast = model(x)
        monkeypatch.setenv("CNNKIT_FAST", "0")
        plain = model(x)
    assert calls
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 5])
def test_its_gradients_equal_the_plain_path(dtype, batch, monkeypatch) -> None:
    """The kernels' and biases' gradients through the whole network, one compiled pass
    per image, against CNNKIT_FAST=0."""
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    model = _lecun83(dtype).train()
    x = torch.randn(batch, 1, 83, 83, dtype=dtype)
    calls = _calls(monkeypatch)
    params = [model.stage1.filters.weight, model.stage1.filters.bias]

    def gradients():  # noqa: ANN202
        out = model(x)
        return out, torch.autograd.grad(out.square().sum(), params)

    fast, fast_grads = gradients()
    assert calls and sum(calls) == batch
    monkeypatch.setenv("CNNKIT_FAST", "0")
    plain, plain_grads = gradients()
    close = (
        {"rtol": 2e-4, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    )
    torch.testing.assert_close(fast, plain, **close)
    for got, want in zip(fast_grads, plain_grads, strict=True):
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, **close)


def test_gradcheck_and_gradgradcheck(monkeypatch) -> None:
    """The op itself in float64 on small maps: 16 maps from one, 3x3 kernels."""
    from cnnkit.ops import gaussian_window

    x = torch.randn(2, 1, 12, 11, dtype=torch.float64)
    window = gaussian_window(5, 1.0, 16, dtype=torch.float64)
    weight = torch.randn(16, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)

    def fn(weight, bias):  # noqa: ANN001, ANN202
        return norm_pool.filter_norm_max_pool(
            x, weight, bias, window, "renormalize", "mean", 1e-4, (3, 3), (2, 2)
        )

    assert norm_pool.filter_norm_max_pool_applies(x, weight, bias, window, "renormalize", (3, 3))
    assert torch.autograd.gradcheck(fn, (weight, bias))
    assert torch.autograd.gradgradcheck(fn, (weight, bias))


def test_not_where_the_input_is_differentiated_or_a_hook_watches(monkeypatch) -> None:
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    model = _lecun83(torch.float32)
    x = torch.randn(2, 1, 83, 83, requires_grad=True)
    calls = _calls(monkeypatch)
    model(x).sum().backward()  # a derivative for the input: the layers one by one
    assert calls == [] and x.grad is not None
    with torch.no_grad():
        seen = []
        handle = model.stage1.filters.register_forward_hook(lambda m, a, out: seen.append(out))
        model(x)
        assert calls == [] and len(seen) == 1 and seen[0].shape == (2, 64, 75, 75)
        handle.remove()
        model(x)
        assert calls == [2]


def test_not_where_a_backward_hook_watches(monkeypatch) -> None:
    monkeypatch.setenv("CNNKIT_TUNE", "0")
    model = _lecun83(torch.float32).train()
    x = torch.randn(2, 1, 83, 83)
    calls = _calls(monkeypatch)
    seen = []
    model.stage1.filters.register_full_backward_hook(lambda m, g_in, g_out: seen.append(g_out))
    model(x).sum().backward()
    assert calls == [] and len(seen) == 1 and seen[0][0].shape == (2, 64, 75, 75)


def test_the_op_refuses_what_it_cannot_differentiate() -> None:
    model = _lecun83(torch.float64)
    filters, norm = model.stage1.filters, model.stage1.norm
    weight = filters.weight.detach().view(64, 1, 9, 9)
    x = torch.randn(1, 1, 83, 83, dtype=torch.float64)
    options = (norm.border, False, 1e-4, 1e-4, 10, 10, 5, 5)
    op = torch.ops.cnnkit.filter_norm_max_pool
    with pytest.raises(ValueError, match="x and the window must not require grad"):
        op(x.requires_grad_(), weight, None, norm.window, *options, True)
    with pytest.raises(ValueError, match="needs keep=True"):
        op(x.detach(), weight.requires_grad_(), None, norm.window, *options, False)


def test_not_where_the_filter_bank_takes_another_method(monkeypatch) -> None:
    model = _lecun83(torch.float32)
    x = torch.randn(2, 1, 83, 83)
    calls = _calls(monkeypatch)
    monkeypatch.setattr(stages, "auto_method", lambda *args: "dense")
    with torch.no_grad():
        model(x)
    assert calls == []


def test_the_registered_operator_passes_opcheck() -> None:
    model = _lecun83(torch.float64)
    filters, norm = model.stage1.filters, model.stage1.norm
    weight = filters.weight.detach().view(64, 1, 9, 9)
    x = torch.randn(2, 1, 83, 83, dtype=torch.float64)
    args = (x, weight, filters.bias.detach(), norm.window, norm.border, False, 1e-4, 1e-4)
    op = torch.ops.cnnkit.filter_norm_max_pool
    torch.library.opcheck(op, (*args, 10, 10, 5, 5, False))
    weight.requires_grad_()
    torch.library.opcheck(op, (*args, 10, 10, 5, 5, True))
