"""How ``Network.forward`` runs a stage: fused where it can be, a few images at a time
where the maps are large.

- A rectification followed by a contrast normalization runs as one op
  (:meth:`ContrastNorm.forward_rectified`: the same values and gradients).
- On a CPU, a stage whose filter bank writes large maps -- lecun83's first stage makes
  64 maps of 75x75, 1.4 MB per image -- runs on slices of the batch small enough for
  those maps to stay in the processor's cache while the stage's other layers pass
  over them (a batch of 64 would be 92 MB, read from memory by every pass). Every
  layer of such a stage works image by image, so the values are those of the whole
  batch at once; the weight gradients are summed slice by slice, which rounds
  differently, within float rounding of the whole-batch sum.

A hook of any kind -- on the stage, on one of its layers, or a global module hook --
turns both off: a hooked stage runs as ``stage(x)``, and a stage with a hooked layer
runs layer by layer on the whole batch, so that every hook sees what a plain
``stage(x)`` would show it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from cnnkit.nn.activation import Rectify, ReLU
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.nn.normalization import ContrastNorm, DivisiveNorm, SubtractiveNorm
from cnnkit.nn.pooling import Pool, PoolSubsample, Subsample

__all__ = ["run_stage"]

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


def run_stage(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``stage(x)`` for ``x`` of ``(N, C, H, W)`` or ``(C, H, W)``: fused, and in slices of
    the batch when its maps are large (module notes); the values of ``stage(x)``, to
    within rounding."""
    if _hooked(stage):
        return stage(x)
    if x.dim() == 4 and x.shape[0] > 1:
        images = _slice_images(stage, x)
        if images < x.shape[0]:
            return torch.cat([_run_fused(stage, part) for part in x.split(images)])
    return _run_fused(stage, x)


def _slice_images(stage: nn.Sequential, x: torch.Tensor) -> int:
    """How many images of ``x`` ``(N, C, H, W)`` to run at a time: N unless slicing pays."""
    layers = list(stage.children())
    if x.device.type != "cpu" or any(
        type(layer) not in _PER_IMAGE or _hooked(layer) for layer in layers
    ):
        return x.shape[0]
    widest = math.prod(x.shape[1:])
    for layer in layers:
        if isinstance(layer, FilterBank):
            widest = max(widest, layer.out_maps * _valid_area(layer, x.shape[-2:]))
            break
    return max(1, SLICE_BYTES // (widest * x.element_size()))


def _valid_area(bank: FilterBank, size: torch.Size) -> int:
    (kh, kw), stride = bank.kernel_size, bank.stride
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    return max(0, (size[0] - kh) // sh + 1) * max(0, (size[1] - kw) // sw + 1)


def _hooked(layer: nn.Module) -> bool:
    """Whether a hook may watch ``layer`` run: its own hooks of any kind, or global ones."""
    hooks = (
        layer._forward_hooks,
        layer._forward_pre_hooks,
        layer._backward_hooks,
        layer._backward_pre_hooks,
    )
    watched = (
        module_hooks._global_forward_hooks,
        module_hooks._global_forward_pre_hooks,
        module_hooks._global_backward_hooks,
        module_hooks._global_backward_pre_hooks,
    )
    return any(hooks) or any(watched)


def _run_fused(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``stage(x)``, with each ``Rectify`` -> ``ContrastNorm`` pair as one fused op."""
    layers = list(stage.children())
    index = 0
    while index < len(layers):
        layer = layers[index]
        following = layers[index + 1] if index + 1 < len(layers) else None
        if (
            type(layer) is Rectify
            and type(following) is ContrastNorm
            and not (_hooked(layer) or _hooked(following))
        ):
            x = following.forward_rectified(x)
            index += 2
        else:
            x = layer(x)
            index += 1
    return x
