"""Implementation choices measured on the machine that runs them, kept in a file per
machine.

Where the fastest way to compute something depends on the processor -- which exact
method a connection-table filter bank takes, how many images of a batch a large stage
runs at a time -- cnnkit does not carry constants measured on one machine. The first
time a process meets a case (a *shape class*: the op, its shapes, dtype, whether a
derivative is recorded, the thread count), :func:`choose` times each candidate a few
times (the fastest of five runs, taken in turns, after a warm-up) on synthetic inputs
of that shape and keeps the fastest. The choice goes into a small JSON file for this
machine, so later processes read it instead of measuring:

- the file is named by the machine's key (:func:`machine_key`: processor model,
  instruction set, torch and cnnkit versions), under ``$CNNKIT_CACHE_DIR`` or
  ``$XDG_CACHE_HOME/cnnkit`` (``~/.cache/cnnkit``); a file that cannot be read, is
  truncated, or holds another machine's key is ignored and written anew;
- ``CNNKIT_TUNE=0`` turns measuring off: each case takes its safe default (a cost model
  that needs no measurement), and choices already in the file are not read either, so
  every process with ``CNNKIT_TUNE=0`` computes the same way; ``CNNKIT_TUNE=read``
  takes the file's choices but never measures (the default for a case not in it);
- every candidate computes the same function; a choice changes only how long it takes,
  and the rounding of the last bits.

A training run records the choices it used (:func:`used`) in its run folder and a
resume runs under them again (:func:`pinned`), so a resumed run is bitwise the run that
was not interrupted. ``cnnkit tune`` measures a network's cases ahead of time. Workers
of a multi-process run (``--nproc``, ``--jobs``) never measure (:func:`worker_environment`
gives them ``CNNKIT_TUNE=read``), since timings taken while other processes compute
mislead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path

import torch

from cnnkit._files import write_atomic

__all__ = [
    "cache_path",
    "choose",
    "layout_name",
    "machine_key",
    "pinned",
    "retiming",
    "tuning_enabled",
    "used",
    "worker_environment",
]

_FORMAT = 1
_REPEATS = 5  # timed runs per candidate, after one warm-up run; the fastest counts

_lock = threading.RLock()
_choices: dict[str, str] | None = None  # the file's choices and this process's
_used: dict[str, str] = {}
_pinned: dict[str, str] | None = None
_retimed: set[str] | None = None  # inside retiming(): the cases timed anew so far
_announced = False


def _mode() -> str:
    return os.environ.get("CNNKIT_TUNE", "1").strip().lower()


def layout_name(x: torch.Tensor) -> str:
    """``x``'s memory layout as a case names it (the fastest way may depend on it):
    ``"channels_last"``, ``"contiguous"`` or ``"strided"``."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return "channels_last"
    return "contiguous" if x.is_contiguous() else "strided"


def tuning_enabled() -> bool:
    """Whether cases may be measured: ``CNNKIT_TUNE`` is neither ``0`` nor ``read``."""
    return _mode() not in ("0", "read")


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a worker process of a multi-process run: it reads the choices
    kept for this machine but measures none (unless measuring is off altogether)."""
    env = dict(environ)
    if env.get("CNNKIT_TUNE", "1").strip() != "0":
        env["CNNKIT_TUNE"] = "read"
    return env


@functools.cache  # fixed for the process: read once, not at every look into the file
def _processor_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model", "hardware")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def _cnnkit_version() -> str:
    try:
        return metadata.version("cnnkit")
    except metadata.PackageNotFoundError:
        return "unknown"


def machine_key() -> dict[str, str | int]:
    """What the choices depend on besides the case: processor, instruction set, versions."""
    return {
        "format": _FORMAT,
        "processor": _processor_model(),
        "machine": platform.machine(),
        "instruction_set": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cnnkit": _cnnkit_version(),
    }


def cache_path() -> Path:
    """The file of this machine's choices."""
    folder = os.environ.get("CNNKIT_CACHE_DIR")
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = str(Path(base) / "cnnkit")
    digest = hashlib.sha256(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()
    return Path(folder) / f"tuning-{digest[:16]}.json"


def _read() -> dict[str, str]:
    """The file's choices, or none when it is missing, unreadable or not this machine's."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("machine") != machine_key():
        return {}
    choices = data.get("choices")
    if not isinstance(choices, dict):
        return {}
    return {k: v for k, v in choices.items() if isinstance(k, str) and isinstance(v, str)}


def _write(choices: Mapping[str, str]) -> None:
    text = json.dumps({"machine": machine_key(), "choices": dict(choices)}, indent=1)
    try:
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text + "\n")
    except OSError:  # a read-only home, say: the choice still holds for this process
        pass


def choose(case: str, default: str, candidates: Mapping[str, Callable[[], object]]) -> str:
    """The fastest of ``candidates`` for ``case`` on this machine.

    ``case`` names the shape class (the same string for every call that should share a
    choice); ``candidates`` maps each name to a function that runs it once on synthetic
    inputs of that shape. Returns, in order: the pinned choice (:func:`pinned`); with
    ``CNNKIT_TUNE=0``, ``default``; a choice made before (this process or the file);
    with ``CNNKIT_TUNE=read``, ``default``; or the fastest candidate, measured now and
    kept. One candidate needs no measuring.
    """
    global _choices
    with _lock:
        if _pinned is not None and _pinned.get(case) in candidates:
            choice = _pinned[case]
        elif _mode() == "0" or len(candidates) < 2:
            choice = default
        else:
            if _choices is None:
                _choices = _read()
            choice = _choices.get(case)
            if _retimed is not None and case not in _retimed and tuning_enabled():
                choice = None  # time it again, whatever was kept
            if choice not in candidates and not tuning_enabled():
                choice = default
        if choice in candidates or choice == default:
            _used[case] = choice
            return choice
    # Measured without the lock: a candidate's run meets cases of its own (a stage's
    # filter bank), which the measuring thread chooses while this one waits.
    choice = _measure(candidates)
    with _lock:
        if _retimed is not None:
            _retimed.add(case)
        # another process may have added cases to the file; this one's stay
        _choices = {**_read(), **(_choices or {}), case: choice}
        _write(_choices)
        _used[case] = choice
    return choice


def _measure(candidates: Mapping[str, Callable[[], object]]) -> str:
    """The fastest candidate, timed in a thread of its own: the caller's thread-local
    state -- autograd's saved-tensor hooks (``torch.utils.checkpoint``), dispatch and
    function modes (profilers, FLOP counters), anomaly detection, grad mode -- does not
    see the synthetic runs."""
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["choice"] = _fastest(candidates)
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    worker = threading.Thread(target=work, name="cnnkit-tuning")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["choice"]


def _fastest(candidates: Mapping[str, Callable[[], object]]) -> str:
    global _announced
    if not _announced:
        _announced = True
        print(
            "cnnkit: timing the fastest methods for this machine once, kept in "
            f"{cache_path()} (CNNKIT_TUNE=0 skips this)",
            file=sys.stderr,
        )
    for run in candidates.values():
        run()  # warm-up: first-call allocations and library set-up
    times = dict.fromkeys(candidates, float("inf"))
    for _ in range(_REPEATS):  # in turns, so that a slow spell of the machine hits all
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name] = min(times[name], time.perf_counter() - start)
    return min(times, key=times.__getitem__)


def used() -> dict[str, str]:
    """The choices this process has taken so far, case by case."""
    with _lock:
        return dict(_used)


@contextlib.contextmanager
def retiming() -> Iterator[None]:
    """Time every case met inside the block again (once each), replacing what was kept:
    to repair a choice timed while the machine was busy."""
    global _retimed
    with _lock:
        before, _retimed = _retimed, set()
    try:
        yield
    finally:
        with _lock:
            _retimed = before


@contextlib.contextmanager
def pinned(choices: Mapping[str, str]) -> Iterator[None]:
    """Take ``choices`` for the cases they name (a resumed run's recorded ones); other
    cases are chosen as usual."""
    global _pinned
    with _lock:
        before = _pinned
        _pinned = {**(before or {}), **choices}
    try:
        yield
    finally:
        with _lock:
            _pinned = before
