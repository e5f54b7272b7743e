"""cnnkit's speed work, kept apart from the math in :mod:`cnnkit.ops`.

Each op in :mod:`cnnkit.ops` is written first as plain torch operations that follow its
formula; that plain path is what ``torch.export``, ONNX, ``torch.func``, ``vmap`` and a
reader see. An op with a faster way asks :func:`fast_path_allowed` once, at one place,
and then calls one function of this package:

- :mod:`cnnkit.kernels.normalization` -- local contrast normalization as the registered
  operator ``torch.ops.cnnkit.contrast_norm`` (the compiled CPU kernel of
  :mod:`cnnkit._native`, or banded matrix products where it is not built), with its
  shape function, derivative and a batching rule that falls back to the plain path;
- :mod:`cnnkit.kernels.norm_pool` -- a rectification, contrast normalization and max
  pooling in a row as the registered operator ``torch.ops.cnnkit.contrast_norm_max_pool``,
  which never writes the normalized maps out; and with the filter bank before them as
  ``torch.ops.cnnkit.filter_norm_max_pool``, image by image through the cache;
- :mod:`cnnkit.kernels.table_conv` -- the connection-table filter bank's other exact
  methods (direct, interleaved, unfold, Fourier, depthwise) and the choice among them;
- :mod:`cnnkit.kernels.interleaved_conv` -- a connection-table filter bank as the
  registered operator ``torch.ops.cnnkit.interleaved_table_conv2d`` over a compiled
  kernel with a pixel of several images in each vector;
- :mod:`cnnkit.kernels.direct_conv` -- a filter bank with few input maps (the lecture's
  first) as the registered operator ``torch.ops.cnnkit.direct_conv2d`` over a compiled
  kernel that keeps a block of pixels' outputs in registers;
- :mod:`cnnkit.kernels.pooling` -- max pooling by blocks, or by the compiled kernel as
  the registered operator ``torch.ops.cnnkit.max_pool2d``;
- :mod:`cnnkit.kernels.tuning` -- choices that depend on the machine (a table's method,
  a stage's slice), timed once per machine and kept in a file.

A fast path never changes the function: the tests hold each one to the plain path,
forward and backward. ``CNNKIT_FAST=0`` in the environment turns every fast path off;
``CNNKIT_NATIVE=0`` turns off only the compiled kernel.
"""

from __future__ import annotations

import os

import torch
import torch.autograd.forward_ad as forward_ad

from cnnkit._validation import is_ordinary

__all__ = ["fast_enabled", "fast_path_allowed", "fold_images", "has_tangent", "recorded"]


def fast_enabled() -> bool:
    """Whether fast paths may run at all: not turned off by ``CNNKIT_FAST=0``."""
    return os.environ.get("CNNKIT_FAST", "1").strip() != "0"


def has_tangent(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` carries a forward-mode tangent at the current level."""
    return forward_ad.unpack_dual(tensor).tangent is not None


def recorded(tensor: torch.Tensor | None) -> bool:
    """Whether autograd records a derivative of ``tensor`` (grad mode on, requires grad)."""
    return tensor is not None and torch.is_grad_enabled() and tensor.requires_grad


def fast_path_allowed(*tensors: torch.Tensor | None, traced: bool = False) -> bool:
    """The one eligibility check in front of every fast path.

    A fast path may run when fast paths are on, nothing is being exported or traced by
    ``torch.jit.trace``, and every tensor given is an ordinary tensor on a real device:
    not a fake or other subclass, not inside a ``torch.func`` transform (``vmap``,
    ``grad``), without a forward-mode tangent, and not under ``torch.autocast``.
    ``traced=True`` marks a path that ``torch.compile`` may trace through (a registered
    operator); other fast paths are plain Python over torch ops, and under
    ``torch.compile`` the compiler gets the plain path to optimise instead.
    """
    if not fast_enabled() or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    if torch.compiler.is_compiling():  # the tensors are fake ones standing for real ones
        return traced and not any(t is not None and has_tangent(t) for t in tensors)
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return traced  # shapes are being propagated: a registered operator has its own
    for tensor in tensors:
        if tensor is None:
            continue
        if not is_ordinary(tensor) or has_tangent(tensor):
            return False
        if torch.is_autocast_enabled(tensor.device.type):  # the plain ops have cast rules
            return False
    return True


def fold_images(op, info, in_dims, x, *rest):  # noqa: ANN001, ANN002, ANN201
    """The batching rule (``register_vmap``) of an operator that works on each image of
    ``x`` (its first argument, ``(N, ...)``) on its own: when only ``x`` is mapped, fold
    the mapped dimension into the images and make one call; when another tensor
    argument is mapped too, one call per entry. Works for one output or a tuple."""
    if all(dim is None for dim in in_dims[1:]):
        x = x.movedim(in_dims[0], 0)  # (B, N, ...)
        b, n = x.shape[:2]
        outs = op(x.reshape(b * n, *x.shape[2:]), *rest)
        if isinstance(outs, torch.Tensor):
            return outs.view(b, n, *outs.shape[1:]), 0
        return tuple(out.view(b, n, *out.shape[1:]) for out in outs), (0,) * len(outs)

    def entry(arg, dim, i):  # noqa: ANN001, ANN202
        return arg if dim is None else arg.select(dim, i)

    outs = [
        op(*(entry(arg, dim, i) for arg, dim in zip((x, *rest), in_dims, strict=True)))
        for i in range(info.batch_size)
    ]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
    return stacked, (0,) * len(stacked)
