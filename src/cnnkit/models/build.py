"""``build(spec)``: turn an :class:`ArchitectureSpec` into a ``torch.nn.Module``.

Layers get stable names a reader can use to pull feature maps: ``stage1.filters``,
``stage1.nonlin`` (``nonlin1``, ``nonlin2`` ... when there are several), ``stage1.norm``,
``stage1.pool`` (and ``stage1.subsample`` when pooling is not fused), ``stage1.pool_act``,
then ``classifier``; :func:`cnnkit.models.layers.stage_layers` gives them, and the
summary of :mod:`cnnkit.analysis` counts the same list.

``Network.forward`` is what ``print(model)`` shows: each :class:`~cnnkit.models.stages.Stage`
in order, then the classifier. A stage fuses a rectification into the contrast
normalization after it (and a max pooling after both into the same op) and, on a CPU,
runs large maps in slices of the batch (same values; :mod:`cnnkit.models.stages`);
``intermediates`` runs every layer on its own.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cnnkit import tables, tying
from cnnkit.models.layers import Layer, layers_of_stage, stage_layers
from cnnkit.models.spec import ArchitectureSpec, FilterBankSpec, NormSpec, StageSpec
from cnnkit.models.stages import Stage
from cnnkit.nn.activation import Rectify, ReLU
from cnnkit.nn.classifier import Classifier
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.nn.locally_connected import LocallyConnected2d
from cnnkit.nn.normalization import ContrastNorm, DivisiveNorm, SubtractiveNorm
from cnnkit.nn.pooling import Pool, PoolSubsample, Subsample


class Network(nn.Module):
    """A built multi-stage network; ``spec`` is the architecture it was built from.

    Input ``(N, maps, H, W)`` as the spec's input says; output ``(N, classes)`` logits.
    """

    def __init__(self, spec: ArchitectureSpec, stages: list[Stage], classifier: Classifier):
        super().__init__()
        self.spec = spec
        for number, stage in enumerate(stages, start=1):
            self.add_module(f"stage{number}", stage)
        self.classifier = classifier
        banks = self.untied_banks if spec.weight_sharing == "averaged" else []
        self._ties = tying.convolution_groups(*banks).renamed(self) if banks else None
        self._tie_scaling = None
        if self._ties is not None and spec.averaged_step == "scaled":
            # Each tied entry's gradient times its group's size: the group's mean gradient
            # becomes the sum a shared weight receives, so averaged trains like shared.
            self._tie_scaling = tying.scale_gradients_by_group_size(self._ties)

    @property
    def stages(self) -> list[Stage]:
        return [getattr(self, f"stage{n}") for n in range(1, len(self.spec.stages) + 1)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's maps, ``(N, C, H, W)``, before the classifier."""
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    @property
    def untied_banks(self) -> list[LocallyConnected2d]:
        """The filter banks stored untied (``weight_sharing="averaged"``), in order."""
        return [m for m in self.modules() if isinstance(m, LocallyConnected2d)]

    def tie_groups(self) -> tying.TieGroups | None:
        """Tie groups making every untied bank a convolution; None when weights are shared."""
        return self._ties

    def project_ties(self) -> None:
        """Replace every tied group by its mean (the lecture's rule); call after each step.

        The training loop calls it after every optimizer step; a hand-written loop can
        call it, or use ``tying.tie_after_step(optimizer, model.tie_groups())``. Does
        nothing for a shared-weight network.
        """
        if self._ties is not None:
            tying.project_(self._ties)

    def intermediates(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Every layer's output by name (``"stage1.filters"``, ..., ``"classifier"``)."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for number, stage in enumerate(self.stages, start=1):
            for name, layer in stage.named_children():
                x = layer(x)
                out[f"stage{number}.{name}"] = x
        out["classifier"] = self.classifier(x)
        return out


def make_table(bank: FilterBankSpec, in_maps: int) -> torch.Tensor:
    """The (K, 2) connection table a filter-bank spec describes."""
    if bank.table == "full":
        return tables.full(in_maps, bank.maps)
    if bank.table == "one-to-one":
        return tables.one_to_one(in_maps)
    if bank.table == "random":
        balanced = bank.balanced is not False  # unset means balanced
        return tables.random(in_maps, bank.maps, bank.fan_in, seed=bank.seed, balanced=balanced)
    return torch.tensor(bank.connections, dtype=torch.int64)


def _nonlinearity(name: str) -> nn.Module:
    return {"abs": Rectify, "relu": ReLU, "tanh": nn.Tanh, "none": nn.Identity}[name]()


def _norm(spec: NormSpec, maps: int) -> nn.Module:
    kwargs = {"window": spec.window, "sigma": spec.sigma, "border": spec.border}
    if spec.kind == "subtractive":
        return SubtractiveNorm(maps, **kwargs)
    layer = ContrastNorm if spec.kind == "contrast" else DivisiveNorm
    return layer(maps, threshold=spec.threshold, **kwargs)


def _pool(layer: Layer) -> nn.Module:
    spec, maps = layer.part, layer.input[0]
    options = {"maps": maps, "trainable": spec.trainable}
    if layer.stride == spec.stride:  # fused (or stride 1): pools only at the kept points
        return PoolSubsample(spec.kind, spec.window, spec.stride, spec.p, **options)
    return Pool(spec.kind, spec.window, spec.p, **options)  # a Subsample follows


def _filters(bank: FilterBankSpec, in_maps: int, input_hw: tuple[int, int], untied: bool):
    table = make_table(bank, in_maps)
    filters: nn.Module = FilterBank(table, bank.kernel, bias=bank.bias, in_maps=in_maps)
    if untied:
        # Copying into the untied layer must not draw from the generator, so that an
        # averaged network starts from the very weights of its shared twin.
        with torch.random.fork_rng(devices=[]):
            filters = LocallyConnected2d.from_filter_bank(filters, input_hw)
    if not bank.trainable:
        filters.requires_grad_(False)
    return filters


def _module(layer: Layer, untied: bool) -> nn.Module:
    """The module of one named layer (:mod:`cnnkit.models.layers`)."""
    if layer.kind == "filters":
        return _filters(layer.part, layer.input[0], layer.input[1:], untied)
    if layer.kind == "nonlinearity":
        return _nonlinearity(layer.part)
    if layer.kind == "norm":
        return _norm(layer.part, layer.input[0])
    if layer.kind == "pool":
        return _pool(layer)
    if layer.kind == "subsample":
        return Subsample(layer.stride)
    return nn.Tanh()  # "pool_activation"


def _stage(layers: tuple[Layer, ...], untied: bool) -> Stage:
    return Stage(OrderedDict((layer.name, _module(layer, untied)) for layer in layers))


def build_stage(
    stage: StageSpec, in_maps: int, input_hw: tuple[int, int], untied: bool = False
) -> Stage:
    """One stage as a :class:`~cnnkit.models.stages.Stage` of named layers: filters,
    nonlin, norm, pool (:func:`cnnkit.models.layers.layers_of_stage`).

    ``untied`` stores the filter bank as a :class:`LocallyConnected2d` over ``input_hw``
    (a kernel at every position) starting from one shared kernel per table row. A bank
    whose spec says ``trainable = false`` keeps its initial kernels (``requires_grad``
    off), so an optimizer over the trainable parameters never moves them.
    """
    return _stage(layers_of_stage(stage, in_maps, tuple(input_hw)), untied)


def build(spec: ArchitectureSpec) -> Network:
    """Build the network ``spec`` describes, with freshly initialised weights.

    Weights are drawn from torch's global generator: seed it (``torch.manual_seed``)
    for reproducible weights. Connection tables are seeded by the spec itself.
    """
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"spec must be an ArchitectureSpec, got {type(spec).__name__}")
    untied = spec.weight_sharing in ("averaged", "none")
    stages = [_stage(layers, untied) for layers in stage_layers(spec)]
    out_maps, out_h, out_w = spec.output_shape
    head = spec.classifier
    classifier = Classifier(
        out_maps * out_h * out_w, head.classes, head.hidden, head.hidden_activation
    )
    return Network(spec, stages, classifier)
