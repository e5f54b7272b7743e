"""Contrast normalization followed by max pooling, as one registered operator,
``torch.ops.cnnkit.contrast_norm_max_pool`` (its compiled kernel: ``_native/norm_pool.cpp``).

The lecture's first stage normalizes 64 maps of 75x75 and then pools them with a 10x10
window at stride 5 to 14x14: the normalized maps ``y`` are 29 times larger than what
the pooling keeps. This operator never writes ``y`` out. Per image, it makes the
normalization's two passes for the local mean and ``sigma``
(:mod:`cnnkit.kernels.normalization`), then computes each map's ``y`` in a buffer of one
map and pools it there (channels-last maps: each pixel's maps at once, where the pooling
needs them). It keeps per pixel the mean ``m``, ``den``, the variance,
``sigma`` and ``sum_i y_i`` (``(N, 5, H, W)``), and per image the mean of ``sigma``.

Backward. The gradient ``g`` that max pooling sends to ``y`` is one value per window, at
the window's maximum. So the sums over maps of the normalization's backward are sums
over windows, with ``r = 1 / den``, ``S^T`` the adjoint of the windowed sum and ``a`` the
rectified input::

    sum_i g_i y_i = sum over windows of (window gradient x y at its maximum)
    sum_i g_v,i   = r sum_i g_i + k sum_i y_i     (k from the divisor, as in the module)
    q = S^T(sum_i g_v) / C
    g_x = sign(x) (k y - q) + sign(x) g r,   y = (a - m) r

and one pass over the maps writes ``g_x``: the first term everywhere, the second at
each window's maximum. The values and gradients are those of the three layers in turn,
to float rounding. Second derivatives go through the plain formula.

Where nothing is differentiated, the filter bank before may join it
(``torch.ops.cnnkit.filter_norm_max_pool``, :func:`filter_norm_max_pool`): each image's
maps are made by the direct correlation (:mod:`cnnkit.kernels.direct_conv`) into a
buffer of one image, which stays in the cache while the normalization and the pooling
read it, so the filter bank's maps (64 of 75x75 per image in the lecture) never go out
to memory either.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cnnkit._native import native_ops
from cnnkit._shapes import valid_hw
from cnnkit._validation import is_concrete
from cnnkit.kernels import fast_path_allowed, fold_images, recorded
from cnnkit.kernels.direct_conv import direct_conv2d_applies, taps, untaps
from cnnkit.kernels.normalization import _bands, _forward_parts

__all__ = [
    "contrast_norm_max_pool",
    "contrast_norm_max_pool_applies",
    "filter_norm_max_pool",
    "filter_norm_max_pool_applies",
]


def contrast_norm_max_pool_applies(
    x: torch.Tensor, window: torch.Tensor, border: str, pool_window: tuple[int, int]
) -> bool:
    """Whether :func:`contrast_norm_max_pool` may take ``x`` (N, C, H, W): the fast
    paths are allowed (eagerly: under ``torch.compile`` the layers are traced one by
    one instead), ``x`` is a contiguous or channels-last float32/float64 CPU tensor with
    maps at least as large as ``pool_window``, the compiled kernels are built, no
    derivative flows into the window, and the window is the same separable one on every
    map."""
    if not (
        fast_path_allowed(x, window)
        and x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and all(k <= n for k, n in zip(pool_window, x.shape[-2:], strict=True))
        and not recorded(window)
        and native_ops() is not None
    ):
        return False
    return _bands(window, border, *x.shape[-2:], x) is not None


def contrast_norm_max_pool(
    x: torch.Tensor,
    window: torch.Tensor,
    border: str,
    threshold: float | str,
    floor: float,
    rectify: bool,
    pool_window: tuple[int, int],
    pool_stride: tuple[int, int],
) -> torch.Tensor:
    """``F.max_pool2d(contrast_norm(|x| or x), pool_window, pool_stride)`` for ``x``
    (N, C, H, W): ``(N, C, H_out, W_out)``."""
    mean_threshold, limit = _threshold_options(threshold)
    options = (border, rectify, mean_threshold, limit, floor, *pool_window, *pool_stride)
    if is_concrete(x) and not recorded(x):  # past the dispatcher, without the sums
        return _forward(x, window.detach(), *options, with_sums=False)[0]
    return torch.ops.cnnkit.contrast_norm_max_pool(x, window.detach(), *options, True)[0]


def _threshold_options(threshold: float | str) -> tuple[bool, float]:
    """The compiled kernels' form of a threshold: (whether it is the image's mean of
    sigma, the fixed value otherwise)."""
    mean_threshold = threshold == "mean"
    return mean_threshold, 0.0 if mean_threshold else float(threshold)


def _forward(
    x: torch.Tensor,
    window: torch.Tensor,
    border: str,
    rectify: bool,
    mean_threshold: bool,
    threshold: float,
    floor: float,
    kh: int,
    kw: int,
    sh: int,
    sw: int,
    with_sums: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pooled, index, statistics, mean_sigma)``: the pooled maps and the flat index of
    each window's maximum ``(N, C, H_out, W_out)``; ``m, den, variance, sigma,
    sum_i y_i`` ``(N, 5, H, W)``; the mean of ``sigma`` ``(N,)``. Without ``with_sums``
    (no backward to run) the plane of ``sum_i y_i`` is left NaN and not computed."""
    bands = _bands(window, border, *x.shape[-2:], x)
    if bands is None or native_ops() is None or x.device.type != "cpu":
        raise ValueError(
            "cnnkit::contrast_norm_max_pool needs the compiled CPU kernels, x on the CPU and a "
            "window that is the same separable one on every map; got x on "
            f"{x.device.type}, a window of shape {tuple(window.shape)} that is "
            f"{'not ' if bands is None else ''}separable, and the kernels "
            f"{'not ' if native_ops() is None else ''}built (see contrast_norm_max_pool_applies)"
        )
    return native_ops().contrast_norm_max_pool_forward(
        x.contiguous(memory_format=_layout(x)), bands.row_diagonals, bands.column_diagonals,
        bands.mass, rectify, mean_threshold, threshold, floor, kh, kw, sh, sw, with_sums,
    )  # fmt: skip


_op = torch.library.custom_op("cnnkit::contrast_norm_max_pool", mutates_args=())(_forward)


@_op.register_fake
def _(x, window, border, rectify, mean_threshold, threshold, floor, kh, kw, sh, sw, with_sums):  # noqa: ANN001, ANN202
    n, c, h, w = x.shape
    shape = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
    layout = _layout(x)
    pooled = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)
    index = torch.empty(shape, dtype=torch.int64, device=x.device, memory_format=layout)
    return pooled, index, x.new_empty(n, 5, h, w), x.new_empty(n)


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The layout of the pooled maps: channels-last for channels-last ``x``, else
    contiguous."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.custom_op("cnnkit::contrast_norm_max_pool_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor,
    index: torch.Tensor,
    maxima: torch.Tensor,
    x: torch.Tensor,
    statistics: torch.Tensor,
    mean_sigma: torch.Tensor,
    window: torch.Tensor,
    border: str,
    rectify: bool,
    mean_threshold: bool,
    threshold: float,
    floor: float,
) -> torch.Tensor:
    """The gradient with respect to ``x`` (module notes), ``(N, C, H, W)`` in the layout
    of the pooled maps; ``maxima`` are the pooled maps the forward gave."""
    bands = _bands(window, border, *x.shape[-2:], x)
    return native_ops().contrast_norm_max_pool_backward(
        grad, index, maxima, x.contiguous(memory_format=_layout(x)), statistics, mean_sigma,
        bands.row_diagonals_t, bands.column_diagonals_t, rectify, mean_threshold, threshold,
        floor,
    )  # fmt: skip


@_backward_op.register_fake
def _(grad, index, maxima, x, *rest):  # noqa: ANN001, ANN202
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, window, *options = inputs
    pooled, index, statistics, mean_sigma = output
    maxima = pooled.detach().clone()  # the pooled maps are free to change in place
    ctx.save_for_backward(x, window, index, maxima, statistics, mean_sigma)
    ctx.options = tuple(options)
    ctx.mark_non_differentiable(index, statistics, mean_sigma)
    ctx.set_materialize_grads(False)  # no zeros made up for the statistics' gradients


def _backward(ctx, grad, *unused):  # noqa: ANN001, ANN202
    if grad is None:  # the pooled maps are not used by what is differentiated
        return (None,) * 12
    x, window, index, maxima, statistics, mean_sigma = ctx.saved_tensors
    border, rectify, mean_threshold, threshold, floor, kh, kw, sh, sw, _ = ctx.options
    if torch.is_grad_enabled():  # a graph of the backward is recorded: the plain formula
        norm_options = (border, rectify, mean_threshold, threshold, floor)
        y = _forward_parts(x, window, *norm_options, None)[0]
        out = F.max_pool2d(y, (kh, kw), (sh, sw))
        g_x = torch.autograd.grad(out, x, grad, create_graph=True)[0]
    else:
        g_x = _backward_op(grad, index, maxima, x, statistics, mean_sigma, window, border,
                           rectify, mean_threshold, threshold, floor)  # fmt: skip
    return (g_x, *(None,) * 11)


_op.register_autograd(_backward, setup_context=_setup_context)


_op.register_vmap(functools.partial(fold_images, _op))


def filter_norm_max_pool_applies(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    window: torch.Tensor,
    border: str,
    pool_window: tuple[int, int],
) -> bool:
    """Whether :func:`filter_norm_max_pool` may take ``x`` (N, C, H, W) and the filter
    bank's dense ``weight`` (O, C, kh, kw): no derivative is recorded for ``x`` or the
    window (the kernels' and biases' may be), the direct correlation takes them
    (:func:`direct_conv2d_applies`), the pooling window fits in its maps, and the
    normalization's window is the same separable one on every map."""
    if not direct_conv2d_applies(x, weight, bias) or recorded(x) or recorded(window):
        return False
    h, w = valid_hw(x.shape[-2:], weight.shape[-2:], (1, 1))
    return (
        fast_path_allowed(window)
        and all(k <= n for k, n in zip(pool_window, (h, w), strict=True))
        and _bands(window, border, h, w, x) is not None
    )


def filter_norm_max_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    window: torch.Tensor,
    border: str,
    threshold: float | str,
    floor: float,
    pool_window: tuple[int, int],
    pool_stride: tuple[int, int],
) -> torch.Tensor:
    """``contrast_norm_max_pool(F.conv2d(x, weight, bias), ..., rectify=True)``: the
    filter bank at stride 1, rectification, contrast normalization and max pooling, for
    what :func:`filter_norm_max_pool_applies` accepts; channels-last
    ``(N, O, H_out, W_out)``. Differentiable in ``weight`` and ``bias``."""
    options = (border, *_threshold_options(threshold), floor, *pool_window, *pool_stride)
    if is_concrete(x) and not (recorded(weight) or recorded(bias)):  # past the dispatcher
        return _filtered(x, weight, bias, window.detach(), *options, keep=False)[0]
    return torch.ops.cnnkit.filter_norm_max_pool(x, weight, bias, window.detach(), *options, True)[
        0
    ]


def _filtered(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    window: torch.Tensor,
    border: str,
    mean_threshold: bool,
    threshold: float,
    floor: float,
    pool_kh: int,
    pool_kw: int,
    sh: int,
    sw: int,
    keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pooled, maps, index, statistics, mean_sigma)``: the pooled maps, and with
    ``keep`` what the backward needs -- the filter bank's maps (channels-last) and the
    rest as :func:`_forward` gives them; without it (nothing to differentiate) each image
    is made in one pass through the cache and the other four are empty."""
    h, w = valid_hw(x.shape[-2:], weight.shape[-2:], (1, 1))
    bands = _bands(window, border, h, w, x)
    ops = native_ops()
    if bands is None or ops is None or x.device.type != "cpu":
        raise ValueError(
            "cnnkit::filter_norm_max_pool needs the compiled CPU kernels, x on the CPU and a "
            "window that is the same separable one on every map (see "
            "filter_norm_max_pool_applies)"
        )
    x, kernels = x.contiguous(), taps(weight)
    options = (bands.mass, True, mean_threshold, threshold, floor, pool_kh, pool_kw, sh, sw)
    if not keep:
        pooled = ops.direct_conv_norm_max_pool(
            x, kernels, bias, *weight.shape[2:], bands.row_diagonals, bands.column_diagonals,
            *options,
        )  # fmt: skip
        return pooled, *_nothing_kept(x)
    maps = ops.direct_conv2d_forward(x, kernels, bias, *weight.shape[2:])
    pooled, index, statistics, mean_sigma = ops.contrast_norm_max_pool_forward(
        maps, bands.row_diagonals, bands.column_diagonals, *options, True
    )
    last = torch.channels_last  # also for 1x1 maps, where the two layouts coincide
    return pooled.contiguous(memory_format=last), maps, index, statistics, mean_sigma


def _nothing_kept(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Four empty tensors of their own for the outputs the backward would need."""
    return x.new_empty(0), x.new_empty(0, dtype=torch.int64), x.new_empty(0), x.new_empty(0)


_filtered_op = torch.library.custom_op("cnnkit::filter_norm_max_pool", mutates_args=())(_filtered)


@_filtered_op.register_fake
def _(
    x,
    weight,
    bias,
    window,
    border,
    mean_threshold,
    threshold,
    floor,
    pool_kh,
    pool_kw,
    sh,
    sw,
    keep,
):  # noqa: ANN001, ANN202, E501
    n, maps = x.shape[0], weight.shape[0]
    h, w = valid_hw(x.shape[-2:], weight.shape[-2:], (1, 1))
    shape = (n, maps, (h - pool_kh) // sh + 1, (w - pool_kw) // sw + 1)
    last = torch.channels_last
    pooled = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=last)
    if not keep:
        return pooled, *_nothing_kept(x)
    index = torch.empty(shape, dtype=torch.int64, device=x.device, memory_format=last)
    y = torch.empty((n, maps, h, w), dtype=x.dtype, device=x.device, memory_format=last)
    return pooled, y, index, x.new_empty(n, 5, h, w), x.new_empty(n)


@torch.library.custom_op("cnnkit::filter_norm_max_pool_backward", mutates_args=())
def _filtered_backward_op(
    grad: torch.Tensor,
    index: torch.Tensor,
    maxima: torch.Tensor,
    maps: torch.Tensor,
    statistics: torch.Tensor,
    mean_sigma: torch.Tensor,
    window: torch.Tensor,
    border: str,
    mean_threshold: bool,
    threshold: float,
    floor: float,
    x: torch.Tensor,
    kh: int,
    kw: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' ``(O, C, kh, kw)`` and biases' ``(O,)`` gradients, in one compiled
    pass per image."""
    bands = _bands(window, border, *maps.shape[-2:], maps)
    d_taps, d_bias = native_ops().direct_conv_norm_max_pool_backward(
        grad, index, maxima, maps, statistics, mean_sigma, bands.row_diagonals_t,
        bands.column_diagonals_t, True, mean_threshold, threshold, floor, x.contiguous(), kh, kw,
    )  # fmt: skip
    return untaps(d_taps, kh, kw), d_bias


@_filtered_backward_op.register_fake
def _(grad, index, maxima, maps, statistics, mean_sigma, window, border, mean_threshold,
      threshold, floor, x, kh, kw):  # noqa: ANN001, ANN202  # fmt: skip
    out_maps = maps.shape[1]
    return x.new_empty(out_maps, x.shape[1], kh, kw), x.new_empty(out_maps)


def _filtered_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, window, *options = inputs
    wants = ctx.needs_input_grad  # (grad mode is off here)
    if wants[0] or wants[3]:
        raise ValueError(
            "cnnkit::filter_norm_max_pool gives gradients for the kernels and biases only; "
            "x and the window must not require grad (see filter_norm_max_pool_applies)"
        )
    if not options[-1] and (wants[1] or wants[2]):
        raise ValueError(
            "cnnkit::filter_norm_max_pool needs keep=True to differentiate the kernels or "
            "biases: with keep=False nothing for the backward is kept"
        )
    pooled, maps, index, statistics, mean_sigma = output
    maxima = pooled.detach().clone()  # the pooled maps are free to change in place
    ctx.save_for_backward(x, weight, bias, window, maps, index, maxima, statistics, mean_sigma)
    ctx.options = tuple(options)
    ctx.mark_non_differentiable(maps, index, statistics, mean_sigma)
    ctx.set_materialize_grads(False)


def _filtered_backward(ctx, grad, *unused):  # noqa: ANN001, ANN202
    """The kernels' and biases' gradients: in one compiled pass per image where no graph
    of the backward is recorded, else by the plain formula."""
    none = (None,) * 13
    if grad is None:
        return none
    x, weight, bias, window, maps, index, maxima, statistics, mean_sigma = ctx.saved_tensors
    border, mean_threshold, threshold, floor, pool_kh, pool_kw, sh, sw, _ = ctx.options
    wanted = ctx.needs_input_grad[1:3]  # the kernels', the biases'
    inputs = [t for t, wants in zip((weight, bias), wanted, strict=True) if wants]
    if torch.is_grad_enabled():  # a graph of the backward is recorded
        y = F.conv2d(x, weight, bias)
        norm = _forward_parts(y, window, border, True, mean_threshold, threshold, floor, None)[0]
        out = F.max_pool2d(norm, (pool_kh, pool_kw), (sh, sw))
        grads = list(torch.autograd.grad(out, inputs, grad, create_graph=True))
    else:
        g_weight, d_bias = _filtered_backward_op(
            grad, index, maxima, maps, statistics, mean_sigma, window, border, mean_threshold,
            threshold, floor, x, weight.shape[2], weight.shape[3],
        )  # fmt: skip
        grads = [t for t, wants in zip((g_weight, d_bias), wanted, strict=True) if wants]
    g_weight = grads.pop(0) if wanted[0] else None
    g_bias = grads.pop(0) if wanted[1] else None
    return (None, g_weight, g_bias, *none[3:])


_filtered_op.register_autograd(_filtered_backward, setup_context=_filtered_setup_context)
