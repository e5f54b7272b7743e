"""One stage of a built network as a module: its layers in order, run faster where it can.

A :class:`Stage` is an ``nn.Sequential`` of named layers (``filters``, ``nonlin``,
``norm``, ``pool`` ...); its value is always that of the layers applied in order. Where
the fast paths are allowed (:func:`cnnkit.kernels.fast_path_allowed`: not exporting,
tracing or inside a ``torch.func`` transform, ``CNNKIT_FAST`` not 0) it runs so:

- a rectification followed by a contrast normalization is one op
  (:meth:`ContrastNorm.forward_rectified`: the same values and gradients), and with a
  max pooling after them (a :class:`PoolSubsample` or :class:`Pool` without
  coefficients) the three are one op (:meth:`ContrastNorm.forward_rectified_max_pool`), which never
  writes the normalized maps out; where the filter bank before them takes its direct
  method and no derivative is wanted for the stage's input, the four are one op
  (:func:`cnnkit.kernels.norm_pool.filter_norm_max_pool`), which never writes the
  gradient of the filter bank's maps out (nor, with nothing to differentiate, the maps);
- on a CPU, a stage whose layers all work image by image may run on slices of the
  batch: lecun83's first stage makes 64 maps of 75x75, 1.4 MB per image, and a slice of
  fewer images keeps less of them in memory at once and may keep them in the
  processor's cache while the stage's other layers pass over them. How many images a
  slice holds is measured once per machine and shape
  (:func:`cnnkit.kernels.tuning.choose`); with measuring off the slice's maps fill
  about ``SLICE_BYTES``, or ``FUSED_SLICE_BYTES`` where the stage normalizes and pools
  in one op. The values are those of the whole batch at once; the weight
  gradients are summed slice by slice, which rounds differently, within float rounding
  of the whole-batch sum.

So a forward hook on one of a stage's layers sees each slice of the batch, and the
layers of a fused pair or triple run as one call (their own hooks are not called); a
filter bank with hooks (forward or backward) runs on its own, not in the four-layer
op. To watch every layer on the whole batch, use
:meth:`cnnkit.models.build.Network.intermediates`, or set ``fast = False`` on the stage.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnkit._shapes import valid_hw
from cnnkit.kernels import fast_path_allowed, recorded, tuning
from cnnkit.kernels import norm_pool as fast_stage
from cnnkit.kernels.table_conv import auto_method
from cnnkit.nn.activation import Rectify, ReLU
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.nn.normalization import ContrastNorm, DivisiveNorm, SubtractiveNorm
from cnnkit.nn.pooling import Pool, PoolSubsample, Subsample
from cnnkit.tables import dense_weight

__all__ = ["Stage"]

# Where slices are not measured (CNNKIT_TUNE=0), a slice holds about this many bytes of
# the filter bank's output: a few images of lecun83's first stage, a size that fits the
# caches of current processors.
SLICE_BYTES = 6 * 2**20
# A stage that normalizes and pools in one fused op reads each image's maps while they
# are in the cache whatever the slice: its slices need only be large enough that the
# per-call costs of its layers vanish (23 images of lecun83's first stage).
FUSED_SLICE_BYTES = 32 * 2**20

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
            return _run_sliced(self, x, _slice_images(self, x))
        return _run_fused(self, x)


def _slice_images(stage: Stage, x: torch.Tensor) -> int:
    """How many images of ``x`` ``(N, C, H, W)`` to run at a time: N unless slicing pays,
    measured on this machine (module notes)."""
    layers = list(stage.children())
    if x.device.type != "cpu" or any(type(layer) not in _PER_IMAGE for layer in layers):
        return x.shape[0]
    default = _default_slice(layers, x)
    n = x.shape[0]  # candidates: powers of two, the default and the whole batch
    sizes = sorted({min(2**k, n) for k in range(n.bit_length() + 1)} | {default})
    grad = recorded(x) or any(recorded(p) for p in stage.parameters())
    case = (
        f"stage_slice {_signature(layers)} x{tuple(x.shape)} {tuning.layout_name(x)} {x.dtype} "
        f"{'grad' if grad else 'nograd'} threads{torch.get_num_threads()}"
    )
    candidates = {str(size): _slice_trial(stage, x, size, grad) for size in sizes}
    return int(tuning.choose(case, str(default), candidates))


def _default_slice(layers: list[nn.Module], x: torch.Tensor) -> int:
    """About ``SLICE_BYTES`` of the filter bank's output per slice, ``FUSED_SLICE_BYTES``
    when the stage normalizes and pools in one op."""
    widest = math.prod(x.shape[1:])
    for layer in layers:
        if isinstance(layer, FilterBank):
            stride = (layer.stride,) * 2 if isinstance(layer.stride, int) else layer.stride
            fits = all(k <= n for k, n in zip(layer.kernel_size, x.shape[-2:], strict=True))
            if fits:  # else the filter bank itself says what is wrong
                h_out, w_out = valid_hw(x.shape[-2:], layer.kernel_size, stride)
                widest = max(widest, layer.out_maps * h_out * w_out)
            break
    fused = any(
        type(layer) is Rectify and type(norm) is ContrastNorm and _plain_max_pool(pool, None)
        for layer, norm, pool in zip(layers, layers[1:], layers[2:], strict=False)
    )
    budget = FUSED_SLICE_BYTES if fused else SLICE_BYTES
    return min(x.shape[0], max(1, budget // (widest * x.element_size())))


def _signature(layers: list[nn.Module]) -> str:
    """The layers' kinds and settings, as ``print(model)`` names them; a filter bank by
    its sizes and kernel count (describing its table would cost more than the stage's
    own bookkeeping)."""
    parts = []
    for layer in layers:
        if isinstance(layer, FilterBank):
            kh, kw = layer.kernel_size
            settings = (
                f"{layer.in_maps}->{layer.out_maps}, kernel {kh}x{kw}, "
                f"stride {layer.stride}, {len(layer.weight)} kernels"
            )
        else:
            settings = layer.extra_repr()
        parts.append(f"{type(layer).__name__}({settings})")
    return "|".join(parts)


def _slice_trial(stage: Stage, x: torch.Tensor, size: int, grad: bool):  # noqa: ANN202
    """A function that runs ``stage`` once on a synthetic batch shaped and laid out like
    ``x``, in slices of ``size`` images, with the backward (into fresh gradients) when
    ``grad``. The layers' ``forward`` is called directly: their hooks do not see it."""
    synthetic: list[torch.Tensor] = []  # made on the first run: most calls never time

    def run() -> None:
        if not synthetic:
            generator = torch.Generator().manual_seed(0)  # the global one is untouched
            xs = torch.empty_like(x, device="cpu").normal_(generator=generator).to(x.device)
            synthetic.append(xs.requires_grad_(recorded(x)))
        (xs,) = synthetic
        params = [p for p in stage.parameters() if p.requires_grad] if grad else []
        wanted = params + ([xs] if xs.requires_grad else [])
        with torch.set_grad_enabled(grad):
            y = _run_sliced(stage, xs, size, hooks=False)
            if wanted:
                torch.autograd.grad(y, wanted, torch.ones_like(y), allow_unused=True)

    return run


def _run_sliced(stage: Stage, x: torch.Tensor, images: int, hooks: bool = True) -> torch.Tensor:
    if images >= x.shape[0]:
        return _run_fused(stage, x, hooks)
    return torch.cat([_run_fused(stage, part, hooks) for part in x.split(images)])


def _run_fused(stage: Stage, x: torch.Tensor, hooks: bool = True) -> torch.Tensor:
    """The layers in order, with each ``Rectify`` -> ``ContrastNorm`` pair as one op, or
    with a max pooling after them, the three as one op; ``hooks=False`` calls each
    layer's ``forward`` itself, past its hooks."""
    layers = list(stage.children())
    index = 0
    while index < len(layers):
        layer, following, pool = (layers[index : index + 3] + [None, None])[:3]
        whole = _filters_norm_pool(layers[index : index + 4], x, hooks)
        if whole is not None:
            x = whole
            index += 4
        elif type(layer) is Rectify and type(following) is ContrastNorm:
            if _plain_max_pool(pool, x):
                stride = pool.stride if isinstance(pool, PoolSubsample) else (1, 1)
                x = following.forward_rectified_max_pool(x, pool.window, stride)
                index += 3
            else:
                x = following.forward_rectified(x)
                index += 2
        else:
            x = layer(x) if hooks else layer.forward(x)
            index += 1
    return x


def _filters_norm_pool(
    layers: list[nn.Module], x: torch.Tensor, hooks: bool = True
) -> torch.Tensor | None:
    """A filter bank, rectification, contrast normalization and max pooling (``layers``)
    as one op, or ``None`` where that does not apply: a derivative is recorded for ``x``
    or the normalization's window, the filter bank does not take its direct method or
    has hooks to call (``hooks``), or the layers would refuse ``x`` (they then run, and
    say why, one by one)."""
    filters, rectify, norm, pool = (layers + [None] * 4)[:4]
    if not (
        type(filters) is FilterBank
        and not (hooks and _has_hooks(filters))
        and type(rectify) is Rectify
        and type(norm) is ContrastNorm
        and _plain_max_pool(pool, None)
        and x.dim() == 4
        and x.shape[1] == filters.in_maps
        and filters.stride in (1, (1, 1))
        and norm.window.shape[0] == filters.out_maps == (pool.maps or filters.out_maps)
        and norm.border != "reflect"  # which refuses windows larger than the maps
        and not (recorded(x) or recorded(norm.window))
    ):
        return None
    plan = filters._plan()
    if auto_method(x, filters.weight, plan, (1, 1), filters.bias) != "direct":
        return None
    weight = dense_weight(filters.weight, plan, filters.in_maps)
    stride = pool.stride if isinstance(pool, PoolSubsample) else (1, 1)
    if not fast_stage.filter_norm_max_pool_applies(
        x, weight, filters.bias, norm.window, norm.border, pool.window
    ):
        return None
    return fast_stage.filter_norm_max_pool(
        x, weight, filters.bias, norm.window, norm.border, norm.threshold, norm.floor,
        pool.window, stride,
    )  # fmt: skip


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks, forward or backward (its own or global
    ones)."""
    from torch.nn.modules import module as base

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or base._global_forward_hooks
        or base._global_forward_pre_hooks
        or base._global_backward_hooks
        or base._global_backward_pre_hooks
    )


def _plain_max_pool(layer: nn.Module | None, x: torch.Tensor | None) -> bool:
    """Whether ``layer`` is a max :class:`Pool` or :class:`PoolSubsample` without
    coefficients that takes ``x``'s maps, when given (else it runs, and checks, on its
    own)."""
    return (
        type(layer) in (Pool, PoolSubsample)
        and layer.kind == "max"
        and layer.weight is None
        and (x is None or layer.maps in (None, x.shape[-3]))
    )
