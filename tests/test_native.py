"""The compiled CPU kernels: built where a compiler is, equal to the eager ops, optional."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cnnkit import _native
from cnnkit.kernels import normalization as fast
from cnnkit.ops.normalization import gaussian_window, rectified_contrast_norm
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


def _window(size, maps, dtype):
    """A separable Gaussian window of ``size`` (height, width), equal on every map."""
    rows, columns = (gaussian_window(k, 1.3, 1, dtype=torch.float64)[0].sum(1) for k in size)
    window = (rows[:, None] * columns[None, :] / maps).expand(maps, *size)
    return window.to(dtype).contiguous()


def _both(x, window, threshold, border, rectify, monkeypatch):
    """The kernel's and the eager forward's (y, den, variance, sigma, mean_sigma)."""
    limit = 0.0 if threshold == "mean" else threshold
    options = (border, rectify, threshold == "mean", limit, 1e-4)
    with torch.no_grad():
        native = torch.ops.cnnkit.contrast_norm(x, window, *options)
        with monkeypatch.context() as patch:
            patch.setattr(fast, "_uses_native", lambda x: False)
            eager = torch.ops.cnnkit.contrast_norm(x, window, *options)
    return native, eager


SHAPES_AND_WINDOWS = [
    ((3, 5, 9, 8), (5, 5)),
    ((1, 64, 17, 15), (9, 3)),  # a window as tall as the maps, not square
    ((1, 4, 100, 90), (5, 5)),  # one image, its pixels split across threads
    ((2, 1, 7, 11), (1, 9)),
    ((2, 3, 1, 1), (3, 3)),  # maps smaller than the window
]
# "reflect" needs a window no larger than the map.
CASES = [
    (border, shape, size)
    for border in ("renormalize", "zero", "reflect")
    for shape, size in SHAPES_AND_WINDOWS
    if border != "reflect" or (size[0] <= shape[2] and size[1] <= shape[3])
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threshold", ["mean", 0.4])
@pytest.mark.parametrize("rectify", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("border", "shape", "window_size"), CASES)
def test_kernel_equals_the_eager_forward(
    dtype, border, threshold, rectify, channels_last, shape, window_size, monkeypatch
):
    """Every saved quantity, both layouts, one image and several (an image per thread),
    several window shapes."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    window = _window(window_size, shape[1], dtype)
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
        torch.testing.assert_close(native[4], eager[4], rtol=rtol, atol=0)


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
    assert not fast._uses_native(x)
    assert fast._uses_native(x.contiguous())
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
        raise RuntimeError(
            "Error building extension 'cnnkit_native':\n[1/2] c++ -c contrast_norm.cpp\n"
            "FAILED: contrast_norm.o\n/bin/sh: 1: c++: not found\n"
            "ninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr(_native, "_status", None)
    monkeypatch.setattr(_native, "_build", fail)
    cause = "RuntimeError: /bin/sh: 1: c++: not found"
    with pytest.warns(RuntimeWarning, match=rf"could not be built \({re.escape(cause)}\)"):
        assert _native.native_ops() is None
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert _native.native_ops() is None
    assert later == []  # one warning per process
    status = _native.native_status()
    assert not status.available and status.reason == cause
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    window = gaussian_window(3, 1.0, 3, dtype=torch.float64)
    assert not fast._uses_native(x)
    torch.testing.assert_close(
        rectified_contrast_norm(x, window), rectified_contrast_norm(x, window.clone())
    )


@pytest.mark.parametrize(
    ("message", "cause"),
    [
        (
            "Error building extension 'x'\nk.cpp:3:1: error: expected ';'\nninja: stopped",
            "k.cpp:3:1: error: expected ';'",
        ),
        (
            "compiling\n/bin/sh: 1: c++: not found\nninja: build stopped",
            "/bin/sh: 1: c++: not found",
        ),
        (
            "first\nsecond\nninja: build stopped: subcommand failed.",
            "ninja: build stopped: subcommand failed.",
        ),
        ("", "no message"),
    ],
)
def test_the_warning_names_what_went_wrong(message, cause):
    assert _native._first_cause(message) == cause


def test_ninja_on_path_restores_an_unset_path(monkeypatch):
    monkeypatch.delenv("PATH", raising=False)
    with _native._ninja_on_path():
        inside = os.environ.get("PATH")
    assert "PATH" not in os.environ
    pytest.importorskip("ninja")
    assert inside is not None and inside.endswith(os.defpath)


def test_a_build_left_half_way_does_not_block_the_next(monkeypatch, tmp_path):
    """torch's lock file, left by a killed build, is removed under cnnkit's own lock
    (which the operating system releases when its holder dies), so the next load runs."""
    if _native.native_ops() is None:
        pytest.skip("the compiled kernels are not built here")
    folder = Path(_native.native_status().folder)
    (folder / "lock").write_text("")  # as a killed build leaves it
    monkeypatch.setattr(_native, "_status", None)
    code = "from cnnkit import _native; print(_native.native_status().available)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "True"
    assert not (folder / "lock").exists()


@needs_kernels
def test_traced_with_fake_tensors():
    """``torch.compile`` and ``torch.export`` trace with fake tensors, which run no kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    window = gaussian_window(3, 1.0, 4)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the window stays real
        x = mode.from_tensor(torch.randn(2, 4, 9, 9))
        y = rectified_contrast_norm(x, window)
    assert y.shape == (2, 4, 9, 9)


def test_a_failed_build_is_remembered_until_its_marker_is_removed(tmp_path):
    """A build that fails (here: no compiler at $CXX) leaves its reason in the build
    folder; the next process reports it without building again."""
    code = (
        "import warnings\n"
        "from cnnkit import _native\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    status = _native.native_status()\n"
        "print(status.available, '|', status.reason, '|', len(caught))\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "/nonexistent/c++"}
    env.pop("CNNKIT_NATIVE", None)

    def run() -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        return [part.strip() for part in out.stdout.strip().splitlines()[-1].split("|")]

    available, reason, warned = run()
    assert available == "False" and warned == "1" and reason
    (marker,) = tmp_path.glob("*/build-failed.txt")
    assert marker.read_text().strip() == reason
    available, again, warned = run()
    assert available == "False" and warned == "1"
    assert again == f"{reason}; an earlier build failed, remove {marker} to try again"


def test_the_build_targets_the_instruction_set_torch_dispatches_to(tmp_path):
    """The kernels are vectorized for the processor's instruction set, and a build folder
    is named by it: a folder copied from an AVX-512 machine is not loaded on an AVX2 one."""
    assert _native.instruction_set() == torch.backends.cpu.get_cpu_capability()
    assert {"-mavx512f", "-mavx2", "-mfma"} <= set(_native._target_flags("AVX512", "x86_64"))
    avx2 = _native._target_flags("AVX2", "AMD64")
    assert "-mavx2" in avx2 and not any("avx512" in flag for flag in avx2)
    assert _native._target_flags("DEFAULT", "x86_64") == []
    assert _native._target_flags("AVX512", "aarch64") == []  # the portable baseline
    source = tmp_path / "k.cpp"
    source.write_text("int f() { return 1; }\n")
    wide = _native._build_directory(tmp_path, [source], "AVX512")
    narrow = _native._build_directory(tmp_path, [source], "AVX2")
    assert wide != narrow and "avx512" in wide.name and "avx2" in narrow.name


def _pool_both(x, window, stride):
    """The compiled kernel's values and indices, and the library's."""
    ours = torch.ops.cnnkit_native.max_pool_forward(x, *window, *stride)
    theirs = torch.nn.functional.max_pool2d(x, window, stride, return_indices=True)
    return ours, theirs


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, window, stride",
    [
        ((2, 64, 75, 75), (10, 10), (5, 5)),  # the lecture's first stage
        ((1, 3, 17, 13), (3, 4), (2, 3)),
        ((2, 2, 9, 9), (9, 9), (1, 1)),  # one window covering the map
        ((3, 1, 8, 11), (2, 2), (2, 2)),
        ((1, 2, 12, 12), (4, 6), (2, 3)),  # tiled rows and columns
    ],
)
def test_max_pool_kernel_gives_the_librarys_values_indices_and_gradient(
    shape, window, stride, dtype
):
    # Values on a coarse grid, so that most windows hold ties: the first maximum in
    # row-major order must win, as in the library's kernel.
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2).round().to(dtype)
    (out, index), (want, want_index) = _pool_both(x, window, stride)
    assert torch.equal(out, want) and torch.equal(index, want_index)
    grad = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    got = torch.ops.cnnkit_native.max_pool_backward(grad, index, *shape[-2:])
    n, c = shape[:2]
    expected = torch.zeros(n, c, shape[2] * shape[3], dtype=dtype)
    expected.scatter_add_(2, want_index.view(n, c, -1), grad.view(n, c, -1))
    assert torch.equal(got, expected.view(shape))


@needs_kernels
def test_max_pool_kernel_passes_nans_on_as_the_library_does():
    """A window with NaNs gives NaN, and its index is that of its last NaN in row-major
    order (the library's kernel takes a value when it is larger or NaN), so the gradient
    goes where the library sends it."""
    x = torch.randn(1, 2, 12, 12, dtype=torch.float64)
    for r, c in ((3, 4), (3, 5), (4, 2), (9, 9), (0, 0), (11, 11)):
        x[0, 0, r, c] = float("nan")
    for window, stride in (((4, 4), (2, 2)), ((2, 2), (2, 2)), ((3, 5), (1, 2))):
        (out, index), (want, want_index) = _pool_both(x, window, stride)
        assert torch.equal(out.isnan(), want.isnan()) and out.isnan().any()
        assert torch.equal(index, want_index)
        assert torch.equal(out[~out.isnan()], want[~want.isnan()])


@needs_kernels
def test_max_pool_operator_is_a_well_formed_registered_op():
    """Schema, fake tensors, autograd registration and tracing (``torch.library.opcheck``),
    first and second derivatives in float64, and the batching rule under ``vmap``."""
    op = torch.ops.cnnkit.max_pool2d
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(op.default, (x, 4, 3, 2, 2))
    assert torch.autograd.gradcheck(lambda t: op(t, 4, 3, 2, 2)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t, 4, 3, 2, 2)[0], (x,))
    stacked = torch.randn(4, 2, 3, 13, 11, dtype=torch.float64)
    values = torch.vmap(lambda t: op(t, 4, 3, 2, 2)[0])(stacked)
    want = torch.nn.functional.max_pool2d(stacked.flatten(0, 1), (4, 3), (2, 2))
    assert torch.equal(values, want.view(values.shape))
