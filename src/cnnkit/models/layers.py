"""A spec's stages as named layers: the one list that ``build`` makes modules of and
``analysis`` counts.

Each stage is ``filter bank -> non-linearities -> normalization -> pooling``, and its
layers are named

- ``filters``;
- ``nonlin`` for one non-linearity, ``nonlin1``, ``nonlin2`` ... for several (``"none"``
  makes no layer);
- ``norm``;
- ``pool``, then ``subsample`` when pooling is not fused, then ``pool_act`` for a
  ``tanh`` after a trainable pooling.

The fused-pooling rule: a pooling at stride 1, or one with ``fused = true``, is one layer
``pool`` evaluated only at the points subsampling keeps (its :attr:`Layer.stride` is the
spec's stride); any other is ``pool`` at stride 1 followed by ``subsample``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit._shapes import valid_size
from cnnkit.models.spec import ArchitectureSpec, FilterBankSpec, NormSpec, PoolSpec, StageSpec

__all__ = ["Layer", "layers_of_stage", "stage_layers"]

KINDS = ("filters", "nonlinearity", "norm", "pool", "subsample", "pool_activation")


@dataclass(frozen=True)
class Layer:
    """One layer of a stage: its name, what it is and the ``(maps, height, width)`` it maps.

    ``kind`` is one of ``KINDS``; ``part`` is the spec it comes from (the
    :class:`FilterBankSpec`, the non-linearity's name, the :class:`NormSpec`, the
    :class:`PoolSpec` of ``pool``, ``subsample`` and ``pool_act``). ``stride`` is the step
    between the positions the layer computes: a ``pool`` with ``stride > 1`` is fused with
    its subsampling; a ``subsample`` has the pooling's stride; every other layer, 1.
    """

    stage: int
    name: str
    kind: str
    part: FilterBankSpec | NormSpec | PoolSpec | str
    input: tuple[int, int, int]
    output: tuple[int, int, int]
    stride: int = 1

    @property
    def path(self) -> str:
        """The layer's name in a built network: ``"stage1.filters"``, ..."""
        return f"stage{self.stage}.{self.name}"


def layers_of_stage(
    stage: StageSpec, in_maps: int, input_hw: tuple[int, int], number: int = 1
) -> tuple[Layer, ...]:
    """The named layers of stage ``number`` reading ``in_maps`` maps of ``input_hw``.

    The spec's checks (a kernel or window that fits) are :class:`ArchitectureSpec`'s;
    here the shapes are only computed.
    """
    bank = stage.filters
    maps, (height, width) = bank.maps, input_hw
    shape = (maps, valid_size(height, bank.kernel), valid_size(width, bank.kernel))
    layers = [Layer(number, "filters", "filters", bank, (in_maps, *input_hw), shape)]
    active = [name for name in stage.nonlinearity if name != "none"]
    for index, name in enumerate(active, start=1):
        label = f"nonlin{index}" if len(active) > 1 else "nonlin"
        layers.append(Layer(number, label, "nonlinearity", name, shape, shape))
    if stage.norm is not None:
        layers.append(Layer(number, "norm", "norm", stage.norm, shape, shape))
    pool = stage.pool
    if pool is not None:
        _, h, w = shape
        pooled = (
            maps,
            valid_size(h, pool.window, pool.stride),
            valid_size(w, pool.window, pool.stride),
        )
        if pool.fused or pool.stride == 1:
            layers.append(Layer(number, "pool", "pool", pool, shape, pooled, pool.stride))
        else:
            full = (maps, valid_size(h, pool.window), valid_size(w, pool.window))
            layers.append(Layer(number, "pool", "pool", pool, shape, full))
            layers.append(Layer(number, "subsample", "subsample", pool, full, pooled, pool.stride))
        if pool.activation == "tanh":
            layers.append(Layer(number, "pool_act", "pool_activation", pool, pooled, pooled))
    return tuple(layers)


def stage_layers(spec: ArchitectureSpec) -> tuple[tuple[Layer, ...], ...]:
    """Every stage of ``spec`` as its named layers, in order (one tuple per stage)."""
    result = []
    maps, hw = spec.input.maps, (spec.input.height, spec.input.width)
    for number, stage in enumerate(spec.stages, start=1):
        layers = layers_of_stage(stage, maps, hw, number)
        result.append(layers)
        maps, hw = layers[-1].output[0], layers[-1].output[1:]
    return tuple(result)
