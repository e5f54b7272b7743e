"""cnnkit's compiled CPU kernels: built from the C++ sources beside this file on first use.

Some ops are many small tensor operations in eager PyTorch, each a pass over maps that a
compiled loop makes in one (``contrast_norm.cpp``: local contrast normalization in three
passes instead of about ten). They are compiled once per machine with PyTorch's
extension builder (a C++ compiler and ``ninja``; the result is kept under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), which takes some
seconds; later processes load the built library. A lock left by a build that was killed
is removed after ten minutes. Where the build fails -- no compiler,
for instance -- one warning says why and the ops keep their eager form, which gives the
same values to float rounding. ``CNNKIT_NATIVE=0`` in the environment turns the kernels
off.

:func:`native_ops` returns the kernels (``torch.ops.cnnkit_native``) or ``None``;
:func:`native_status` says what happened, :func:`native_attempted` whether anything has.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["NativeStatus", "native_attempted", "native_ops", "native_status"]

_SOURCES = ("contrast_norm.cpp",)
_NAME = "cnnkit_native"
# A build takes seconds; a lock file older than this was left by a build that was killed
# (torch's builder would otherwise wait on it for ever).
_STALE_LOCK_SECONDS = 600


@dataclass(frozen=True)
class NativeStatus:
    """Whether the compiled kernels are in use, and what loading them cost.

    Attributes:
        available: the kernels are loaded and used.
        seconds: time spent building or loading them (0 when never tried).
        reason: why they are not used (empty when they are).
    """

    available: bool
    seconds: float
    reason: str


_lock = threading.Lock()
_status: NativeStatus | None = None


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
            _build()
        except Exception as error:  # any failure leaves the eager ops, which still work
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[-1] if lines else ''}"
            _status = NativeStatus(False, time.perf_counter() - start, reason)
            warnings.warn(
                f"cnnkit's compiled CPU kernels could not be built ({reason}); using the "
                "eager ops, which are slower (set CNNKIT_NATIVE=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=3,
            )
            return _status
        _status = NativeStatus(True, time.perf_counter() - start, "")
        return _status


def _build() -> None:
    # Imported here: the builder pulls in setuptools, which plain use of cnnkit never needs.
    from torch.utils import cpp_extension

    here = Path(__file__).parent
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build_directory = _build_directory(root)
    _remove_stale_lock(build_directory / "lock")
    path = os.environ.get("PATH", "")
    try:
        import ninja  # the pip package's binary, for environments that are not activated

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass
    try:
        cpp_extension.load(
            name=_NAME,
            sources=[str(here / source) for source in _SOURCES],
            # -fopenmp: ATen's parallel_for is OpenMP in these headers; the library then
            # shares the OpenMP runtime torch has loaded (same soname).
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_directory),
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path


def _build_directory(root: str) -> Path:
    """One folder per Python and torch version under the extension root (torch's)."""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    folder = Path(root) / f"{_NAME}-{python}-torch{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _remove_stale_lock(lock: Path) -> None:
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
            lock.unlink()
    except FileNotFoundError:
        pass
