"""Values computed from a tensor once and kept while the tensor lives unchanged.

A module's weights or window are used by every call but change only when trained or
edited; what an op derives from them (a window's banded matrices, a filter bank's
kernels regrouped or transformed) need not be rebuilt on each call when no derivative
flows into them. A kept value is tied to its source's memory (a weak reference to the
storage, which neither keeps the source alive nor stops ``torch.utils.swap_tensors``)
and to its version counter, dtype, shape and strides: an in-place edit, an optimizer
step, ``module.to(...)`` or ``load_state_dict`` all lead to a rebuild. An edit that
bypasses the version counter goes unseen -- through ``.data``, or through a NumPy array
sharing the memory: edit the tensor itself, or make a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
import torch.autograd.forward_ad as forward_ad
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["derivative_recorded", "derived", "has_tangent", "kept"]

T = TypeVar("T")

# (storage address, kind) -> (weak reference to the storage, source state, params, value)
_ENTRIES: dict[tuple[int, str], tuple[StorageWeakRef, tuple, Hashable, object]] = {}


def derivative_recorded(tensor: torch.Tensor) -> bool:
    """Whether a derivative of ``tensor`` is being recorded: by autograd (grad mode on
    and ``requires_grad``) or in forward mode (:func:`has_tangent`)."""
    return (torch.is_grad_enabled() and tensor.requires_grad) or has_tangent(tensor)


def has_tangent(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` carries a forward-mode tangent at the current level."""
    return forward_ad.unpack_dual(tensor).tangent is not None


def derived(source: torch.Tensor, kind: str, params: Hashable, build: Callable[[], T]) -> T:
    """``build()``, or the value it gave for the same ``source``, ``kind`` and ``params``
    if ``source`` has not changed since; one value is kept per ``source`` and ``kind``.

    ``build`` runs outside inference mode and without grad mode, so that what it returns
    is an ordinary tensor a later training step may use, holding no graph. It must not
    return a view of ``source``. A source made under inference mode (no version counter),
    or one without ordinary storage (a functorch-wrapped tensor), is built from each call.
    """
    with torch.inference_mode(False), torch.no_grad():
        if source.is_inference():
            return build()
        try:
            storage = StorageWeakRef(source.untyped_storage())
            state = (source._version, source.storage_offset(), source.stride(), source.dtype)
        except (RuntimeError, NotImplementedError):  # no storage to refer to
            return build()
        state += (source.shape, source.device)
        key = _key(storage, kind)
        entry = _ENTRIES.get(key)
        if entry and not entry[0].expired() and entry[1] == state and entry[2] == params:
            return entry[3]
        value = build()
        _drop_expired()
        _ENTRIES[key] = (storage, state, params, value)
        return value


def _key(storage: StorageWeakRef, kind: str) -> tuple[int, str]:
    return (storage.cdata, kind)


def kept(source: torch.Tensor, kind: str) -> bool:
    """Whether a value of ``kind`` is kept for ``source``'s memory (for tests)."""
    return _key(StorageWeakRef(source.untyped_storage()), kind) in _ENTRIES


def _drop_expired() -> None:
    """Forget the values of sources whose memory has been freed."""
    for key in [key for key, entry in _ENTRIES.items() if entry[0].expired()]:
        del _ENTRIES[key]
