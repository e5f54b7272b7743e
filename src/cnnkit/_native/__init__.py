"""cnnkit's compiled CPU kernels: built from the C++ sources beside this file on first use.

Some ops are many small tensor operations in eager PyTorch, each a pass over maps that a
compiled loop makes in one (``contrast_norm.cpp``: local contrast normalization in three
passes instead of about ten; ``norm_pool.cpp``: the same followed by max pooling,
without writing the normalized maps out, and with the first filter bank before it;
``max_pool.cpp``: max pooling with the positions of the maxima, and its gradient,
without a copy into another layout; ``direct_conv.cpp``: a filter bank with few input
maps, such as the lecture's first, and its kernels' gradient, with the outputs of a
block of pixels kept in registers; ``interleaved_conv.cpp``: a connection-table filter
bank on small maps, such as the lecture's second, with a pixel of several images in
each vector). They are
compiled once per machine with PyTorch's extension builder (a C++ compiler and
``ninja``; the result is kept under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), which takes some seconds; later processes load the built
library (one folder per Python version, torch version, source and instruction set; one
process builds at a time, and a build killed half-way does not block the next). The code
is vectorized for the instruction set torch finds on the processor
(:func:`instruction_set`: AVX-512 or AVX2 on x86-64, the compiler's portable baseline
elsewhere), so a build folder copied to a processor without that set is never loaded
there: it has another folder. Where the build fails -- no compiler, for instance -- one
warning says why and the ops keep their eager form, which gives the same values to float
rounding; the reason is kept in the build folder so that later processes do not spend
the same seconds failing again. ``CNNKIT_NATIVE=0`` in the environment turns the kernels
off.

:func:`native_ops` returns the kernels (``torch.ops.cnnkit_native``) or ``None``;
:func:`native_status` says what happened, :func:`native_attempted` whether anything has.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["NativeStatus", "instruction_set", "native_attempted", "native_ops", "native_status"]

_SOURCES = (
    "contrast_norm.cpp",
    "direct_conv.cpp",
    "interleaved_conv.cpp",
    "max_pool.cpp",
    "norm_pool.cpp",
)
# included by the sources: they name a build too
_HEADERS = ("contrast_norm.h", "direct_conv.h", "max_pool.h", "vectors.h")
_NAME = "cnnkit_native"
# The compiler's vector extensions for each instruction set torch reports on x86-64,
# named one by one (GCC 11's -march=x86-64-v3/v4 levels say the same, but older compilers
# do not know them): AVX2 with FMA and F16C, and AVX-512 F/BW/CD/DQ/VL on top.
_AVX2 = ["-mavx", "-mavx2", "-mfma", "-mf16c"]
_X86_TARGETS = {
    "AVX512": [
        *_AVX2,
        *("-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl"),
        "-mprefer-vector-width=512",
    ],  # fmt: skip
    "AVX2": _AVX2,
}
# How long a process waits for another one's build before giving up on the kernels.
_LOCK_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class NativeStatus:
    """Whether the compiled kernels are in use, and what loading them cost.

    Attributes:
        available: the kernels are loaded and used.
        seconds: time spent building or loading them (0 when never tried).
        reason: why they are not used (empty when they are).
        folder: where they were built (empty when they are not used).
    """

    available: bool
    seconds: float
    reason: str
    folder: str = ""


_lock = threading.Lock()
_status: NativeStatus | None = None
_fakes_registered = False


def native_ops() -> object | None:
    """The compiled kernels' namespace, built or loaded on the first call; ``None`` when
    turned off (``CNNKIT_NATIVE=0``) or when the build failed (warned once)."""
    status = _status if _status is not None else _load()
    return torch.ops.cnnkit_native if status.available else None


def native_attempted() -> bool:
    """Whether this process has tried to build or load the kernels yet."""
    return _status is not None


def native_status() -> NativeStatus:
    """What loading the kernels gave; loads them first if no call has yet."""
    return _status if _status is not None else _load()


def _load() -> NativeStatus:
    global _status
    with _lock:
        if _status is not None:
            return _status
        if os.environ.get("CNNKIT_NATIVE", "1").strip() == "0":
            _status = NativeStatus(False, 0.0, "turned off by CNNKIT_NATIVE=0")
            return _status
        start = time.perf_counter()
        try:
            folder = _build()
        except Exception as error:  # any failure leaves the eager ops, which still work
            _status = NativeStatus(False, time.perf_counter() - start, _reason(error))
            warnings.warn(
                f"cnnkit's compiled CPU kernels could not be built ({_status.reason}); using "
                "the eager ops, which are slower (set CNNKIT_NATIVE=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=3,
            )
            return _status
        _register_fakes()
        _status = NativeStatus(True, time.perf_counter() - start, "", str(folder))
        return _status


class _EarlierFailure(RuntimeError):
    """A build of the same sources failed before; its reason is kept in ``marker``."""

    def __init__(self, marker: Path) -> None:
        super().__init__(marker.read_text().strip())
        self.marker = marker


def _reason(error: Exception) -> str:
    if isinstance(error, _EarlierFailure):
        return f"{error}; an earlier build failed, remove {error.marker} to try again"
    return f"{type(error).__name__}: {_first_cause(str(error))}"


def _first_cause(message: str) -> str:
    """The line of a build's error message that says what went wrong: the first that
    reports an error or a missing file (after torch's "Error building extension"
    heading), else the last (a compiler's output ends with ninja's "build stopped")."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        lowered = line.lower()
        if lowered.startswith("error building extension"):
            continue
        if "error" in lowered or "not found" in lowered or "no such file" in lowered:
            return line
    return lines[-1] if lines else "no message"


def instruction_set() -> str:
    """The vector instruction set the kernels are built for: what torch's own kernels
    dispatch to on this processor (``torch.backends.cpu.get_cpu_capability()``, which
    honours ``ATEN_CPU_CAPABILITY``), e.g. ``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``."""
    return torch.backends.cpu.get_cpu_capability()


def _target_flags(isa: str, machine: str) -> list[str]:
    """Compiler flags that vectorize for ``isa`` on ``machine``; none (the compiler's
    portable baseline) for a set or a processor family without an entry."""
    if machine.lower() in ("x86_64", "amd64"):
        return list(_X86_TARGETS.get(isa, []))
    return []


def _build() -> Path:
    """Build (or find built) and load the kernels; return the build folder.

    A failed build leaves its reason in the folder (``build-failed.txt``), so that later
    processes do not spend the same seconds failing again (remove the file to retry,
    after installing a compiler, say); a process that gives up waiting for another
    one's build (``_LOCK_TIMEOUT_SECONDS``) leaves none.
    """
    # Imported here: the builder pulls in setuptools, which plain use of cnnkit never needs.
    from filelock import FileLock  # a dependency of torch
    from torch.utils import cpp_extension

    sources = [Path(__file__).parent / name for name in _SOURCES]
    headers = [Path(__file__).parent / name for name in _HEADERS]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    isa = instruction_set()
    folder = _build_directory(Path(root), sources + headers, isa)
    marker = folder / "build-failed.txt"
    # One cnnkit process builds at a time. The operating system releases this lock when
    # its holder dies, unlike torch's own lock file, which a killed build leaves behind
    # and on which torch would wait for ever: holding ours, any such file is stale.
    with FileLock(str(folder / "cnnkit.lock"), timeout=_LOCK_TIMEOUT_SECONDS):
        if marker.exists():
            raise _EarlierFailure(marker)
        (folder / "lock").unlink(missing_ok=True)
        try:
            with _ninja_on_path():
                cpp_extension.load(
                    name=_NAME,
                    sources=[str(source) for source in sources],
                    # -fopenmp: ATen's parallel_for is OpenMP in these headers; the
                    # library then shares the OpenMP runtime torch has loaded (same soname).
                    extra_cflags=[
                        "-O3",
                        "-fopenmp",
                        "-fno-math-errno",
                        *_target_flags(isa, platform.machine()),
                    ],
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(folder),
                    is_python_module=False,
                    verbose=False,
                )
        except Exception as error:
            with contextlib.suppress(OSError):
                marker.write_text(f"{type(error).__name__}: {_first_cause(str(error))}\n")
            raise
    return folder


def _build_directory(root: Path, sources: list[Path], isa: str) -> Path:
    """A folder per Python version, torch version, kernel source and instruction set."""
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in sources)).hexdigest()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    name = f"{_NAME}-{python}-torch{torch.__version__}-{platform.machine()}-{isa.lower()}"
    folder = root / f"{name}-{digest[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """``PATH`` with the pip package's ``ninja`` first (for environments that are not
    activated), restored afterwards -- unset again if it was unset."""
    before = os.environ.get("PATH")
    try:
        import ninja
    except ImportError:
        yield
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + (before or os.defpath)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = before


def _register_fakes() -> None:
    """Shapes of the kernels' outputs for tracing (``FakeTensorMode``, as ``torch.compile``
    and ``torch.export`` use), which runs no kernel; once per process."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("cnnkit_native::contrast_norm_forward")
    def _(x, row_diagonals, column_diagonals, mass, rectify, mean_threshold, threshold, floor):
        n, _, h, w = x.shape
        maps = [x.new_empty(n, h, w) for _ in range(3)]
        return torch.empty_like(x), *maps, x.new_empty(n)

    @torch.library.register_fake("cnnkit_native::contrast_norm_backward")
    def _(grad, x, *rest):
        return torch.empty_like(x)

    @torch.library.register_fake("cnnkit_native::contrast_norm_max_pool_forward")
    def _(x, row_diagonals, column_diagonals, mass, rectify, mean_threshold, threshold,
          floor, kh, kw, sh, sw, with_sums):  # fmt: skip
        n, c, h, w = x.shape
        shape = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
        channels_last = not x.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        pooled = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)
        index = torch.empty(shape, dtype=torch.int64, device=x.device, memory_format=layout)
        return pooled, index, x.new_empty(n, 5, h, w), x.new_empty(n)

    @torch.library.register_fake("cnnkit_native::contrast_norm_max_pool_backward")
    def _(grad, index, maxima, x, *rest):
        channels_last = not x.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)

    @torch.library.register_fake("cnnkit_native::direct_conv_norm_max_pool")
    def _(x, taps, bias, kh, kw, row_diagonals, column_diagonals, mass, rectify,
          mean_threshold, threshold, floor, pool_kh, pool_kw, sh, sw):  # fmt: skip
        h, w = x.shape[2] - kh + 1, x.shape[3] - kw + 1
        shape = (x.shape[0], taps.shape[1], (h - pool_kh) // sh + 1, (w - pool_kw) // sw + 1)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("cnnkit_native::direct_conv_norm_max_pool_backward")
    def _(grad, index, maxima, y, stats, mean_sigma, rows_t, columns_t, rectify,
          mean_threshold, threshold, floor, x, kh, kw):  # fmt: skip
        return x.new_empty(x.shape[1] * kh * kw, y.shape[1]), x.new_empty(y.shape[1])

    @torch.library.register_fake("cnnkit_native::direct_conv2d_forward")
    def _(x, taps, bias, kh, kw):
        n, _, h, w = x.shape
        shape = (n, taps.shape[1], h - kh + 1, w - kw + 1)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    @torch.library.register_fake("cnnkit_native::direct_conv2d_weight_grad")
    def _(grad, x, kh, kw):
        return x.new_empty(x.shape[1] * kh * kw, grad.shape[1]), x.new_empty(grad.shape[1])

    @torch.library.register_fake("cnnkit_native::interleaved_conv2d_forward")
    def _(x, weight, bias, table, out_maps):
        n, _, h, w = x.shape
        return x.new_empty(n, out_maps, h - weight.shape[1] + 1, w - weight.shape[2] + 1)

    @torch.library.register_fake("cnnkit_native::interleaved_conv2d_input_grad")
    def _(grad, weight, table, in_maps, h, w):
        return grad.new_empty(grad.shape[0], in_maps, h, w)

    @torch.library.register_fake("cnnkit_native::interleaved_conv2d_weight_grad")
    def _(grad, x, table, kh, kw):
        return x.new_empty(table.shape[0], kh, kw)

    @torch.library.register_fake("cnnkit_native::max_pool_forward")
    def _(x, kh, kw, sh, sw):
        n, c, h, w = x.shape
        shape = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)

    @torch.library.register_fake("cnnkit_native::max_pool_backward")
    def _(grad, index, h, w):
        return grad.new_empty(*grad.shape[:2], h, w)
