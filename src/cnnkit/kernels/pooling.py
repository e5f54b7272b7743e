"""Faster CPU max pooling: the same values and gradients as ``F.max_pool2d``.

- Without a derivative to record, a window that is a whole number of strides (the
  lecture's fused 10x10 pooling at stride 5) is pooled by blocks: the maximum of every
  ``s``-row block, then the running maximum of ``k / s`` neighbouring blocks, then the
  same along the columns -- a few reductions along whole rows instead of ``k_h k_w``
  comparisons per output.
- Otherwise float32 and float64 maps are pooled by the compiled kernel of
  :mod:`cnnkit._native`: with a derivative to record through the registered operator
  ``torch.ops.cnnkit.max_pool2d`` (the values and the flat index of each window's first
  maximum, as ``F.max_pool2d(return_indices=True)``; its backward adds each window's
  gradient at that index, directly in the maps' own layout), without one by the kernel
  itself;
- where the kernel is not built, or for other dtypes, maps are pooled on a
  channels-last copy, whose library kernel is several times faster, with a scatter for
  the backward. Channels-last maps go to the library's kernel directly.

The operator has no forward-mode rule: the fast path is never taken with a tangent
(:func:`cnnkit.kernels.fast_path_allowed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnkit._native import native_ops
from cnnkit.kernels import fast_path_allowed, recorded

__all__ = ["max_pool", "max_pool_applies"]

# Below this many input elements the channels-last copy costs more than it saves.
_CHANNELS_LAST_MIN_NUMEL = 4096


def max_pool_applies(x: torch.Tensor) -> bool:
    """Whether :func:`max_pool` may pool ``x``: a CPU tensor of 4096 elements or more,
    where the fast paths are allowed."""
    return fast_path_allowed(x) and x.device.type == "cpu" and x.numel() >= _CHANNELS_LAST_MIN_NUMEL


def max_pool(x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """``F.max_pool2d(x, window, stride)`` for ``x`` ``(N, C, H, W)`` or ``(C, H, W)``."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    tiled = all(s > 1 and k % s == 0 for k, s in zip(window, stride, strict=True))
    if tiled and (x.is_contiguous() or channels_last) and not recorded(x):
        return _block_max_pool(x, window, stride)
    if channels_last:
        return F.max_pool2d(x, window, stride)
    batch = x.unsqueeze(0) if x.dim() == 3 else x  # (N, C, H, W)
    if x.dtype in (torch.float32, torch.float64) and native_ops() is not None:
        # nothing to differentiate: the kernel itself, without the operator's dispatch
        pool = native_ops().max_pool_forward if not recorded(x) else torch.ops.cnnkit.max_pool2d
        out, _ = pool(batch.contiguous(), *window, *stride)
    else:
        out, _ = _ChannelsLastMaxPool.apply(batch, window, stride)
    return out.squeeze(0) if x.dim() == 3 else out


def _block_max_pool(
    x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Max pooling by blocks (module notes) of contiguous ``(..., H, W)`` maps, or of
    channels-last ``(N, C, H, W)`` ones (returned channels-last). A maximum does not
    depend on the order it is taken in, so the values are ``F.max_pool2d``'s, NaN
    included (where +0 and -0 tie, either may come out); no indices for a backward."""
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


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max pooling of ``(N, C, H, W)`` computed in channels-last layout, returned contiguous.

    Forward: the values and, per window, the flat ``H * W`` index of its first maximal
    element in row-major order (the kernel for either layout picks the same one).
    Backward: each window's gradient is added at that index of a zero ``(N, C, H * W)``
    gradient, directly in the contiguous layout. The backward is made of differentiable
    operations, so second derivatives work.
    """

    @staticmethod
    def forward(x, window, stride):  # noqa: ANN001, ANN205
        copy = x.contiguous(memory_format=torch.channels_last)
        out, index = F.max_pool2d(copy, window, stride, return_indices=True)
        return out.contiguous(), index

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, _, _ = inputs
        _, index = output
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        ctx.mark_non_differentiable(index)

    @staticmethod
    def backward(ctx, grad, unused):  # noqa: ANN001, ANN205
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad_x = grad.new_zeros(n, c, h * w)
        grad_x.scatter_add_(2, index.reshape(n, c, -1), grad.reshape(n, c, -1))
        return grad_x.view(n, c, h, w), None, None


# ---------------------------------------------------------------------------------------
# The compiled kernel as a registered operator
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("cnnkit::max_pool2d", mutates_args=())
def _max_pool_op(
    x: torch.Tensor, kh: int, kw: int, sh: int, sw: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d(x, (kh, kw), (sh, sw), return_indices=True)`` for contiguous
    float32/float64 ``x`` ``(N, C, H, W)`` on a CPU, by the compiled kernel."""
    return native_ops().max_pool_forward(x, kh, kw, sh, sw)


@_max_pool_op.register_fake
def _(x, kh, kw, sh, sw):  # noqa: ANN001, ANN202
    n, c, h, w = x.shape
    shape = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("cnnkit::max_pool2d_backward", mutates_args=())
def _max_pool_backward_op(grad: torch.Tensor, index: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(N, C, h, w)`` zeros with each window's gradient added at its ``index``."""
    return native_ops().max_pool_backward(grad, index, h, w)


@_max_pool_backward_op.register_fake
def _(grad, index, h, w):  # noqa: ANN001, ANN202
    return grad.new_empty(*grad.shape[:2], h, w)


def _pool_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x = inputs[0]
    _, index = output
    ctx.save_for_backward(index)
    ctx.size = x.shape[-2:]
    ctx.mark_non_differentiable(index)
    ctx.set_materialize_grads(False)  # no zeros made up for the indices' gradient


def _pool_backward(ctx, grad, unused):  # noqa: ANN001, ANN202
    if grad is None:  # the pooled maps are not used by what is differentiated
        return None, None, None, None, None
    (index,) = ctx.saved_tensors
    return _max_pool_backward_op(grad, index, *ctx.size), None, None, None, None


def _scatter_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    _, index, _, _ = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad_x):  # noqa: ANN001, ANN202
    """The backward's own derivative: each window takes the gradient at its index."""
    (index,) = ctx.saved_tensors
    n, c = index.shape[:2]
    picked = grad_x.reshape(n, c, -1).gather(2, index.reshape(n, c, -1))
    return picked.view_as(index).to(grad_x.dtype), None, None, None


_max_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)
_max_pool_backward_op.register_autograd(_scatter_backward, setup_context=_scatter_setup_context)


@_max_pool_op.register_vmap
def _(info, in_dims, x, kh, kw, sh, sw):  # noqa: ANN001, ANN202
    """Each map is pooled on its own: fold the mapped dimension into the batch."""
    x = x.movedim(in_dims[0], 0)  # (B, N, C, H, W)
    b, n = x.shape[:2]
    outs = _max_pool_op(x.reshape(b * n, *x.shape[2:]).contiguous(), kh, kw, sh, sw)
    return tuple(out.view(b, n, *out.shape[1:]) for out in outs), (0, 0)
