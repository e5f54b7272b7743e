"""Values computed from a tensor once and kept while the tensor lives unchanged.

A module's weights or window are used by every call but change only when trained or
edited; what an op derives from them (a window's banded matrices, a filter bank's
kernels regrouped or transformed) need not be rebuilt on each call when no gradient
flows into them. The cache holds its sources weakly and compares their version
counters, which every in-place edit moves, and their memory, dtype and shape, which
``module.to(...)`` changes -- but an in-place edit through ``.data`` goes unseen (edit
the tensor itself, or make a new one).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

__all__ = ["derived"]

T = TypeVar("T")

# (id(source), kind) -> (weak reference to source, its state, params, value)
_ENTRIES: dict[tuple[int, str], tuple[weakref.ref, tuple, Hashable, object]] = {}


def derived(source: torch.Tensor, kind: str, params: Hashable, build: Callable[[], T]) -> T:
    """``build()``, or the value it gave for the same ``source``, ``kind`` and ``params``
    if ``source`` has not changed since; one value is kept per ``source`` and ``kind``.

    ``build`` runs outside inference mode, so that a later training step may save what it
    returns for a backward pass. What it returns must not refer to ``source`` (a view,
    or ``source.to(...)`` when nothing changes), or ``source`` would never be freed. A
    source made under inference mode has no version counter: its value is built on every
    call.
    """
    if source.is_inference():
        with torch.inference_mode(False):
            return build()
    key = (id(source), kind)
    state = _state(source)
    entry = _ENTRIES.get(key)
    if entry and entry[0]() is source and entry[1] == state and entry[2] == params:
        return entry[3]
    with torch.inference_mode(False):
        value = build()
    ref = weakref.ref(source, lambda _: _ENTRIES.pop(key, None))
    _ENTRIES[key] = (ref, state, params, value)
    return value


def _state(source: torch.Tensor) -> tuple:
    """What must be unchanged for a kept value to hold: the version counter, and the
    memory, dtype and shape -- which ``module.to(...)`` swaps under a parameter without
    moving its version."""
    return (source._version, source.data_ptr(), source.dtype, source.device, source.shape)
