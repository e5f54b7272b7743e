"""A filter bank with few input maps as one registered operator,
``torch.ops.cnnkit.direct_conv2d`` (its compiled kernel: ``_native/direct_conv.cpp``).

The lecture's first filter bank makes 64 maps of 75x75 from one 83x83 image with 9x9
kernels: 81 multiply-adds per output value and no sum over input maps for a library's
convolution to spread over its vector lanes. This operator computes the same valid
correlation at stride 1 as ``F.conv2d(x, weight, bias)``::

    y[n, o, i, j] = bias[o] + sum_{c, u, v} x[n, c, i + u, j + v] weight[o, c, u, v]

with the outputs of a few pixels in registers for every tap (vectors along the output
maps, which is why it writes ``y`` channels-last and needs the output maps to fill whole
vectors). Backward, with ``g`` the gradient of ``y``::

    g_weight[o, c, u, v] = sum_{n, i, j} x[n, c, i + u, j + v] g[n, o, i, j]
    g_bias[o] = sum_{n, i, j} g[n, o, i, j]         (both compiled, in one pass over g)
    g_x = the full convolution of g with weight     (the library's transposed convolution)

Second derivatives go through the plain formula (``torch.nn.grad``).
"""

from __future__ import annotations

import functools

import torch

from cnnkit._native import native_ops
from cnnkit._validation import is_concrete
from cnnkit.kernels import fast_path_allowed, fold_images, recorded

__all__ = ["direct_conv2d", "direct_conv2d_applies"]

# The compiled kernel's vectors hold up to 64 bytes: output maps in multiples of 64 bytes
# fill them on every instruction set it is built for.
_VECTOR_BYTES = 64


def direct_conv2d_applies(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> bool:
    """Whether :func:`direct_conv2d` may take ``x`` (N, C, H, W) and ``weight``
    (O, C, kh, kw): the fast paths are allowed (eagerly), both are float32 or float64 CPU
    tensors of one dtype, the kernels fit in the maps, ``O`` output maps fill whole
    vectors (a multiple of 16 in float32, 8 in float64) and the compiled kernels are
    built."""
    return (
        fast_path_allowed(x, weight, bias)
        and x.dim() == 4
        and weight.dim() == 4
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and (
            bias is None
            or (
                bias.dtype == x.dtype
                and bias.device.type == "cpu"
                and bias.shape == (weight.shape[0],)
            )
        )
        and weight.shape[1] == x.shape[1]
        and all(1 <= k <= n for k, n in zip(weight.shape[2:], x.shape[2:], strict=True))
        and weight.shape[0] % (_VECTOR_BYTES // x.element_size()) == 0
        and native_ops() is not None
    )


def direct_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` at stride 1, as ``(N, O, H - kh + 1, W - kw + 1)``
    channels-last maps, for what :func:`direct_conv2d_applies` accepts."""
    if is_concrete(x) and not any(recorded(t) for t in (x, weight, bias)):
        return _forward(x, weight, bias)  # past the dispatcher: nothing to record
    return torch.ops.cnnkit.direct_conv2d(x, weight, bias)


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    ops = native_ops()
    if ops is None or x.device.type != "cpu":
        raise ValueError(
            "cnnkit::direct_conv2d needs the compiled CPU kernels and x on the CPU; got x on "
            f"{x.device.type} and the kernels {'not ' if ops is None else ''}built "
            "(see direct_conv2d_applies)"
        )
    kh, kw = weight.shape[2:]
    return ops.direct_conv2d_forward(x.contiguous(), taps(weight), bias, kh, kw)


def taps(weight: torch.Tensor) -> torch.Tensor:
    """``(C kh kw, O)``: the kernels of ``weight`` (O, C, kh, kw) as the compiled kernel
    reads them, one row of output maps per tap."""
    return weight.permute(1, 2, 3, 0).reshape(-1, weight.shape[0]).contiguous()


def untaps(rows: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``(O, C, kh, kw)`` from rows laid out as :func:`taps` gives them, ``(C kh kw, O)``."""
    return rows.view(-1, kh, kw, rows.shape[1]).permute(3, 0, 1, 2).contiguous()


_op = torch.library.custom_op("cnnkit::direct_conv2d", mutates_args=())(_forward)


@_op.register_fake
def _(x, weight, bias):  # noqa: ANN001, ANN202
    n, _, h, w = x.shape
    out_maps, _, kh, kw = weight.shape
    shape = (n, out_maps, h - kh + 1, w - kw + 1)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):  # noqa: ANN001, ANN202
    x, weight = ctx.saved_tensors
    wants_x, wants_weight, wants_bias = ctx.needs_input_grad  # False for a bias of None
    g_x = g_weight = g_bias = None
    if wants_x:
        g_x = torch.nn.grad.conv2d_input(x.shape, weight, grad)
    # With a graph of the backward to record, the plain formulas; else the compiled pass.
    compiled = wants_weight and not torch.is_grad_enabled()
    if compiled:
        kh, kw = weight.shape[2:]
        d_taps, sums = native_ops().direct_conv2d_weight_grad(grad, x.contiguous(), kh, kw)
        g_weight = untaps(d_taps, kh, kw)
    elif wants_weight:
        g_weight = torch.nn.grad.conv2d_weight(x, weight.shape, grad)
    if wants_bias:
        g_bias = sums if compiled else grad.sum((0, 2, 3))
    return g_x, g_weight, g_bias


_op.register_autograd(_backward, setup_context=_setup_context)


_op.register_vmap(functools.partial(fold_images, _op))
