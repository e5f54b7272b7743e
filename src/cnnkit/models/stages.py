"""One stage of a built network as a module: its layers in order, run faster where it can.

A :class:`Stage` is an ``nn.Sequential`` of named layers (``filters``, ``nonlin``,
``norm``, ``pool`` ...); its value is always that of the layers applied in order. Where
the fast paths are allowed (:func:`cnnkit.kernels.fast_path_allowed`: not exporting,
tracing or inside a ``torch.func`` transform, ``CNNKIT_FAST`` not 0) it runs so:

- a rectification followed by a contrast normalization is one op
  (:meth:`ContrastNorm.forward_rectified`: the same values and gradients);
- on a CPU, a stage whose filter bank writes large maps -- lecun83's first stage makes
  64 maps of 75x75, 1.4 MB per image -- runs on slices of the batch small enough for
  those maps to stay in the processor's cache while the stage's other layers pass over
  them. Every layer of such a stage works image by image, so the values are those of
  the whole batch at once; the weight gradients are summed slice by slice, which
  rounds differently, within float rounding of the whole-batch sum.

So a forward hook on one of a stage's layers sees each slice of the batch, and the
rectification and normalization of a fused pair run as one call of the normalization's
``forward_rectified`` (their own hooks are not called). To watch every layer on the
whole batch, use :meth:`cnnkit.models.build.Network.intermediates`, or set ``fast =
False`` on the stage.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnkit.kernels import fast_path_allowed
from cnnkit.kernels.table_conv import valid_size
from cnnkit.nn.activation import Rectify, ReLU
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.nn.normalization import ContrastNorm, DivisiveNorm, SubtractiveNorm
from cnnkit.nn.pooling import Pool, PoolSubsample, Subsample

__all__ = ["Stage"]

# A slice of the batch is sized so that the filter bank's output for it fits in about
# this many bytes: lecun83's first stage then runs 4 images at a time, the fastest slice
# here without a gradient and (with 8) with one; single images are far slower in
# training (python -m benchmarks.bench_slices; docs/performance.md).
SLICE_BYTES = 6 * 2**20

# Layers that compute each image on its own (no statistics over the batch).
_PER_IMAGE = (
    FilterBank,
    Rectify,
    ReLU,
    nn.Tanh,
    nn.Identity,
    SubtractiveNorm,
    DivisiveNorm,
    ContrastNorm,
    Pool,
    PoolSubsample,
    Subsample,
)


class Stage(nn.Sequential):
    """The layers of one stage, applied in order (module notes for how it runs fast).

    ``(N, C, H, W)`` or ``(C, H, W)`` in; the last layer's maps out.

    Attributes:
        fast: whether the stage may fuse and slice (default True); False runs
            ``nn.Sequential.forward``.
    """

    fast: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fast and fast_path_allowed(x)):
            return super().forward(x)
        if x.dim() == 4 and x.shape[0] > 1:
            images = _slice_images(self, x)
            if images < x.shape[0]:
                return torch.cat([_run_fused(self, part) for part in x.split(images)])
        return _run_fused(self, x)


def _slice_images(stage: Stage, x: torch.Tensor) -> int:
    """How many images of ``x`` ``(N, C, H, W)`` to run at a time: N unless slicing pays."""
    layers = list(stage.children())
    if x.device.type != "cpu" or any(type(layer) not in _PER_IMAGE for layer in layers):
        return x.shape[0]
    widest = math.prod(x.shape[1:])
    for layer in layers:
        if isinstance(layer, FilterBank):
            stride = (layer.stride,) * 2 if isinstance(layer.stride, int) else layer.stride
            h_out, w_out = valid_size(x.shape[-2:], layer.kernel_size, stride)
            widest = max(widest, layer.out_maps * max(0, h_out) * max(0, w_out))
            break
    return max(1, SLICE_BYTES // (widest * x.element_size()))


def _run_fused(stage: Stage, x: torch.Tensor) -> torch.Tensor:
    """The layers in order, with each ``Rectify`` -> ``ContrastNorm`` pair as one op."""
    layers = list(stage.children())
    index = 0
    while index < len(layers):
        layer = layers[index]
        following = layers[index + 1] if index + 1 < len(layers) else None
        if type(layer) is Rectify and type(following) is ContrastNorm:
            x = following.forward_rectified(x)
            index += 2
        else:
            x = layer(x)
            index += 1
    return x
