"""The compiled CPU kernels: built where a compiler is, equal to the eager ops, optional."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from cnnkit import _native
from cnnkit.ops import normalization
from cnnkit.ops.normalization import _prepare, gaussian_window, rectified_contrast_norm
from cnnkit.runtime import tune_runtime

needs_kernels = pytest.mark.skipif(
    _native.native_ops() is None, reason="the compiled kernels are not built here"
)


def test_built_where_a_compiler_is():
    if os.environ.get("CNNKIT_NATIVE", "1") == "0" or shutil.which("c++") is None:
        pytest.skip("kernels turned off, or no C++ compiler")
    status = _native.native_status()
    assert status.available, status.reason
    assert status.seconds > 0 and status.reason == ""
    assert tune_runtime().native_kernels


def _both(x, window, threshold, border, rectify, monkeypatch):
    """The kernel's and the eager forward's (y, den, variance, sigma, mean_sigma, c)."""
    smoother, x4, _ = _prepare(x, window, border)
    with torch.no_grad():
        native = normalization._contrast_forward(x4, smoother, threshold, 1e-4, rectify)
        with monkeypatch.context() as patch:
            patch.setattr(normalization, "_native_kernels", lambda x, smoother: None)
            eager = normalization._contrast_forward(x4, smoother, threshold, 1e-4, rectify)
    return native, eager


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("border", ["renormalize", "zero", "reflect"])
@pytest.mark.parametrize("threshold", ["mean", 0.4])
@pytest.mark.parametrize("rectify", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 9, 8), (1, 64, 17, 15), (2, 1, 7, 11)])
def test_kernel_equals_the_eager_forward(
    dtype, border, threshold, rectify, channels_last, shape, monkeypatch
):
    """Every saved quantity, both layouts, one image (pixels split across threads) and
    several (an image per thread)."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    window = gaussian_window(5, 1.3, shape[1], dtype=dtype)
    native, eager = _both(x, window, threshold, border, rectify, monkeypatch)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    names = ("y", "den", "variance", "sigma")
    for name, got, want in zip(names, native[:4], eager[:4], strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max(), msg=name)
    assert native[0].is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    if threshold == "mean":
        for got, want in zip(native[4:], eager[4:], strict=True):
            torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    else:
        assert native[4] is None and native[5] is None


@needs_kernels
def test_kernel_keeps_nan_and_flat_images(monkeypatch):
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    x[0, 2, 4, 4] = float("nan")
    x[1] = 3.0  # a flat image: exactly 0 out
    window = gaussian_window(3, 1.0, 4, dtype=torch.float64)
    native, eager = _both(x, window, "mean", "renormalize", True, monkeypatch)
    assert torch.equal(native[0].isnan(), eager[0].isnan())
    assert native[0][0].isnan().all()  # the NaN reaches the image's mean sigma
    assert torch.equal(native[0][1], torch.zeros_like(native[0][1]))


@needs_kernels
def test_strided_input_takes_the_eager_path():
    x = torch.randn(2, 3, 10, 20, dtype=torch.float64)[..., ::2]
    window = gaussian_window(3, 1.0, 3, dtype=torch.float64)
    smoother, _, _ = _prepare(x, window, "renormalize")
    assert normalization._native_kernels(x, smoother) is None
    assert normalization._native_kernels(x.contiguous(), smoother) is not None
    torch.testing.assert_close(
        rectified_contrast_norm(x, window), rectified_contrast_norm(x.contiguous(), window)
    )


def test_turned_off_by_the_environment():
    code = (
        "import torch; from cnnkit import _native; from cnnkit.ops import rectified_contrast_norm,"
        " gaussian_window\n"
        "y = rectified_contrast_norm(torch.randn(2, 3, 8, 8), gaussian_window(3, 1.0, 3))\n"
        "s = _native.native_status(); print(s.available, s.reason, bool(y.isfinite().all()))"
    )
    env = {**os.environ, "CNNKIT_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False turned off by CNNKIT_NATIVE=0 True"


def test_a_failed_build_warns_once_and_leaves_the_eager_ops(monkeypatch):
    def fail() -> None:
        raise OSError("no compiler here\nc++: not found")

    monkeypatch.setattr(_native, "_status", None)
    monkeypatch.setattr(_native, "_build", fail)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(OSError: c\+\+: not found\)"):
        assert _native.native_ops() is None
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert _native.native_ops() is None
    assert later == []  # one warning per process
    status = _native.native_status()
    assert not status.available and status.reason == "OSError: c++: not found"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    window = gaussian_window(3, 1.0, 3, dtype=torch.float64)
    smoother, _, _ = _prepare(x, window, "renormalize")
    assert normalization._native_kernels(x, smoother) is None


def _gradients(x, window, threshold, border, rectify, grad, monkeypatch):
    """The input gradient of the fused op through the kernels and through tensor ops."""
    results = []
    for eager in (False, True):
        with monkeypatch.context() as patch:
            if eager:
                patch.setattr(normalization, "_native_kernels", lambda x, smoother: None)
            leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            smoother, x4, _ = _prepare(leaf, window, border)
            y = normalization._ContrastNorm.apply(x4, smoother, threshold, 1e-4, rectify)
            results.append(torch.autograd.grad(y, leaf, grad)[0])
    return results


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("border", ["renormalize", "zero", "reflect"])
@pytest.mark.parametrize("threshold", ["mean", 0.4])
@pytest.mark.parametrize("rectify", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 9, 8), (1, 64, 17, 15)])
def test_kernel_backward_equals_the_eager_backward(
    dtype, border, threshold, rectify, channels_last, shape, monkeypatch
):
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 0.5
    x[0, 0, 1, 1] = 0.0  # sign(0) = 0 when rectifying
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=gen, dtype=dtype)
    window = gaussian_window(5, 1.3, shape[1], dtype=dtype)
    native, eager = _gradients(x, window, threshold, border, rectify, grad, monkeypatch)
    rtol = 1e-11 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(native, eager, rtol=rtol, atol=rtol * eager.abs().max())


@needs_kernels
def test_kernel_backward_takes_an_expanded_gradient_and_a_flat_image(monkeypatch):
    """An expanded gradient (as from ``y.sum()``) and a flat image (variance 0: the
    root's rule gives it a zero gradient, not NaN)."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x[1] = 2.0
    window = gaussian_window(3, 1.0, 3, dtype=torch.float64)
    grad = torch.ones(1, dtype=torch.float64).expand(2, 3, 8, 8)
    native, eager = _gradients(x, window, "mean", "renormalize", True, grad, monkeypatch)
    torch.testing.assert_close(native, eager, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(native).all()


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build killed mid-way leaves torch's lock file, on which the next build would
    wait for ever; an old one is removed, a recent one (a build running now) is not."""
    lock = tmp_path / "lock"
    lock.write_text("")
    _native._remove_stale_lock(lock)
    assert lock.exists()
    old = lock.stat().st_mtime - _native._STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    _native._remove_stale_lock(lock)
    assert not lock.exists()
    _native._remove_stale_lock(lock)  # and no lock at all is fine
