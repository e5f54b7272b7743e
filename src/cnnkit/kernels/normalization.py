"""Local contrast normalization as one registered operator, ``torch.ops.cnnkit.contrast_norm``.

The plain op (:func:`cnnkit.ops.contrast_norm`) makes about ten passes over the maps and
some twenty small tensor operations. This operator computes the same values in one
node that ``torch.compile`` sees whole, with a hand-written derivative:

- for a window that is the same on every map and separable, ``w_ipq = u_p v_q / C`` (a
  :func:`~cnnkit.ops.gaussian_window` is), the windowed sum of an image is
  ``B_h (sum_i z_i) B_w^T / C`` with banded ``H x H`` and ``W x W`` matrices that hold the
  border rule; on a CPU the compiled kernel of :mod:`cnnkit._native` runs the whole
  normalization in three passes over the maps, elsewhere the same sums are matrix
  products;
- any other window takes the plain sums (:func:`cnnkit.windowed_sum.windowed_sum`).

The banded matrices depend only on the window's values, the border and the map size;
they are built from those values (never from where the window is stored) and the last
few are kept, so an edited window is always seen.

Forward, per image, with ``a = |x|`` (rectifying) or ``x`` and ``S`` the windowed sum::

    m = S(a);  v = a - m;  variance = S(v^2);  sigma = sqrt(max(variance, tiny))
    den = max(sigma, c);  y = v / den

Backward, with ``r = 1 / den`` and ``S^T`` the adjoint of the windowed sum::

    g_den = -r sum_i g_i y_i;  g_var = (d den / d variance) g_den   (threshold, root rules)
    k = 2 den S^T(g_var);  g_v = g r + k y;  g_a = g_v - S^T(sum_i g_v)
    g_x = sign(x) g_a   (rectifying)   or   g_a

Ties and clamps follow PyTorch's rules (``maximum`` splits a tie in half, ``clamp_min``
passes the gradient at equality), so the operator's derivative is the plain op's.
Second derivatives go through the plain formula.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from cnnkit._native import native_ops
from cnnkit._validation import is_concrete
from cnnkit.kernels import fast_path_allowed, fold_images, recorded
from cnnkit.windowed_sum import local_mean, windowed_sum

__all__ = ["contrast_norm", "contrast_norm_applies"]


def contrast_norm_applies(x: torch.Tensor, window: torch.Tensor) -> bool:
    """Whether :func:`contrast_norm` may normalize ``x`` (N, C, H, W) with ``window``: the
    fast paths allow it, the dtype is float32 or float64, and no derivative flows into
    the window (the operator differentiates ``x`` only)."""
    return (
        fast_path_allowed(x, window, traced=True)
        and x.dtype in (torch.float32, torch.float64)
        and not recorded(window)
    )


def contrast_norm(
    x: torch.Tensor,
    window: torch.Tensor,
    border: str,
    threshold: float | str,
    floor: float,
    rectify: bool,
) -> torch.Tensor:
    """``y`` of the module notes for ``x`` (N, C, H, W): ``contrast_norm(|x| or x)``."""
    mean_threshold = threshold == "mean"
    limit = 0.0 if mean_threshold else float(threshold)
    # Eagerly and with nothing to differentiate, the operator's implementation is called
    # as the function it is: the same values, without the dispatcher's tens of
    # microseconds per call (a batch-1 forward makes two calls).
    direct = is_concrete(x) and not recorded(x)
    op = _contrast_norm_parts if direct else torch.ops.cnnkit.contrast_norm
    y, *_ = op(x, window.detach(), border, rectify, mean_threshold, limit, floor)
    return y


# ---------------------------------------------------------------------------------------
# Banded matrices of a separable window
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bands:
    """The windowed sum ``S(z) = B_h (sum_i z_i) B_w^T / C`` of a separable window.

    ``rows`` is ``B_h`` ``(H, H)``, ``columns_t`` is ``B_w^T`` ``(W, W)``, ``mass`` is
    ``B_h 1 B_w^T`` ``(H, W)``; the ``*_diagonals`` hold the same matrices (and
    their transposes) as the compiled kernel takes them, ``D[d, j] = B[j, j + d - r]``.
    """

    rows: torch.Tensor
    columns_t: torch.Tensor
    mass: torch.Tensor
    row_diagonals: torch.Tensor
    column_diagonals: torch.Tensor
    row_diagonals_t: torch.Tensor
    column_diagonals_t: torch.Tensor

    def smooth(self, reduced: torch.Tensor, maps: int, centre: bool) -> torch.Tensor:
        """``S`` of an image whose maps are summed already, ``(N, H, W)`` -> ``(N, 1, H, W)``.

        ``centre`` smooths ``reduced`` minus its mean and adds the smoothed mean back:
        the same in exact arithmetic; in floating point it cancels less, and a constant
        image stays exactly constant under "renormalize".
        """
        if centre:
            shift = reduced.mean(dim=(-2, -1), keepdim=True)  # (N, 1, 1)
            smoothed = self.rows @ (reduced - shift) @ self.columns_t + shift * self.mass
        else:
            smoothed = self.rows @ reduced @ self.columns_t
        return (smoothed / maps).unsqueeze(1)

    def adjoint(self, grad: torch.Tensor, maps: int) -> torch.Tensor:
        """``S^T`` for one map: ``(N, H, W)`` in and out."""
        return self.rows.mT @ (grad / maps) @ self.columns_t.mT


def _bands(window: torch.Tensor, border: str, height: int, width: int, like: torch.Tensor):
    """The :class:`_Bands` of ``window`` for ``height x width`` maps in ``like``'s dtype and
    device, or None when the window is not ``u_p v_q / C`` on every map."""
    window = window.detach()
    first = window[:1]
    if not torch.equal(window, first.expand_as(window)):
        return None  # maps with windows of their own: no single pair of banded matrices
    raw = first.contiguous().cpu().view(-1).view(torch.uint8)  # its exact bits
    key = (raw.numpy().tobytes(), tuple(window.shape), window.dtype)
    return _cached_bands(key, border, height, width, like.dtype, like.device)


@functools.lru_cache(maxsize=16)
def _cached_bands(key, border, height, width, dtype, device):  # noqa: ANN001, ANN202
    data, shape, window_dtype = key  # the bits of the first map; every map is the same
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(window_dtype)
    w = np.broadcast_to(raw.to(torch.float64).reshape(shape[1:]).numpy(), shape)
    factors = _factorize(w, window_dtype)
    if factors is None:
        return None
    u, v = factors
    rows, columns = _band(u, height, border), _band(v, width, border)
    if border == "renormalize":
        rows /= _nonzero(rows.sum(axis=1, keepdims=True))
        columns /= _nonzero(columns.sum(axis=1, keepdims=True))
    mass = np.outer(rows.sum(axis=1), columns.sum(axis=1))  # (H, W): B_h 1 B_w^T
    if border == "renormalize":
        mass = np.ones_like(mass)  # exactly, so that a constant image stays constant
    elif border == "reflect":
        mass = np.full_like(mass, w.sum())  # every mirrored window lies inside

    def cast(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype=dtype, device=device)

    with torch.inference_mode(False):  # kept: usable by a later training step
        return _Bands(
            rows=cast(rows),
            columns_t=cast(columns.T),
            mass=cast(mass),
            row_diagonals=cast(_diagonals(rows, len(u) // 2)),
            column_diagonals=cast(_diagonals(columns, len(v) // 2)),
            row_diagonals_t=cast(_diagonals(rows.T, len(u) // 2)),
            column_diagonals_t=cast(_diagonals(columns.T, len(v) // 2)),
        )


def _nonzero(sums: np.ndarray) -> np.ndarray:
    return np.where(sums == 0, 1.0, sums)


def _factorize(w: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """``(u, v)`` with ``w_ipq = u_p v_q / C`` for every map ``i``, else None.

    ``u`` and ``v`` are the window's sums over the other axes, scaled so that
    ``C u_p v_q`` reproduces it; accepted when every map is the same and the rank-one
    product matches to a few units of the window dtype's rounding.
    """
    maps = w.shape[0]
    largest = np.abs(w).max()
    tolerance = (16 * torch.finfo(dtype).eps + 1e-15 * w.size) * largest
    if largest == 0 or np.abs(w - w[:1]).max() > tolerance:
        return None
    plane = w[0] * maps  # (k_h, k_w), u_p v_q
    total = plane.sum()
    if abs(total) <= largest * maps * 1e-6:
        return None
    u, v = plane.sum(axis=1), plane.sum(axis=0) / total
    if np.abs(np.outer(u, v) - plane).max() > tolerance * maps:
        return None
    return u, v


def _band(weights: np.ndarray, n: int, border: str) -> np.ndarray:
    """``(n, n)`` ``B`` with ``(B z)_j = sum_p weights_p z_{j+p}`` under the border rule.

    ``p`` runs over the centred offsets of ``weights`` (odd length); terms outside the map
    are dropped ("zero", "renormalize") or mirrored back in ("reflect").
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
    return band


def _diagonals(band: np.ndarray, radius: int) -> np.ndarray:
    """``D`` of ``(2 radius + 1, n)`` with ``D[d, j] = band[j, j + d - radius]`` (0 outside);
    a :func:`_band` matrix is 0 farther than ``radius`` from its diagonal."""
    n = band.shape[0]
    rows = np.arange(n)
    diagonals = np.zeros((2 * radius + 1, n))
    for d in range(2 * radius + 1):
        columns = rows + d - radius
        inside = (columns >= 0) & (columns < n)
        diagonals[d, inside] = band[rows[inside], columns[inside]]
    return diagonals


# ---------------------------------------------------------------------------------------
# The operator: forward, backward, shapes, derivative, batching
# ---------------------------------------------------------------------------------------


def _uses_native(x: torch.Tensor) -> bool:
    layout_ok = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return x.device.type == "cpu" and layout_ok and native_ops() is not None


def _contrast_norm_parts(
    x: torch.Tensor,
    window: torch.Tensor,
    border: str,
    rectify: bool,
    mean_threshold: bool,
    threshold: float,
    floor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, den, variance, sigma, mean_sigma)``: ``y`` (N, C, H, W); ``den``,
    ``variance`` and ``sigma`` (N, H, W); ``mean_sigma`` (N,) (0 unless
    ``mean_threshold``)."""
    bands = _bands(window, border, *x.shape[-2:], x)
    if bands is not None and _uses_native(x):
        y, den, variance, sigma, mean_sigma = native_ops().contrast_norm_forward(
            x, bands.row_diagonals, bands.column_diagonals, bands.mass,
            rectify, mean_threshold, threshold, floor,
        )  # fmt: skip
        return y, den, variance, sigma, mean_sigma
    with torch.no_grad():
        parts = _forward_parts(x, window, border, rectify, mean_threshold, threshold, floor, bands)
    y, *small = parts
    return y, *(part.contiguous() for part in small)


def _forward_parts(x, window, border, rectify, mean_threshold, threshold, floor, bands):  # noqa: ANN001, ANN202
    """The forward in tensor operations, in the compiled kernel's order."""
    maps = x.shape[1]
    a = x.abs() if rectify else x
    if bands is not None:
        mean = bands.smooth(a.sum(dim=1), maps, centre=True)  # (N, 1, H, W)
    else:
        mean = local_mean(a, window, border)
    v = a - mean
    squares = v * v
    if bands is not None:
        variance = bands.smooth(squares.sum(dim=1), maps, centre=False)
    else:
        variance = windowed_sum(squares, window, border)
    sigma = variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()  # (N, 1, H, W)
    if mean_threshold:
        mean_sigma = sigma.mean(dim=(-2, -1), keepdim=True)  # (N, 1, 1, 1)
        den = torch.maximum(sigma, mean_sigma.clamp_min(floor))
    else:
        mean_sigma = sigma.new_zeros(sigma.shape[0], 1, 1, 1)
        den = sigma.clamp_min(max(threshold, floor))
    y = v * den.reciprocal()
    return y, den.squeeze(1), variance.squeeze(1), sigma.squeeze(1), mean_sigma.view(-1)


_contrast_norm_op = torch.library.custom_op("cnnkit::contrast_norm", mutates_args=())(
    _contrast_norm_parts
)


@_contrast_norm_op.register_fake
def _(x, window, border, rectify, mean_threshold, threshold, floor):  # noqa: ANN001, ANN202
    n, _, h, w = x.shape
    return torch.empty_like(x), *(x.new_empty(n, h, w) for _ in range(3)), x.new_empty(n)


@torch.library.custom_op("cnnkit::contrast_norm_backward", mutates_args=())
def _contrast_norm_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    den: torch.Tensor,
    variance: torch.Tensor,
    sigma: torch.Tensor,
    mean_sigma: torch.Tensor,
    window: torch.Tensor,
    border: str,
    rectify: bool,
    mean_threshold: bool,
    threshold: float,
    floor: float,
) -> torch.Tensor:
    """The gradient of ``y`` with respect to ``x`` (module notes), ``(N, C, H, W)``."""
    bands = _bands(window, border, *x.shape[-2:], x)
    if bands is None:  # the plain sums: differentiate the forward's operations

        def forward(t: torch.Tensor) -> torch.Tensor:
            return _forward_parts(t, window, border, rectify, mean_threshold, threshold,
                                  floor, None)[0]  # fmt: skip

        _, pullback = torch.func.vjp(forward, x)
        return pullback(grad)[0]
    if _uses_native(x):
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        return native_ops().contrast_norm_backward(
            grad.contiguous(memory_format=layout), x, y.contiguous(memory_format=layout),
            den, variance, sigma, mean_sigma, bands.row_diagonals_t, bands.column_diagonals_t,
            rectify, mean_threshold, threshold, floor,
        )  # fmt: skip
    return _backward_parts(grad, x, y, den, variance, sigma, mean_sigma, bands, rectify,
                           mean_threshold, threshold, floor)  # fmt: skip


def _backward_parts(grad, x, y, den, variance, sigma, mean_sigma, bands, rectify,  # noqa: ANN001, ANN202
                    mean_threshold, threshold, floor):  # fmt: skip
    """The backward of the module notes in tensor operations, about eight passes."""
    maps = y.shape[1]
    den, variance, sigma = den.unsqueeze(1), variance.unsqueeze(1), sigma.unsqueeze(1)
    r = den.reciprocal()
    work = grad * y  # (N, C, H, W), reused for g_v below
    g_den = work.sum(dim=1, keepdim=True).mul_(r).neg_()  # (N, 1, H, W)
    zero = torch.zeros((), dtype=g_den.dtype, device=g_den.device)
    if mean_threshold:
        mean_sigma = mean_sigma.view(-1, 1, 1, 1)
        c = mean_sigma.clamp_min(floor)
        half = torch.where(sigma == c, g_den / 2, g_den)
        g_sigma = torch.where(sigma < c, zero, half)
        g_c = torch.where(sigma > c, zero, half).sum(dim=(-2, -1), keepdim=True)
        g_c = torch.where(mean_sigma >= floor, g_c, zero)  # (N, 1, 1, 1)
        g_sigma = g_sigma + g_c / (sigma.shape[-2] * sigma.shape[-1])
    else:
        g_sigma = torch.where(sigma >= max(threshold, floor), g_den, zero)
    tiny = torch.finfo(variance.dtype).tiny
    g_var = torch.where(variance >= tiny, g_sigma / (2 * sigma), zero)
    k = 2 * den * bands.adjoint(g_var.squeeze(1), maps).unsqueeze(1)  # (N, 1, H, W)
    g_v = torch.mul(grad, r, out=work).addcmul_(y, k)  # (N, C, H, W)
    g_a = g_v.sub_(bands.adjoint(g_v.sum(dim=1), maps).unsqueeze(1))
    return g_a.mul_(x.sgn()) if rectify else g_a


@_contrast_norm_backward_op.register_fake
def _(grad, x, *rest):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, window, border, rectify, mean_threshold, threshold, floor = inputs
    y, den, variance, sigma, mean_sigma = output
    ctx.save_for_backward(x, window, y, den, variance, sigma, mean_sigma)
    ctx.options = (border, rectify, mean_threshold, threshold, floor)
    # The statistics are the forward's own: no gradient flows into them, and none is
    # made up as zeros for them in the backward.
    ctx.mark_non_differentiable(den, variance, sigma, mean_sigma)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *unused):  # noqa: ANN001, ANN202
    if grad is None:  # y is not used by what is differentiated
        return (None,) * 7
    x, window, y, den, variance, sigma, mean_sigma = ctx.saved_tensors
    border, rectify, mean_threshold, threshold, floor = ctx.options
    if torch.is_grad_enabled():  # a graph of the backward is recorded: the plain formula
        parts = _forward_parts(x, window, border, rectify, mean_threshold, threshold, floor, None)
        g_x = torch.autograd.grad(parts[0], x, grad, create_graph=True)[0]
    else:
        g_x = _contrast_norm_backward_op(
            grad, x, y, den, variance, sigma, mean_sigma, window, *ctx.options
        )
    return g_x, None, None, None, None, None, None


_contrast_norm_op.register_autograd(_backward, setup_context=_setup_context)


_contrast_norm_op.register_vmap(functools.partial(fold_images, _contrast_norm_op))
