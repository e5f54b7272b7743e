"""Pooling over a window, subsampling at a stride, and the two fused.

The lecture's Section 2 pools each 75x75 map with a 10x10 window moved one pixel at a time
(valid positions only, so 75 -> 66), then subsamples the pooled 66x66 map at stride 5,
keeping rows and columns 1, 6, ..., 66 (1-based; 0, 5, ..., 65 here) -> 14x14.

Shared shape contract
---------------------
Every function takes ``x`` of shape ``(N, C, H, W)`` or unbatched ``(C, H, W)`` (float
dtype, any memory layout) and returns the same rank. ``window`` and ``stride`` are an
``int`` or a ``(height, width)`` pair. With window ``(k_h, k_w)`` and stride ``(s_h, s_w)``::

    H_out = floor((H - k_h) / s_h) + 1        W_out = floor((W - k_w) / s_w) + 1

Window position ``(a, b)`` covers rows ``a*s_h .. a*s_h + k_h - 1`` and columns
``b*s_w .. b*s_w + k_w - 1``; there is no padding, so the window must fit in the map.

Kinds of pooling, over the ``k_h * k_w`` values ``x_j`` of one window:

- ``"max"``: ``max_j x_j``;
- ``"avg"``: ``(1 / (k_h k_w)) sum_j x_j``;
- ``"lp"``: ``(sum_j |x_j|^p)^(1/p)``, the ``L_p`` norm of the window for any sign of
  input (``p = 1``: the sum of ``|x_j|``; ``p = 2``: the Euclidean norm; large ``p``
  tends to ``max_j |x_j|``). It is computed as ``M (sum_j (|x_j| / M)^p)^(1/p)`` in
  float64 with ``M`` the map's largest ``|x|``, so it stays finite for large ``p``.

Optional per-map ``weight`` and ``bias`` (each of shape ``(C,)``) turn the pooled value ``y``
into ``weight[c] * y + bias[c]`` (Torch7's ``SpatialSubSampling``, LeNet-5's S-layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnkit._validation import check_choice, check_maps, check_positive_float, pair
from cnnkit.kernels import pooling as fast

__all__ = ["KINDS", "pool2d", "pool_subsample2d", "subsample2d"]

KINDS = ("max", "avg", "lp")


def pool2d(
    x: torch.Tensor,
    kind: str,
    window: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    p: float = 2.0,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Valid pooling of every map over a sliding ``window`` moved by ``stride``.

    Args:
        x: ``(N, C, H, W)`` or ``(C, H, W)``.
        kind: ``"max"``, ``"avg"`` or ``"lp"`` (see the module docstring for the formulas).
        window: ``k`` or ``(k_h, k_w)``; must not exceed the map.
        stride: ``s`` or ``(s_h, s_w)``, distance between successive window positions.
            The lecture pools at stride 1: a 75x75 map with a 10x10 window gives 66x66.
        p: the exponent of ``"lp"`` pooling, a finite number > 0 (checked for every kind).
        weight, bias: optional ``(C,)`` tensors; the result becomes
            ``weight[c] * pooled + bias[c]``. Either may be given alone.

    Returns:
        ``(N, C, H_out, W_out)`` (or ``(C, H_out, W_out)``) with
        ``H_out = floor((H - k_h) / s_h) + 1`` and likewise ``W_out``.

    Gradients: ``"max"`` sends each window's gradient to one element, the first maximal
    one in row-major order within the window, so a tie never splits it. ``"lp"`` has a
    zero gradient at a window of zeros (no NaN).
    """
    check_maps("x", x)
    check_choice("kind", kind, KINDS)
    k_h, k_w = pair("window", window)
    s_h, s_w = pair("stride", stride)
    p = check_positive_float("p", p)
    height, width = x.shape[-2:]
    if k_h > height or k_w > width:
        raise ValueError(
            f"window ({k_h}, {k_w}) is larger than the input map ({height}, {width}); "
            "valid pooling needs a window that fits inside the map"
        )
    window, stride = (k_h, k_w), (s_h, s_w)
    if kind == "max" and fast.max_pool_applies(x):
        out = fast.max_pool(x, window, stride)
    elif kind == "max":
        out = F.max_pool2d(x, window, stride)
    elif kind == "avg":
        out = F.avg_pool2d(x, window, stride)
    else:
        out = _lp_pool(x, p, window, stride)
    return _affine(out, weight, bias)


def subsample2d(x: torch.Tensor, stride: int | tuple[int, int]) -> torch.Tensor:
    """Keep rows ``0, s_h, 2 s_h, ...`` and columns ``0, s_w, 2 s_w, ...`` of every map.

    These are the lecture's 1-based points ``(1, 1), (1, 1 + s), ...``: a 66x66 map at
    stride 5 keeps 0, 5, ..., 65 and becomes 14x14.

    Args:
        x: ``(N, C, H, W)`` or ``(C, H, W)``.
        stride: ``s`` or ``(s_h, s_w)``.

    Returns:
        A view of ``x`` (no copy) of shape ``(..., H_out, W_out)`` with
        ``H_out = ceil(H / s_h)`` and ``W_out = ceil(W / s_w)``.
    """
    check_maps("x", x)
    s_h, s_w = pair("stride", stride)
    return x[..., ::s_h, ::s_w]  # (..., ceil(H / s_h), ceil(W / s_w))


def pool_subsample2d(
    x: torch.Tensor,
    kind: str,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
    p: float = 2.0,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooling evaluated only at the points that subsampling keeps.

    Equal to ``subsample2d(pool2d(x, kind, window, 1, p), stride)`` but pools only at
    window positions ``0, s, 2s, ...`` instead of at every position: for the lecture's
    75x75 maps, 14x14 windows instead of 66x66. The sizes agree because, with
    ``n = H - k_h + 1`` pooled rows, ``floor((H - k_h) / s) + 1 = ceil(n / s)``.

    The values are those of pool-then-subsample, bit for bit for ``"max"`` and ``"avg"``
    and to float rounding for ``"lp"``; for ``"max"`` the gradient also goes to the same
    element.

    Args and weight/bias: as :func:`pool2d`, with ``stride`` the subsampling stride.

    Returns:
        ``(N, C, H_out, W_out)`` (or unbatched) with ``H_out = floor((H - k_h) / s_h) + 1``.
    """
    return pool2d(x, kind, window, stride, p, weight=weight, bias=bias)


def _lp_pool(
    x: torch.Tensor, p: float, window: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """``(sum_j |x_j|^p)^(1/p)`` over each window, as ``M (sum_j (|x_j| / M)^p)^(1/p)``.

    ``M`` is each map's largest ``|x|`` (1 for a map of zeros), so ``(|x| / M)^p <= 1``
    never overflows; float64 keeps the terms of windows far below ``M`` from vanishing.
    A window of zeros gives 0 with a zero gradient: the root is taken of a safe 1 there.
    """
    a = x.abs().to(torch.float32 if x.device.type == "mps" else torch.float64)
    scale = a.amax(dim=(-2, -1), keepdim=True)  # (N, C, 1, 1) or (C, 1, 1)
    scale = torch.where(scale > 0, scale, 1.0)
    sums = _window_sums((a / scale) ** p, window, stride)  # (..., H_out, W_out)
    nonzero = sums > 0
    root = torch.where(nonzero, sums, 1.0) ** (1.0 / p)
    return (torch.where(nonzero, root, 0.0) * scale).to(x.dtype)


def _window_sums(z: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """``sum_j z_j`` over every window: the window's rows added one offset at a time, then
    its columns (plain slices and additions, which every exporter and dtype support)."""
    (k_h, k_w), (s_h, s_w) = window, stride
    rows = (z.shape[-2] - k_h) // s_h * s_h + 1  # the rows a window may start on, and between
    by_rows = sum(z[..., u : u + rows, :] for u in range(k_h))[..., ::s_h, :]  # (..., H_out, W)
    columns = (z.shape[-1] - k_w) // s_w * s_w + 1
    return sum(by_rows[..., v : v + columns] for v in range(k_w))[..., ::s_w]  # (..., H_out, W_out)


def _affine(
    out: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    # A separate multiply and add (no fused multiply-add), so that each output value is
    # rounded the same way whether it is computed before or after subsampling.
    channels = out.shape[-3]
    if weight is not None:
        out = out * _per_map("weight", weight, channels)
    if bias is not None:
        out = out + _per_map("bias", bias, channels)
    return out


def _per_map(name: str, value: torch.Tensor, channels: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({channels},), got {value!r}")
    if value.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per map, got {tuple(value.shape)}"
        )
    return value.reshape(channels, 1, 1)  # (C, 1, 1), broadcasts over (..., C, H, W)
