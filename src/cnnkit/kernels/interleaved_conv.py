"""A connection-table filter bank on small maps as one registered operator,
``torch.ops.cnnkit.interleaved_table_conv2d`` (its compiled kernel:
``_native/interleaved_conv.cpp``).

The lecture's second filter bank makes 256 maps of 6x6 from 64 maps of 14x14, each
output map summing the 9x9 correlations of 16 input maps a random table names. No two
output maps share their inputs, and a 6x6 map is too small to fill vectors along its
pixels; but every image of a batch uses the same kernels. So the kernel lays out blocks
of images with one pixel of several images in each vector (16 in float32 with AVX-512)
and makes every multiply-add a kernel value times a vector of images. The values are
those of :func:`cnnkit.ops.table_conv2d` at stride 1::

    y[n, o, a, b] = bias[o] + sum over rows r = (i, o) of the table of
                    sum_{p, q} x[n, i, a + p, b + q] weight[r, p, q]

Backward, with ``g`` the gradient of ``y`` (all three compiled)::

    g_x[n, i, a, b] = sum over rows r = (i, o) of sum_{p, q} weight[r, p, q] g[n, o, a - p, b - q]
    g_weight[r, p, q] = sum_{n, a, b} x[n, i, a + p, b + q] g[n, o, a, b]
    g_bias[o] = sum_{n, a, b} g[n, o, a, b]

(``g`` taken as zero outside its maps). Second derivatives go through the plain formula.
"""

from __future__ import annotations

import functools

import torch

from cnnkit._native import native_ops
from cnnkit._validation import is_concrete
from cnnkit.kernels import fast_path_allowed, fold_images, recorded
from cnnkit.tables import dense_from_rows

__all__ = ["interleaved_table_conv2d", "interleaved_table_conv2d_applies"]

# The widest kernels the compiled kernels are built for (kMaxWidth there).
_MAX_WIDTH = 16


def interleaved_table_conv2d_applies(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> bool:
    """Whether :func:`interleaved_table_conv2d` may take ``x`` (N, C, H, W), ``weight``
    (K, kh, kw) and ``bias``: the fast paths are allowed (eagerly), all are float32 or
    float64 CPU tensors of one dtype, ``bias`` is a vector, the kernels fit in the maps and
    are at most 16 wide, and the compiled kernels are built."""
    return (
        fast_path_allowed(x, weight, bias)
        and x.dim() == 4
        and weight.dim() == 3
        and all(t is None or t.device.type == "cpu" for t in (x, weight, bias))
        and x.dtype in (torch.float32, torch.float64)
        and all(t is None or t.dtype == x.dtype for t in (weight, bias))
        and (bias is None or bias.dim() == 1)
        and 1 <= weight.shape[1] <= x.shape[2]
        and 1 <= weight.shape[2] <= min(x.shape[3], _MAX_WIDTH)
        and native_ops() is not None
    )


def interleaved_table_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    table: torch.Tensor,
    out_maps: int,
) -> torch.Tensor:
    """The filter bank of ``table`` ((K, 2) rows of (input map, output map)) at stride 1,
    ``(N, out_maps, H - kh + 1, W - kw + 1)``, for what
    :func:`interleaved_table_conv2d_applies` accepts; ``bias`` is ``(out_maps,)`` or
    ``None``."""
    if is_concrete(x) and not any(recorded(t) for t in (x, weight, bias)):
        return _forward(x, weight, bias, table, out_maps)  # nothing to record
    return torch.ops.cnnkit.interleaved_table_conv2d(x, weight, bias, table, out_maps)


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    table: torch.Tensor,
    out_maps: int,
) -> torch.Tensor:
    ops = native_ops()
    if ops is None or x.device.type != "cpu":
        raise ValueError(
            "cnnkit::interleaved_table_conv2d needs the compiled CPU kernels and x on the "
            f"CPU; got x on {x.device.type} and the kernels {'not ' if ops is None else ''}"
            "built (see interleaved_table_conv2d_applies)"
        )
    return ops.interleaved_conv2d_forward(x, weight, bias, table, out_maps)


_op = torch.library.custom_op("cnnkit::interleaved_table_conv2d", mutates_args=())(_forward)


@_op.register_fake
def _(x, weight, bias, table, out_maps):  # noqa: ANN001, ANN202
    n, _, h, w = x.shape
    return x.new_empty(n, out_maps, h - weight.shape[1] + 1, w - weight.shape[2] + 1)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, _, table, out_maps = inputs
    ctx.save_for_backward(x, weight, table)
    ctx.out_maps = out_maps


def _backward(ctx, grad):  # noqa: ANN001, ANN202
    x, weight, table = ctx.saved_tensors
    wants_x, wants_weight, wants_bias = ctx.needs_input_grad[:3]
    g_x = g_weight = g_bias = None
    if torch.is_grad_enabled():  # a graph of the backward to record: the plain formulas
        dense = dense_from_rows(weight, table, ctx.out_maps, x.shape[1])
        if wants_x:
            g_x = torch.nn.grad.conv2d_input(x.shape, dense, grad)
        if wants_weight:
            g_dense = torch.nn.grad.conv2d_weight(x, dense.shape, grad)
            g_weight = g_dense[table[:, 1], table[:, 0]]
    else:
        ops = native_ops()
        kh, kw = weight.shape[1:]
        if wants_x:
            g_x = ops.interleaved_conv2d_input_grad(grad, weight, table, x.shape[1], *x.shape[2:])
        if wants_weight:
            g_weight = ops.interleaved_conv2d_weight_grad(grad, x, table, kh, kw)
    if wants_bias:
        g_bias = grad.sum((0, 2, 3))
    return g_x, g_weight, g_bias, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


_op.register_vmap(functools.partial(fold_images, _op))
