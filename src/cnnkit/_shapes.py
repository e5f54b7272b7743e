"""The size of a valid (unpadded) window's output: one formula for every layer and spec.

A window ``k`` wide stepping ``s`` at a time over ``n`` values, never past the edge,
takes ``(n - k) // s + 1`` positions -- ``n - k + 1`` at stride 1. Filter banks, untied
banks, pooling and the spec's shape walk all count positions this way.
"""

from __future__ import annotations

from collections.abc import Sequence


def valid_size(size: int, window: int, stride: int = 1) -> int:
    """``(size - window) // stride + 1``: the positions of a valid window along one axis.

    The window must fit (``window <= size``); callers check that first, with a message
    that names their own arguments, so a ``ValueError`` here means a caller forgot.
    """
    if window > size:
        raise ValueError(f"window must be at most size {size}, got {window}")
    return (size - window) // stride + 1


def valid_hw(
    hw: Sequence[int], window: Sequence[int], stride: Sequence[int] = (1, 1)
) -> tuple[int, int]:
    """:func:`valid_size` on both axes: ``(H_out, W_out)`` from ``(H, W)``, ``(kh, kw)``
    and ``(s_h, s_w)``."""
    (h, w), (kh, kw), (sh, sw) = hw, window, stride
    return valid_size(h, kh, sh), valid_size(w, kw, sw)
