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
- ``"lp"``: ``(sum_j x_j^p)^(1/p)``, exactly what ``torch.nn.functional.lp_pool2d`` computes
  (no absolute value is taken: see ``docs/pooling.md`` for what signed input gives).

Optional per-map ``weight`` and ``bias`` (each of shape ``(C,)``) turn the pooled value ``y``
into ``weight[c] * y + bias[c]`` (Torch7's ``SpatialSubSampling``, LeNet-5's S-layers).
"""

from __future__ import annotations

import collections
import threading

import torch
import torch.nn.functional as F

from cnnkit._validation import check_choice, check_maps, check_positive_float, pair
from cnnkit.ops._derived import derivative_recorded, has_tangent

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
    zero gradient at a window whose ``sum x^p`` is 0 (no NaN) for ``p >= 1``.
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
    if kind == "max":
        out = _max_pool(x, (k_h, k_w), (s_h, s_w))
    elif kind == "avg":
        out = F.avg_pool2d(x, (k_h, k_w), (s_h, s_w))
    else:
        out = _LpPool.apply(x, p, (k_h, k_w), (s_h, s_w))
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

    The values are bit-identical to pool-then-subsample for ``"max"``, ``"avg"`` and
    ``"lp"`` with ``p`` of 0.5, 1 or 2; for other ``p`` the final root of the window sum
    comes from ``torch.pow``, whose vectorised and scalar code paths may round differently,
    so the two can differ in the last bit. For ``"max"`` the gradient also goes to the same element.

    Args and weight/bias: as :func:`pool2d`, with ``stride`` the subsampling stride.

    Returns:
        ``(N, C, H_out, W_out)`` (or unbatched) with ``H_out = floor((H - k_h) / s_h) + 1``.
    """
    return pool2d(x, kind, window, stride, p, weight=weight, bias=bias)


# From this many input elements on, max pooling on a CPU runs on a channels-last copy
# (below it, the copy costs more than it saves).
_CHANNELS_LAST_MIN_NUMEL = 4096


def _max_pool(x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """``F.max_pool2d`` values and gradients. On a CPU: without a derivative to record, by
    blocks when the window is a whole number of strides and the stride is 2 or more;
    otherwise ``F.max_pool2d`` for channels-last maps, and for contiguous ones a
    channels-last copy of ``x``, whose kernel is several times faster."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    small = x.numel() < _CHANNELS_LAST_MIN_NUMEL
    if x.device.type != "cpu" or small or has_tangent(x):
        return F.max_pool2d(x, window, stride)  # forward mode: its own derivative rule
    tiled = all(s > 1 and k % s == 0 for k, s in zip(window, stride, strict=True))
    if tiled and (x.is_contiguous() or channels_last) and not derivative_recorded(x):
        return _block_max_pool(x, window, stride)
    if channels_last:
        return F.max_pool2d(x, window, stride)
    batch = x.unsqueeze(0) if x.dim() == 3 else x
    out = _ChannelsLastMaxPool.apply(batch, window, stride)
    return out.squeeze(0) if x.dim() == 3 else out


def _block_max_pool(
    x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Max pooling of contiguous ``(..., H, W)`` maps, or channels-last ``(N, C, H, W)``
    ones (returned channels-last), whose window is ``m`` strides long on each axis, one
    axis at a time: the maximum of every ``s``-row block (a
    reduction over a middle axis, which runs along whole rows), then the running maximum
    of ``m`` neighbouring blocks; then the same along the columns of that smaller
    result. Values only (a maximum does not depend on the order it is taken in), so the
    same numbers as ``F.max_pool2d``, NaN included (where +0 and -0 tie, either may come
    out); no indices for a backward.
    """
    channels_last = not x.is_contiguous()  # then (N, C, H, W) with channels-last memory
    if channels_last:  # pool the (N, H, W, C) view, whose memory is contiguous
        x = x.permute(0, 2, 3, 1)
    first = 1 if channels_last else x.dim() - 2  # the row axis; columns follow it
    for dim, k, s in ((first, window[0], stride[0]), (first + 1, window[1], stride[1])):
        out = (x.shape[dim] - k) // s + 1
        blocks = out + k // s - 1  # window j covers blocks j .. j + k/s - 1
        split = (*x.shape[:dim], blocks, s, *x.shape[dim + 1 :])
        block_max = x.narrow(dim, 0, blocks * s).reshape(split).amax(dim=dim + 1)
        x = block_max.narrow(dim, 0, out)
        for shift in range(1, k // s):
            x = torch.maximum(x, block_max.narrow(dim, shift, out))
    if channels_last:
        return x.contiguous().permute(0, 3, 1, 2)  # channels-last, like the input
    return x.contiguous()


_scratch = threading.local()  # per thread: channels-last buffers by (shape, dtype, device)
_SCRATCH_BUFFERS = 4  # one per pooling layer of a network, and an odd last batch


def _channels_last_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` copied into a channels-last buffer that the calling thread reuses for inputs
    of the same shape, dtype and device (the last few kinds are kept). A fresh map-sized
    buffer at every call would cost more than the copy (its pages are faulted in on
    first touch) unless the allocator keeps large blocks (``tune_runtime``). The copy is
    scratch: nothing returned or saved refers to it.
    """
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = collections.OrderedDict()
    key = (tuple(x.shape), x.dtype, x.device)
    buffer = buffers.pop(key, None)
    if buffer is None:
        with torch.inference_mode(False):  # usable in and out of inference mode
            buffer = torch.empty_like(x, memory_format=torch.channels_last)
        while len(buffers) >= _SCRATCH_BUFFERS:
            buffers.popitem(last=False)
    buffers[key] = buffer  # now the most recently used
    return buffer.copy_(x)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max pooling of ``(N, C, H, W)`` computed in channels-last layout, returned contiguous.

    Forward: the values and, per window, the flat ``H * W`` index of its first maximal
    element in row-major order (the kernel for either layout picks the same one).
    Backward: each window's gradient is added at that index of a zero ``(N, C, H * W)``
    gradient, directly in the contiguous layout (no conversion back). The backward is
    made of differentiable operations, so second derivatives work.
    """

    @staticmethod
    def forward(ctx, x, window, stride):
        out, index = F.max_pool2d(_channels_last_copy(x), window, stride, return_indices=True)
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad_x = grad.new_zeros(n, c, h * w)
        grad_x.scatter_add_(2, index.reshape(n, c, -1), grad.reshape(n, c, -1))
        return grad_x.view(n, c, h, w), None, None


class _LpPool(torch.autograd.Function):
    """``F.lp_pool2d``'s forward with a hand-written backward: two input-sized tensors, not five.

    ``y = S^(1/p)`` with ``S = sum_window x^p``, so ``dy/dx_j = y^(1-p) x_j^(p-1)``; the sum
    over the windows that hold ``x_j`` is ``avg_pool2d``'s backward applied to
    ``area * g * y^(1-p)``. Where ``S = 0`` the gradient is set to 0, as PyTorch does.
    The backward is built from differentiable ops, so second derivatives work too.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, p: float, window: tuple[int, int], stride: tuple[int, int]
    ) -> torch.Tensor:
        area = window[0] * window[1]
        y = F.avg_pool2d(x.pow(p), window, stride).mul_(area).pow_(1.0 / p)
        ctx.save_for_backward(x, y)
        ctx.p, ctx.window, ctx.stride = p, window, stride
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        p, window, stride = ctx.p, ctx.window, ctx.stride
        area = window[0] * window[1]
        per_window = torch.where(y == 0, 0.0, grad * y.pow(1.0 - p)) * area  # like y's shape
        grad_x = torch.ops.aten.avg_pool2d_backward(
            per_window, x, window, stride, (0, 0), False, True, None
        )  # like x's shape: sum over windows of per_window / area
        if p != 1.0:
            factor = x if p == 2.0 else x.pow(p - 1.0)
            # In place unless a graph of this backward is being recorded (create_graph=True).
            grad_x = grad_x * factor if torch.is_grad_enabled() else grad_x.mul_(factor)
        return grad_x, None, None, None


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
