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

Speed: :func:`gaussian_window` makes ``w_ipq = g_p g_q / C``, the same for every map and
separable. For such windows (any ``w_ipq = a_i u_p v_q``) the sums are computed as the
map-weighted mean of the input, ``(N, H, W)``, smoothed by two banded ``H x H`` and
``W x W`` matrix products that already hold the border rule -- instead of a ``C``-channel
convolution. Other windows, or a window that requires grad, go through ``conv2d``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit._native import native_ops
from cnnkit._validation import (
    check_choice,
    check_floating,
    check_maps,
    check_positive_float,
    check_positive_int,
)
from cnnkit.ops._derived import derivative_recorded, derived, has_tangent

__all__ = [
    "BORDERS",
    "contrast_norm",
    "divisive_norm",
    "gaussian_window",
    "rectified_contrast_norm",
    "subtractive_norm",
]

BORDERS = ("renormalize", "zero", "reflect")


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
        window: ``(C, k_h, k_w)`` weights, odd sides; see :func:`gaussian_window`.
        border: ``"renormalize"``, ``"zero"`` or ``"reflect"`` (module docstring).

    Returns:
        ``v``, the shape of ``x``. Under ``"renormalize"`` (and ``"reflect"`` with a window
        summing to 1) a constant image gives 0.
    """
    smoother, x4, unbatched = _prepare(x, window, border)
    v = _subtract(x4, smoother)
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
        window: ``(C, k_h, k_w)`` weights, odd sides.
        threshold: ``"mean"`` or a number ``>= 0``.
        border: ``"renormalize"``, ``"zero"`` or ``"reflect"``.
        floor: the least ``c`` can be, ``> 0``.

    Returns:
        ``y``, the shape of ``x``; finite, and with finite gradients, for finite input
        whose squares do not overflow -- a flat image too (it gives 0).
    """
    threshold, floor = _check_divisive_options(threshold, floor)
    smoother, x4, unbatched = _prepare(x, window, border)
    y = _divide(x4, smoother, threshold, floor)
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
    threshold, floor = _check_divisive_options(threshold, floor)
    smoother, x4, unbatched = _prepare(x, window, border)
    y = _contrast(x4, smoother, threshold, floor, rectify=False)
    return y.squeeze(0) if unbatched else y


def rectified_contrast_norm(
    x: torch.Tensor,
    window: torch.Tensor,
    threshold: float | str = "mean",
    border: str = "renormalize",
    floor: float = 1e-4,
) -> torch.Tensor:
    """Rectification then local contrast normalization: ``contrast_norm(|x|)``, fused.

    The lecture's "R" then "LCN" in one op: the same values as
    ``contrast_norm(x.abs(), ...)`` (bit for bit in the forward) and the same gradient,
    with the derivative of ``|x|`` taken as ``sign(x)`` (0 at ``x = 0``). Fused, the
    backward makes fewer passes over the ``(N, C, H, W)`` tensors and keeps only ``x``
    and the output for them. Arguments and shapes as in :func:`contrast_norm`.
    """
    threshold, floor = _check_divisive_options(threshold, floor)
    smoother, x4, unbatched = _prepare(x, window, border)
    y = _contrast(x4, smoother, threshold, floor, rectify=True)
    return y.squeeze(0) if unbatched else y


# ---------------------------------------------------------------------------------------
# The two steps, given a smoother that computes the windowed sum over all maps
# ---------------------------------------------------------------------------------------


def _subtract(x: torch.Tensor, smoother: _Smoother) -> torch.Tensor:
    # x + (-mean), not x - mean: the backward of a broadcast subtraction negates the whole
    # (N, C, H, W) gradient before summing it; this way only the (N, 1, H, W) sum is negated.
    return x + smoother(x, centre=True).neg()


def _contrast(
    x: torch.Tensor, smoother: _Smoother, threshold: float | str, floor: float, rectify: bool
) -> torch.Tensor:
    """``_divide(_subtract(|x| or x))``; one autograd node when the smoother allows it
    (the fused node has no forward-mode rule: a forward-mode tangent takes the small ops,
    each of which has one)."""
    if isinstance(smoother, _SeparableSmoother) and smoother.alpha is None and not has_tangent(x):
        if not derivative_recorded(x):
            return _contrast_forward(x, smoother, threshold, floor, rectify)[0]
        return _ContrastNorm.apply(x, smoother, threshold, floor, rectify)
    return _divide(_subtract(x.abs() if rectify else x, smoother), smoother, threshold, floor)


def _divide(
    v: torch.Tensor, smoother: _Smoother, threshold: float | str, floor: float
) -> torch.Tensor:
    variance = smoother.squares(v)  # (N, 1, H, W)
    # Clamping before the root keeps the value (to ~1e-19 in float32) and gives a zero,
    # not an infinite, derivative where the variance is 0, so a flat image has no NaN.
    sigma = variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()
    if threshold == "mean":
        c = sigma.mean(dim=(-2, -1), keepdim=True).clamp_min(floor)  # (N, 1, 1, 1)
        denominator = torch.maximum(sigma, c)
    else:
        denominator = sigma.clamp_min(max(threshold, floor))
    return v * denominator.reciprocal()


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def _check_threshold(threshold: object) -> float | str:
    if isinstance(threshold, str):
        if threshold != "mean":
            raise ValueError(f"threshold must be 'mean' or a number >= 0, got {threshold!r}")
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be 'mean' or a number >= 0, got {threshold!r}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be 'mean' or a finite number >= 0, got {threshold}")
    return float(threshold)


def _check_divisive_options(threshold: object, floor: object) -> tuple[float | str, float]:
    return _check_threshold(threshold), check_positive_float("floor", floor)


def _check_window(window: object) -> torch.Tensor:
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
    return window


def _check_finite(window: torch.Tensor) -> None:
    """Checked when a smoother is built (once per window for a cached one)."""
    if not torch.isfinite(window).all():
        raise ValueError("window must hold finite numbers, got NaN or infinity")


def _prepare(
    x: torch.Tensor, window: torch.Tensor, border: str
) -> tuple[_Smoother, torch.Tensor, bool]:
    """Check the arguments; return the smoother, ``x`` as ``(N, C, H, W)``, and unbatched."""
    check_choice("border", border, BORDERS)
    _check_window(window)
    unbatched = check_maps("x", x, maps=window.shape[0])
    x4 = x.unsqueeze(0) if unbatched else x  # (N, C, H, W)
    height, width = x4.shape[-2:]
    size_h, size_w = window.shape[-2:]
    if border == "reflect" and (size_h > height or size_w > width):
        raise ValueError(
            f"border='reflect' needs a window no larger than the map, got a {size_h}x{size_w}"
            f" window on {height}x{width} maps; use border='renormalize' or 'zero'"
        )
    return _smoother(window, border, height, width, x4), x4, unbatched


def _smoother(
    window: torch.Tensor, border: str, height: int, width: int, like: torch.Tensor
) -> _Smoother:
    """The smoother of ``window`` for maps of ``height x width`` like ``like``.

    A window whose derivative is not recorded (a module's window buffer) is checked,
    factorized, and its banded matrices built, once per border, size, dtype and device
    while it lives unchanged (:func:`cnnkit.ops._derived.derived`; an edit through
    ``.data`` goes unseen). A window that requires grad (or carries a forward-mode
    tangent) gets a convolution, built on every call so that the derivative reaches it.
    """
    if derivative_recorded(window):
        _check_finite(window)
        return _ConvSmoother(window.to(dtype=like.dtype, device=like.device), border, height, width)
    params = (border, height, width, like.dtype, like.device)
    return derived(window, "smoother", params, lambda: _build_smoother(window, *params))


def _build_smoother(
    window: torch.Tensor,
    border: str,
    height: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> _Smoother:
    _check_finite(window)
    cast = window.to(dtype=dtype, device=device, copy=True)  # kept: must not be the window
    factors = _factorize(cast)
    if factors is None:
        return _ConvSmoother(cast, border, height, width)
    return _SeparableSmoother.build(factors, border, height, width, dtype, device)


# ---------------------------------------------------------------------------------------
# Windowed sums: banded matrix products for separable windows, conv2d for the rest
# ---------------------------------------------------------------------------------------


class _Smoother(abc.ABC):
    """``z -> sum_{i,p,q} w_ipq z_{i,j+p,k+q}`` (over the inside mass for renormalize).

    Maps ``(N, C, H, W)`` to ``(N, 1, H, W)``. ``centre=True`` may smooth the map-reduced
    image minus its mean and add the smoothed mean back: the same in exact arithmetic, and
    in floating point it cancels less and keeps a constant image exactly constant under
    renormalize whenever its map sum is exact (integer pixel values, for instance).
    """

    @abc.abstractmethod
    def __call__(self, z: torch.Tensor, centre: bool) -> torch.Tensor:
        """Smooth ``z`` ``(N, C, H, W)`` into ``(N, 1, H, W)``."""

    def squares(self, z: torch.Tensor) -> torch.Tensor:
        """The smoothed ``z^2``: ``sum_{i,p,q} w_ipq z^2_{i,j+p,k+q}``, ``(N, 1, H, W)``."""
        return self(z * z, centre=False)


def _factorize(window: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(a, u, v)`` with ``w_ipq = a_i u_p v_q / total^2``, in float64; None if not so.

    ``a``, ``u``, ``v`` are the window's sums over the other two axes and ``total`` its sum;
    the window is accepted when that rank-one product matches it to a few units of its
    dtype's rounding (plus the float64 rounding of those sums), relative to its largest
    entry. NumPy, because these few small arrays cost microseconds there.
    """
    w = window.detach().to(device="cpu", dtype=torch.float64).numpy()
    total, largest = w.sum(), np.abs(w).max()
    if abs(total) <= largest * 1e-6:  # (near) zero total: no well-conditioned factors
        return None
    a, u, v = w.sum(axis=(1, 2)), w.sum(axis=(0, 2)), w.sum(axis=(0, 1))
    outer = a[:, None, None] * u[None, :, None] * v[None, None, :]  # (C, k_h, k_w)
    relative = 16 * torch.finfo(window.dtype).eps + np.finfo(w.dtype).eps * sum(w.shape)
    if np.abs(outer - w * total**2).max() > relative * largest * total**2:
        return None
    return a, u, v


def _band(weights: np.ndarray, n: int, border: str) -> np.ndarray:
    """The ``(n, n)`` matrix ``B`` with ``(B z)_j = sum_p weights_p z_{j+p}`` under the border.

    ``p`` runs over the centred offsets of ``weights`` (odd length). Out-of-image terms are
    dropped ("zero", "renormalize") or mirrored back in ("reflect", which needs
    ``len(weights) <= n``); "renormalize" then divides each row by its sum, the 1-D inside
    mass.
    """
    size = len(weights)
    columns = np.arange(n)[:, None] + (np.arange(size) - (size - 1) // 2)  # (n, k)
    rows = np.broadcast_to(np.arange(n)[:, None], columns.shape)  # (n, k)
    values = np.broadcast_to(weights, columns.shape)  # (n, k)
    if border == "reflect":
        columns = np.abs(columns)
        columns = np.where(columns >= n, 2 * (n - 1) - columns, columns)
    inside = (columns >= 0) & (columns < n)
    band = np.zeros((n, n))
    np.add.at(band, (rows[inside], columns[inside]), values[inside])
    if border == "renormalize":
        mass = band.sum(axis=1, keepdims=True)  # (n, 1)
        band /= np.where(mass == 0, 1.0, mass)
    return band


def _diagonals(band: np.ndarray, radius: int) -> np.ndarray:
    """``D`` of ``(2 radius + 1, n)`` with ``D[d, j] = band[j, j + d - radius]`` (0 outside).

    Every :func:`_band` matrix is 0 beyond ``radius`` of its diagonal (a reflected offset
    lands closer to the row, not farther), so ``D`` holds all of it.
    """
    n = band.shape[0]
    rows = np.arange(n)
    diagonals = np.zeros((2 * radius + 1, n))
    for d in range(2 * radius + 1):
        columns = rows + d - radius
        inside = (columns >= 0) & (columns < n)
        diagonals[d, inside] = band[rows[inside], columns[inside]]
    return diagonals


@dataclass(frozen=True)
class _Diagonals:
    """A separable smoother's matrices as the compiled kernels take them: the diagonals
    (:func:`_diagonals`) of ``B_h`` ``(2 r_h + 1, H)``, ``B_w`` ``(2 r_w + 1, W)`` and of
    their transposes, and the mass as an ``(H, W)`` map."""

    rows: torch.Tensor
    columns: torch.Tensor
    mass: torch.Tensor
    rows_t: torch.Tensor
    columns_t: torch.Tensor


@dataclass
class _SeparableSmoother(_Smoother):
    """For ``w_ipq = a_i u_p v_q / total^2``: ``B_h (sum_i a_i z_i) B_w^T / total``.

    ``rows`` (``B_h``, from ``u / total``) and ``columns_t`` (``B_w^T``, from ``v``) are
    :func:`_band` matrices that hold the border rule; for "renormalize" their rows are
    normalized to sum to 1. When every map has the same weight the maps are summed
    and the result divided by ``C`` (``alpha is None``); otherwise ``alpha = a / total``.
    ``mass`` is the smoothing of a reduced image of ones: 1, a number, or ``(H, W)``.
    """

    alpha: torch.Tensor | None  # (C,)
    rows: torch.Tensor  # (H, H)
    columns_t: torch.Tensor  # (W, W), transposed
    mass: torch.Tensor | float  # (H, W) or a number
    diagonals: _Diagonals | None = None  # for the compiled kernels (alpha None only)

    @classmethod
    def build(
        cls,
        factors: tuple[np.ndarray, ...],
        border: str,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> _SeparableSmoother:
        """The smoother for ``factors`` from :func:`_factorize`, in ``dtype`` on ``device``."""
        a, u, v = factors
        total = a.sum()
        if border == "renormalize":
            rows, columns = _band(u, height, border), _band(v, width, border)
            mass: np.ndarray | float = 1.0
        else:
            rows, columns = _band(u / total, height, border), _band(v, width, border)
            if border == "reflect":  # the window stays inside: rows sum to 1 and to sum(v)
                mass = float(total)
            else:
                mass = np.outer(rows.sum(axis=1), columns.sum(axis=1))  # (H, W)
        uniform = np.ptp(a) <= 16 * torch.finfo(dtype).eps * np.abs(a).max()

        def cast(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(dtype=dtype, device=device)

        diagonals = None
        if uniform:
            diagonals = _Diagonals(
                rows=cast(_diagonals(rows, len(u) // 2)),
                columns=cast(_diagonals(columns, len(v) // 2)),
                mass=cast(np.broadcast_to(mass, (height, width)).copy()),
                rows_t=cast(_diagonals(rows.T, len(u) // 2)),
                columns_t=cast(_diagonals(columns.T, len(v) // 2)),
            )
        return cls(
            alpha=None if uniform else cast(a / total),
            rows=cast(rows),
            columns_t=cast(np.ascontiguousarray(columns.T)),
            mass=cast(mass) if isinstance(mass, np.ndarray) else mass,
            diagonals=diagonals,
        )

    def __call__(self, z: torch.Tensor, centre: bool) -> torch.Tensor:
        if self.alpha is None:
            # A sum, whose backward is a broadcast view; the 1/C comes last, on (N, H, W).
            reduced = z.sum(dim=1)  # (N, H, W)
        else:
            reduced = torch.einsum("nchw,c->nhw", z, self.alpha)  # (N, H, W)
        return self._smooth(reduced, centre, z.shape[1])

    def squares(self, z: torch.Tensor) -> torch.Tensor:
        reduced = _SumOfSquares.apply(z, self.alpha)  # (N, H, W)
        return self._smooth(reduced, False, z.shape[1])

    def _adjoint(self, grad: torch.Tensor, maps: int) -> torch.Tensor:
        """The transpose of :meth:`_smooth` (either ``centre``) for ``alpha is None``:
        ``(N, H, W)`` in and out."""
        return self.rows.mT @ (grad / maps) @ self.columns_t.mT

    def _smooth(self, reduced: torch.Tensor, centre: bool, maps: int) -> torch.Tensor:
        if centre:
            shift = reduced.detach().mean(dim=(-2, -1), keepdim=True)  # (N, 1, 1)
            smoothed = self.rows @ (reduced - shift) @ self.columns_t + shift * self.mass
        else:
            smoothed = self.rows @ reduced @ self.columns_t
        if self.alpha is None:
            smoothed = smoothed / maps
        return smoothed.unsqueeze(1)  # (N, 1, H, W)


class _SumOfSquares(torch.autograd.Function):
    """``sum_i alpha_i z_i^2`` over dim 1 (``alpha=None``: all ones), ``(N, H, W)``.

    Autograd's ``(z * z).sum(1)`` spends three passes over ``(N, C, H, W)`` on the backward
    (``g z`` twice, then their sum); this one spends one. The backward is made of
    differentiable ops, so second derivatives still work; ``jvp`` gives forward mode.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.save_for_forward(z)
        ctx.alpha = alpha
        if alpha is None:
            return (z * z).sum(dim=1)
        return torch.einsum("nchw,nchw,c->nhw", z, z, alpha)

    @staticmethod
    def jvp(ctx, z_tangent: torch.Tensor, alpha_tangent: None) -> torch.Tensor:
        """Forward mode: ``sum_i 2 alpha_i z_i t_i`` for a tangent ``t`` of ``z``."""
        (z,) = ctx.saved_tensors
        product = 2 * z * z_tangent
        if ctx.alpha is None:
            return product.sum(dim=1)
        return torch.einsum("nchw,c->nhw", product, ctx.alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        scale = 2 * grad.unsqueeze(1)  # (N, 1, H, W)
        if ctx.alpha is not None:
            scale = scale * ctx.alpha[:, None, None]  # (N, C, H, W)
        return z * scale, None


class _ConvSmoother(_Smoother):
    """Any window, as one ``C -> 1`` convolution (differentiable in the window too)."""

    def __init__(self, window: torch.Tensor, border: str, height: int, width: int) -> None:
        self.weight = window.unsqueeze(0)  # (1, C, k_h, k_w)
        self.border = border
        size_h, size_w = window.shape[-2:]
        self.padding = (size_w // 2, size_w // 2, size_h // 2, size_h // 2)
        self.mass = None
        if border == "renormalize":
            ones = torch.ones(1, 1, height, width, dtype=window.dtype, device=window.device)
            kernel = window.sum(dim=0)[None, None]  # (1, 1, k_h, k_w)
            mass = F.conv2d(F.pad(ones, self.padding), kernel)  # (1, 1, H, W)
            self.mass = torch.where(mass == 0, 1.0, mass)

    def __call__(self, z: torch.Tensor, centre: bool) -> torch.Tensor:
        mode = "reflect" if self.border == "reflect" else "constant"
        total = F.conv2d(F.pad(z, self.padding, mode=mode), self.weight)  # (N, 1, H, W)
        return total if self.mass is None else total / self.mass


def _contrast_forward(
    x: torch.Tensor,
    smoother: _SeparableSmoother,
    threshold: float | str,
    floor: float,
    rectify: bool,
) -> tuple[torch.Tensor, ...]:
    """``y`` and what the backward needs: ``den``, ``variance``, ``sigma`` (each
    ``(N, 1, H, W)``), and for ``threshold="mean"`` the mean sigma and ``c`` (each
    ``(N, 1, 1, 1)``; else None).

    On a CPU the compiled kernel computes them in three passes over ``x``
    (:mod:`cnnkit._native`) when it is built; elsewhere the tensor operations below,
    in the kernel's order, so the two agree to float rounding.
    """
    mean_threshold = threshold == "mean"
    kernels = _native_kernels(x, smoother)
    if kernels is not None:
        matrices = smoother.diagonals
        limit = 0.0 if mean_threshold else threshold
        y, den, variance, sigma, mean_sigma = kernels.contrast_norm_forward(
            x.detach(),
            matrices.rows,
            matrices.columns,
            matrices.mass,
            rectify,
            mean_threshold,
            limit,
            floor,
        )
        den, variance, sigma = den.unsqueeze(1), variance.unsqueeze(1), sigma.unsqueeze(1)
        if not mean_threshold:
            return y, den, variance, sigma, None, None
        mean_sigma = mean_sigma.view(-1, 1, 1, 1)
        return y, den, variance, sigma, mean_sigma, mean_sigma.clamp_min(floor)
    maps = x.shape[1]
    a = x.abs() if rectify else x
    mean = smoother._smooth(a.sum(dim=1), True, maps)  # (N, 1, H, W)
    v = a.sub_(mean) if rectify else a - mean  # a - m: bitwise a + (-m)
    variance = smoother._smooth((v * v).sum(dim=1), False, maps)  # (N, 1, H, W)
    sigma = variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()  # (N, 1, H, W)
    if mean_threshold:
        mean_sigma = sigma.mean(dim=(-2, -1), keepdim=True)  # (N, 1, 1, 1)
        c = mean_sigma.clamp_min(floor)
        den = torch.maximum(sigma, c)
    else:
        mean_sigma = c = None
        den = sigma.clamp_min(max(threshold, floor))
    y = v.mul_(den.reciprocal())
    return y, den, variance, sigma, mean_sigma, c


def _native_kernels(x: torch.Tensor, smoother: _SeparableSmoother) -> object | None:
    """The compiled kernels if they can normalize ``x`` (N, C, H, W), else None."""
    if (
        smoother.diagonals is None
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or x.numel() == 0
        or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    ):
        return None
    return native_ops()


class _ContrastNorm(torch.autograd.Function):
    """Subtractive then divisive normalization (optionally of ``|x|``) as one autograd node.

    The forward (:func:`_contrast_forward`) runs the operations of
    ``_divide(_subtract(x))`` in their order -- as tensor operations, identical values; in
    the compiled kernel, equal to rounding -- and saves ``x``, the output ``y`` and
    ``(N, 1, H, W)`` quantities. With ``r = 1 / den`` and ``v = y den`` the backward is,
    per image,

        g_den = -r sum_i g_i y_i                      (N, 1, H, W)
        g_var = d den / d var applied to g_den        (the threshold and root rules)
        g_q = S^T g_var,  k = 2 den g_q               (S: the separable window sum)
        g_v = g r + k y,  g_a = g_v - S^T (sum_i g_v,i)
        g_x = sign(x) g_a   (rectifying)   or   g_a

    which passes over the ``(N, C, H, W)`` tensors about eight times where autograd's
    chain of small ops spends about twice that, working in place (three times in the
    compiled kernel, used where the forward's is). Ties and clamps follow
    PyTorch's rules (``maximum`` splits a tie in half, ``clamp_min`` passes the gradient
    at equality). When a graph of the backward is recorded (``create_graph=True``) the
    gradient is recomputed through the unfused ops instead, so second derivatives work.
    """

    @staticmethod
    def forward(ctx, x, smoother, threshold, floor, rectify):
        y, den, variance, sigma, mean_sigma, c = _contrast_forward(
            x, smoother, threshold, floor, rectify
        )
        ctx.save_for_backward(x, y, den, variance, sigma, mean_sigma, c)
        ctx.smoother, ctx.threshold, ctx.floor, ctx.rectify = smoother, threshold, floor, rectify
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, den, variance, sigma, mean_sigma, c = ctx.saved_tensors
        smoother, threshold, floor = ctx.smoother, ctx.threshold, ctx.floor
        if torch.is_grad_enabled():  # double backward: differentiate the unfused ops
            with torch.enable_grad():
                a = x.abs() if ctx.rectify else x
                again = _divide(_subtract(a, smoother), smoother, threshold, floor)
                return torch.autograd.grad(again, x, grad, create_graph=True)[0], *[None] * 4
        kernels = _native_kernels(x, smoother)
        if kernels is not None:
            layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
            images = x.shape[0]
            mean = mean_sigma.view(images) if threshold == "mean" else den.new_zeros(images)
            g_x = kernels.contrast_norm_backward(
                grad.contiguous(memory_format=layout),
                x.detach(),
                y.detach().contiguous(memory_format=layout),
                *(t.squeeze(1).contiguous() for t in (den, variance, sigma)),
                mean,
                smoother.diagonals.rows_t,
                smoother.diagonals.columns_t,
                ctx.rectify,
                threshold == "mean",
                0.0 if threshold == "mean" else threshold,
                floor,
            )
            return g_x, None, None, None, None
        maps = y.shape[1]
        r = den.reciprocal()
        work = grad * y  # (N, C, H, W), reused for g_v below
        g_den = work.sum(dim=1, keepdim=True).mul_(r).neg_()  # (N, 1, H, W)
        zero = torch.zeros((), dtype=g_den.dtype, device=g_den.device)
        if threshold == "mean":
            half = torch.where(sigma == c, g_den / 2, g_den)
            g_sigma = torch.where(sigma < c, zero, half)
            g_c = torch.where(sigma > c, zero, half).sum(dim=(-2, -1), keepdim=True)
            g_c = torch.where(mean_sigma >= floor, g_c, zero)  # (N, 1, 1, 1)
            g_sigma = g_sigma + g_c / (sigma.shape[-2] * sigma.shape[-1])
        else:
            g_sigma = torch.where(sigma >= max(threshold, floor), g_den, zero)
        tiny = torch.finfo(variance.dtype).tiny
        g_var = torch.where(variance >= tiny, g_sigma / (2 * sigma), zero)
        k = 2 * den * smoother._adjoint(g_var.squeeze(1), maps).unsqueeze(1)  # (N, 1, H, W)
        g_v = torch.mul(grad, r, out=work).addcmul_(y, k)  # (N, C, H, W)
        g_a = g_v.sub_(smoother._adjoint(g_v.sum(dim=1), maps).unsqueeze(1))
        if ctx.rectify:
            g_a = g_a.mul_(x.sgn())
        return g_a, None, None, None, None
