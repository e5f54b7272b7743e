"""Local contrast normalization: subtractive, divisive, and the two in sequence.

The lecture's two steps on an image of ``C`` maps ``x_i`` (``i`` the map, ``(j, k)`` the
pixel), with a window ``w[i, p, q]`` over maps and offsets (``p, q`` centred at 0):

- subtractive: ``v_ijk = x_ijk - sum_{i,p,q} w_ipq x_{i, j+p, k+q}``;
- divisive: ``y_ijk = v_ijk / max(c, sigma_jk)`` with
  ``sigma_jk = (sum_{i,p,q} w_ipq v^2_{i, j+p, k+q})^(1/2)``.

Both sums run over every map, so the local mean and ``sigma`` are single ``(H, W)`` images
shared by all maps. Shapes: ``x`` is ``(N, C, H, W)`` or ``(C, H, W)``, the window is
``(C, k_h, k_w)`` with odd ``k_h`` and ``k_w``, and the output has the shape of ``x``:
the map size never changes.

Borders (where ``j + p`` or ``k + q`` leaves the image):

- ``"renormalize"`` (default): the sum covers only the pixels that exist and is divided by
  the window mass that falls inside the image, ``m_jk = sum_{i, (j+p, k+q) inside} w_ipq``,
  so it is a weighted mean of what is there. A constant image stays constant and borders
  are not darkened. The variance under the square root is corrected the same way.
- ``"zero"``: pixels outside the image count as 0 (plain zero padding).
- ``"reflect"``: indices are mirrored into the image without repeating the edge
  (``-1 -> 1``, ``H -> H - 2``); needs a window no larger than the map.

The threshold ``c`` is ``max(threshold, floor)`` for a number, or, for ``"mean"``,
``max(mean_jk sigma_jk, floor)`` taken per image (Jarrett et al. 2009). The floor keeps
a flat image, whose ``sigma`` is 0, from dividing by zero.

Speed: :func:`contrast_norm` (and :func:`rectified_contrast_norm`) runs as one registered
operator where :func:`cnnkit.kernels.normalization.contrast_norm_applies` allows it, and
:func:`rectified_contrast_norm_max_pool` as another where
:func:`cnnkit.kernels.norm_pool.contrast_norm_max_pool_applies` does; what is written here
is the plain path, which the operators match to float rounding.
"""

from __future__ import annotations

import math

import torch

from cnnkit._validation import (
    check_choice,
    check_floating,
    check_maps,
    check_number,
    check_positive_float,
    check_positive_int,
    is_concrete,
    pair,
)
from cnnkit.kernels import norm_pool as fast_pooled
from cnnkit.kernels import normalization as fast
from cnnkit.ops.pooling import pool_subsample2d
from cnnkit.windowed_sum import BORDERS, local_mean, windowed_sum

__all__ = [
    "BORDERS",
    "contrast_norm",
    "divisive_norm",
    "gaussian_window",
    "rectified_contrast_norm",
    "rectified_contrast_norm_max_pool",
    "subtractive_norm",
]


def gaussian_window(
    size: int,
    sigma: float,
    maps: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A Gaussian window over ``maps`` maps, for the normalizations, summing to 1.

    ``w[i, p, q] = exp(-(p^2 + q^2) / (2 sigma^2)) / Z`` for ``p, q`` in
    ``-(size-1)/2 .. (size-1)/2`` and every map ``i``, with ``Z`` such that the sum over
    ``i, p, q`` is 1 (the lecture's ``sum w_pq = 1``). Each map gets ``1 / maps`` of the
    mass.

    Args:
        size: side of the window in pixels; odd, so that the window has a centre pixel.
        sigma: standard deviation in pixels.
        maps: number of maps ``C``.
        dtype: a floating-point dtype.
        device: where to put the window.

    Returns:
        ``(maps, size, size)`` tensor.
    """
    check_positive_int("size", size)
    if size % 2 == 0:
        raise ValueError(f"size must be odd so that the window has a centre pixel, got {size}")
    sigma = check_positive_float("sigma", sigma)
    check_positive_int("maps", maps)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :] / maps).expand(maps, size, size)  # (C, k, k)
    return window.to(dtype=dtype, device=device).contiguous()


def subtractive_norm(
    x: torch.Tensor, window: torch.Tensor, border: str = "renormalize"
) -> torch.Tensor:
    """Subtract the local mean over all maps, ``v_ijk = x_ijk - sum_{i,p,q} w_ipq x_{i,j+p,k+q}``.

    Args:
        x: ``(N, C, H, W)`` or ``(C, H, W)``, floating point.
        window: ``(C, k_h, k_w)`` weights summing to 1, odd sides; see
            :func:`gaussian_window`.
        border: ``"renormalize"``, ``"zero"`` or ``"reflect"`` (module docstring).

    Returns:
        ``v``, the shape of ``x``. Under ``"renormalize"`` (and ``"reflect"``) a constant
        image gives 0.
    """
    x4, unbatched = _prepare(x, window, border)
    v = _subtract(x4, window, border)
    return v.squeeze(0) if unbatched else v


def divisive_norm(
    x: torch.Tensor,
    window: torch.Tensor,
    threshold: float | str = "mean",
    border: str = "renormalize",
    floor: float = 1e-4,
) -> torch.Tensor:
    """Divide by the local spread: ``y_ijk = x_ijk / max(c, sigma_jk)``.

    ``sigma_jk = (sum_{i,p,q} w_ipq x^2_{i,j+p,k+q})^(1/2)`` (divided by the inside mass
    before the root under ``"renormalize"``). ``c = max(threshold, floor)``, or
    ``max(mean over (j, k) of sigma_jk, floor)`` per image for ``threshold="mean"``.
    The lecture applies it to ``v``, the output of :func:`subtractive_norm`.

    Args:
        x: ``(N, C, H, W)`` or ``(C, H, W)``, floating point.
        window: ``(C, k_h, k_w)`` weights summing to 1, odd sides.
        threshold: ``"mean"`` or a number ``>= 0``.
        border: ``"renormalize"``, ``"zero"`` or ``"reflect"``.
        floor: the least ``c`` can be, ``> 0``.

    Returns:
        ``y``, the shape of ``x``; finite, and with finite gradients, for finite input
        whose squares do not overflow -- a flat image too (it gives 0).
    """
    threshold, floor = _check_divisive_options(threshold, floor)
    x4, unbatched = _prepare(x, window, border)
    y = _divide(x4, window, border, threshold, floor)
    return y.squeeze(0) if unbatched else y


def contrast_norm(
    x: torch.Tensor,
    window: torch.Tensor,
    threshold: float | str = "mean",
    border: str = "renormalize",
    floor: float = 1e-4,
) -> torch.Tensor:
    """Local contrast normalization: ``divisive_norm(subtractive_norm(x))`` with one window.

    Arguments as in :func:`divisive_norm`; ``(N, C, H, W)`` or ``(C, H, W)`` in, the same
    shape out.
    """
    return _contrast(x, window, threshold, border, floor, rectify=False)


def rectified_contrast_norm(
    x: torch.Tensor,
    window: torch.Tensor,
    threshold: float | str = "mean",
    border: str = "renormalize",
    floor: float = 1e-4,
) -> torch.Tensor:
    """Rectification then local contrast normalization: ``contrast_norm(|x|)`` in one op.

    The lecture's "R" then "LCN": the same values as ``contrast_norm(x.abs(), ...)`` and
    the same gradient, with the derivative of ``|x|`` taken as ``sign(x)`` (0 at
    ``x = 0``); the fast operator folds the rectification into its passes over the maps.
    Arguments and shapes as in :func:`contrast_norm`.
    """
    return _contrast(x, window, threshold, border, floor, rectify=True)


def rectified_contrast_norm_max_pool(
    x: torch.Tensor,
    window: torch.Tensor,
    threshold: float | str,
    border: str,
    floor: float,
    pool_window: int | tuple[int, int],
    pool_stride: int | tuple[int, int],
) -> torch.Tensor:
    """Rectification, local contrast normalization, then max pooling at the subsampled
    points: ``pool_subsample2d(rectified_contrast_norm(x, ...), "max", pool_window,
    pool_stride)``, the lecture's first stage after its filter bank.

    The same values and gradients as the two calls; the fast operator never writes the
    normalized maps out (the lecture's 75x75 maps pool to 14x14). Arguments as in
    :func:`rectified_contrast_norm` and :func:`cnnkit.ops.pooling.pool_subsample2d`;
    ``(N, C, H, W)`` or ``(C, H, W)`` in, ``(..., H_out, W_out)`` out with
    ``H_out = floor((H - k_h) / s_h) + 1`` and ``W_out = floor((W - k_w) / s_w) + 1``
    for a ``(k_h, k_w)`` window at stride ``(s_h, s_w)``.
    """
    threshold, floor = _check_divisive_options(threshold, floor)
    pool_window, pool_stride = pair("pool_window", pool_window), pair("pool_stride", pool_stride)
    x4, unbatched = _prepare(x, window, border)
    if fast_pooled.contrast_norm_max_pool_applies(x4, window, border, pool_window):
        out = fast_pooled.contrast_norm_max_pool(
            x4, window, border, threshold, floor, True, pool_window, pool_stride
        )
        return out.squeeze(0) if unbatched else out
    normalized = rectified_contrast_norm(x, window, threshold, border, floor)
    return pool_subsample2d(normalized, "max", pool_window, pool_stride)


# ---------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------


def _subtract(x: torch.Tensor, window: torch.Tensor, border: str) -> torch.Tensor:
    return x - local_mean(x, window, border)  # the windowed sum, taken to cancel less


def _divide(
    v: torch.Tensor, window: torch.Tensor, border: str, threshold: float | str, floor: float
) -> torch.Tensor:
    variance = windowed_sum(v * v, window, border)  # (N, 1, H, W)
    # Clamping before the root keeps the value (to ~1e-19 in float32) and gives a zero,
    # not an infinite, derivative where the variance is 0, so a flat image has no NaN.
    sigma = variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()
    if threshold == "mean":
        c = sigma.mean(dim=(-2, -1), keepdim=True).clamp_min(floor)  # (N, 1, 1, 1)
        denominator = torch.maximum(sigma, c)
    else:
        denominator = sigma.clamp_min(max(threshold, floor))
    return v * denominator.reciprocal()


def _contrast(
    x: torch.Tensor,
    window: torch.Tensor,
    threshold: float | str,
    border: str,
    floor: float,
    rectify: bool,
) -> torch.Tensor:
    threshold, floor = _check_divisive_options(threshold, floor)
    x4, unbatched = _prepare(x, window, border)
    if fast.contrast_norm_applies(x4, window):
        y = fast.contrast_norm(x4, window, border, threshold, floor, rectify)
    else:
        a = x4.abs() if rectify else x4
        y = _divide(_subtract(a, window, border), window, border, threshold, floor)
    return y.squeeze(0) if unbatched else y


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def _check_threshold(threshold: object) -> float | str:
    return check_number("threshold", threshold, ">= 0", lambda v: v >= 0, choices=("mean",))


def _check_divisive_options(threshold: object, floor: object) -> tuple[float | str, float]:
    return _check_threshold(threshold), check_positive_float("floor", floor)


def check_window(window: object) -> torch.Tensor:
    """Check a normalization window's shape and, for a real tensor, its values: finite
    weights summing to 1 (the lecture's ``sum_{i,p,q} w_ipq = 1``), summed in float64, to
    ``1e-6`` or 16 units of the window dtype's rounding, whichever is more (a window
    rounded to float32 or half precision repeats its rounding on every map)."""
    check_floating("window", window)
    if window.dim() != 3:
        raise ValueError(
            f"window must have shape (maps, size_h, size_w), got {tuple(window.shape)}"
        )
    maps, size_h, size_w = window.shape
    if maps == 0 or size_h % 2 == 0 or size_w % 2 == 0:
        raise ValueError(
            "window must have at least one map and odd sides so that it has a centre "
            f"pixel, got shape {tuple(window.shape)}"
        )
    if is_concrete(window):
        total = float(window.detach().sum(dtype=torch.float64))  # NaN or inf if any is
        if not math.isfinite(total):
            raise ValueError("window must hold finite numbers, got NaN or infinity")
        tolerance = max(1e-6, 16 * torch.finfo(window.dtype).eps)
        if abs(total - 1.0) > tolerance:
            raise ValueError(
                f"window must sum to 1 (the lecture's sum of w_ipq = 1), got a sum of {total:.7g}"
            )
    return window


def _prepare(x: torch.Tensor, window: torch.Tensor, border: str) -> tuple[torch.Tensor, bool]:
    """Check the arguments; return ``x`` as ``(N, C, H, W)`` and whether it was unbatched."""
    check_choice("border", border, BORDERS)
    check_window(window)
    unbatched = check_maps("x", x, maps=window.shape[0])
    x4 = x.unsqueeze(0) if unbatched else x  # (N, C, H, W)
    height, width = x4.shape[-2:]
    size_h, size_w = window.shape[-2:]
    if border == "reflect" and (size_h > height or size_w > width):
        raise ValueError(
            f"border='reflect' needs a window no larger than the map, got a {size_h}x{size_w}"
            f" window on {height}x{width} maps; use border='renormalize' or 'zero'"
        )
    return x4, unbatched
