"""Process-level settings that make CPU training fast: ``tune_runtime()``.

glibc's allocator hands blocks above its mmap threshold (32 MB at most, adjusted
dynamically) straight back to the operating system when they are freed, so a training
step that allocates ~100 MB of activations page-faults them all in again at every step.
Raising the trim threshold and turning off mmap for large blocks (``M_MMAP_MAX = 0``:
the threshold cannot be raised above 32 MB, and lecun83's first-stage maps are 92 MB
at batch 64) keeps those pages in the process: a fresh 92 MB tensor then costs ~25 ms
to fill instead of ~100 ms here. The price is that the process keeps its peak heap.

It also readies cnnkit's compiled CPU kernels (:mod:`cnnkit._native`): built once per
machine, some seconds the first time, loaded in a fraction of a second later; without
the call they are readied by the first op that uses them.
The call is idempotent; the CLI makes it, library users may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

import torch

from cnnkit._native import native_status

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc caps the mmap threshold at HEAP_MAX/2 = 32 MB on 64-bit; trim far above it.
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024


@dataclass(frozen=True)
class RuntimeSettings:
    """What :func:`tune_runtime` applied.

    Attributes:
        threads: torch's intra-op threads.
        allocator_tuned: glibc's allocator keeps large blocks (Linux).
        native_kernels: cnnkit's compiled CPU kernels are in use (:mod:`cnnkit._native`).
        native_seconds: what building (first run on a machine) or loading them took.
    """

    threads: int
    allocator_tuned: bool
    native_kernels: bool = False
    native_seconds: float = 0.0


_applied: RuntimeSettings | None = None


def _tune_allocator() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and ok  # blocks above 32 MB from the heap too
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def tune_runtime(threads: int | None = None) -> RuntimeSettings:
    """Apply cnnkit's process settings once; later calls return what was applied.

    Sets torch's threads, tunes the allocator and readies the compiled kernels (module
    notes); the returned settings say what each gave.

    Args:
        threads: intra-op threads for torch; default the CPUs this process may use.
            Passing a different number on a later call changes the thread count.
    """
    global _applied
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise TypeError(f"threads must be a positive integer, got {threads!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads}")
    wanted = threads if threads is not None else _default_threads()
    if _applied is not None and _applied.threads == wanted:
        return _applied
    tuned = _applied.allocator_tuned if _applied is not None else _tune_allocator()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    native = native_status()
    _applied = RuntimeSettings(
        threads=wanted,
        allocator_tuned=tuned,
        native_kernels=native.available,
        native_seconds=native.seconds,
    )
    return _applied
