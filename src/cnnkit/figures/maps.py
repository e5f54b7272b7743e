"""Feature maps: the input and every stage's maps after each step, for one image.

The lecture shows its network with pictures of maps: the 64 maps of layer 1 (Figure 2),
pooling over 10×10 windows of a 75×75 map (Figure 3), the 14×14 subsampled maps
(Figure 4). :func:`feature_maps` computes those maps for any image and any network built
by :func:`cnnkit.models.build`; :func:`feature_maps_figure` draws them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from cnnkit._validation import check_nonnegative_int
from cnnkit.data.images import load_image, prepare_image
from cnnkit.figures._common import (
    DPI,
    HEADER,
    TITLE_BAND,
    band,
    cell_top,
    check_network,
    check_stage,
    header,
    panel_axes,
    range_text,
    shape_text,
    show,
    size_text,
    stride_text,
)
from cnnkit.models.build import Network, build
from cnnkit.models.presets import from_name
from cnnkit.models.spec import ArchitectureSpec
from cnnkit.nn.pooling import PoolSubsample
from cnnkit.ops.pooling import pool2d

PANEL = 2.7  # inches: side of one map panel in the whole-network figure
STAGE_PANEL = 3.5  # inches: the same in a one-stage figure


@dataclass(frozen=True)
class MapStep:
    """The maps after one step of a stage, for one image.

    Attributes:
        layer: the name in ``Network.intermediates`` whose output ``values`` are
            (``"input"`` for the image), or ``None`` for the stride-1 pooled maps that a
            fused pooling layer never forms (drawn so that pooling and subsampling show
            apart, as in the lecture's Figures 3 and 4).
        stage: the stage number, 0 for the input.
        step: what the step does: ``"input"``, ``"filters"``, ``"rectify"``, ``"relu"``,
            ``"tanh"``, ``"norm"``, ``"pool"``, ``"subsample"`` (or ``"pool + subsample"``).
        detail: a short description of the step's settings.
        values: ``(C, H, W)`` float array of the maps.
    """

    layer: str | None
    stage: int
    step: str
    detail: str
    values: np.ndarray

    @property
    def title(self) -> str:
        """E.g. ``"stage 1 · filters · 64@75×75"``."""
        where = "input" if self.stage == 0 else f"stage {self.stage} · {self.step}"
        return f"{where} · {shape_text(self.values.shape)}"


def random_network(spec: ArchitectureSpec | str, seed: int = 0) -> Network:
    """Build ``spec`` (or the preset of that name) with weights drawn after seeding with ``seed``.

    The global torch generator is left as it was. Returns the network in eval mode.
    """
    check_nonnegative_int("seed", seed)
    if isinstance(spec, str):
        spec = from_name(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(spec)
    return model.eval()


def prepare_input(model: Network, image: Any) -> torch.Tensor:
    """``image`` as ``model``'s input ``(maps, H, W)``, prepared as training prepares images.

    ``image`` is a path to an image file (any format Pillow reads), a Pillow image of any
    mode, an array or tensor of gray levels (see :func:`cnnkit.data.prepare_image`), or
    an already prepared floating-point tensor of exactly the input's shape, used as is.
    """
    spec = check_network(model)
    shape = (spec.input.maps, spec.input.height, spec.input.width)
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.shape == shape:
        return image.detach().float().cpu()
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if spec.input.maps != 1:
        raise ValueError(
            f"the network reads {spec.input.maps} input maps; pass image as a prepared "
            f"tensor of shape {shape}"
        )
    return prepare_image(image, (spec.input.height, spec.input.width))


# Layer kind -> (step, detail) when neither depends on the layer's settings.
_STEPS = {
    "Rectify": ("rectify", "|x|"),
    "ReLU": ("relu", "max(0, x)"),
    "Tanh": ("tanh", "tanh x"),
    "Identity": ("identity", ""),
    "ContrastNorm": ("norm", "contrast: subtractive, divisive"),
    "SubtractiveNorm": ("norm", "subtractive"),
    "DivisiveNorm": ("norm", "divisive"),
}


def _describe(layer: nn.Module) -> tuple[str, str]:
    """``(step, detail)`` of one layer, by its kind."""
    kind = type(layer).__name__
    if kind in ("FilterBank", "LocallyConnected2d"):
        rows, kh, kw = layer.weight.shape[-3:]
        return "filters", f"{rows} kernels {kh}×{kw}"
    if kind == "Pool":
        return "pool", f"{layer.kind}, window {size_text(layer.window)}, stride 1"
    if kind == "PoolSubsample":
        window, stride = size_text(layer.window), stride_text(layer.stride)
        return "pool + subsample", f"{layer.kind}, window {window}, stride {stride}"
    if kind == "Subsample":
        return "subsample", f"stride {stride_text(layer.stride)}"
    return _STEPS.get(kind, (kind, ""))


def feature_maps(model: Network, image: Any, *, split_pooling: bool = True) -> list[MapStep]:
    """The input and every stage's maps after each step, for one image.

    ``image`` is prepared by :func:`prepare_input`. Each step's values are the model's own
    ``Network.intermediates`` output for that layer, taken from the first (only) image of
    the batch, as float arrays on the CPU; the classifier is left out. The model runs in
    eval mode without gradients; its mode is restored.

    With ``split_pooling`` (default), a fused pooling layer (``PoolSubsample`` with a
    stride > 1) shows as two steps: the maps pooled at stride 1 (computed here with the
    layer's own kind, window, ``p`` and coefficients; ``layer=None``), then the model's
    output labelled ``"subsample"``, which equals subsampling those maps.
    """
    x = prepare_input(model, image)
    x = x.to(next(model.parameters()).dtype)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            outputs = model.intermediates(x[None].to(device))  # name -> (1, C, H, W)
            steps = [MapStep("input", 0, "input", "gray levels in [0, 1]", x.numpy())]
            previous = x[None].to(device)
            for name, value in outputs.items():
                if name == "classifier":
                    continue
                stage_name, layer_name = name.split(".", 1)
                stage = int(stage_name.removeprefix("stage"))
                layer = getattr(getattr(model, stage_name), layer_name)
                step, detail = _describe(layer)
                if split_pooling and isinstance(layer, PoolSubsample) and layer.stride != (1, 1):
                    pooled = pool2d(
                        previous,
                        layer.kind,
                        layer.window,
                        1,
                        layer.p,
                        weight=layer.weight,
                        bias=layer.bias,
                    )  # (1, C, H - k_h + 1, W - k_w + 1)
                    window = f"{layer.kind}, window {size_text(layer.window)}, stride 1"
                    steps.append(MapStep(None, stage, "pool", window, _numpy(pooled)))
                    step, detail = "subsample", f"stride {stride_text(layer.stride)}"
                steps.append(MapStep(name, stage, step, detail, _numpy(value)))
                previous = value
    finally:
        model.train(was_training)
    return steps


def _numpy(value: torch.Tensor) -> np.ndarray:
    return value[0].detach().float().cpu().numpy()  # (C, H, W)


def _draw_step(fig: Figure, step: MapStep, row: int, column: int, panel: float) -> None:
    ax = panel_axes(fig, row, column, panel)
    ax.set_label(step.layer or f"stage{step.stage}.pool (stride 1)")
    limits = (0.0, 1.0) if step.layer == "input" else None
    show(ax, step.values, limits=limits)
    band(fig, row, column, panel, step.title, step.detail, range_text(step.values))


def _fan_in_text(spec: ArchitectureSpec, number: int) -> str:
    """How stage ``number``'s filter bank joins the maps before it, in words."""
    bank = spec.stages[number - 1].filters
    maps_in = spec.shapes()[number - 2].output[0] if number > 1 else spec.input.maps
    if bank.table == "full":
        fan_in, kernels = f"all {maps_in}", maps_in * bank.maps
    elif bank.table == "one-to-one":
        fan_in, kernels = "1", bank.maps
    elif bank.table == "random":
        fan_in, kernels = f"{bank.fan_in} random", bank.fan_in * bank.maps
    else:
        counts = np.bincount([o for _, o in bank.connections], minlength=bank.maps)
        low, high = int(counts.min()), int(counts.max())
        fan_in, kernels = (str(low) if low == high else f"{low}–{high}"), int(counts.sum())
    return (
        f"{bank.maps} maps, each from\n{fan_in} of the {maps_in} maps above\n"
        f"({kernels} kernels {bank.kernel}×{bank.kernel})"
    )


def feature_maps_figure(
    model: Network,
    image: Any,
    *,
    stage: int | None = None,
    note: str | None = None,
    split_pooling: bool = True,
) -> Figure:
    """Grids of the maps after every step of every stage (or of one ``stage``) for one image.

    The maps are :func:`feature_maps` (same arguments), one mosaic per step titled like
    ``"stage 1 · filters · 64@75×75"`` with the step's settings and value range below.
    The header names the network, the image file (when ``image`` is a path) and ``note``
    (say where the weights come from, e.g. ``"weights: seeded random (seed 0)"``).
    Each panel's axes carries the step's ``layer`` as its label (``ax.get_label()``).

    Whole network (``stage=None``): one row per stage, the input image first in the first
    row; later rows start with how the stage reads the maps above. ``stage=n``: one row,
    the maps entering stage ``n`` then its steps.

    Size: ``(1 + steps) p`` by ``0.5 + rows (p + 0.6)`` inches at :data:`DPI`, where
    ``steps`` is the most steps in a row and ``p`` is 2.5 (whole network) or 3.5 (one
    stage).
    """
    steps = feature_maps(model, image, split_pooling=split_pooling)
    spec = model.spec
    rows = [[s for s in steps if s.stage == n] for n in range(1, len(spec.stages) + 1)]
    parts = [spec.name]
    if isinstance(image, (str, os.PathLike)):
        parts.append(Path(image).name)
    if note:
        parts.append(note)
    if stage is not None:
        check_stage(spec, stage)
        panel = STAGE_PANEL
        row = [steps[0] if stage == 1 else rows[stage - 2][-1], *rows[stage - 1]]
        fig = Figure(figsize=(len(row) * panel, HEADER + panel + TITLE_BAND), dpi=DPI)
        for column, step in enumerate(row):
            _draw_step(fig, step, 0, column, panel)
        header(fig, " · ".join([parts[0], f"stage {stage}", *parts[1:]]))
        return fig
    panel = PANEL
    columns = 1 + max(len(r) for r in rows)
    fig = Figure(figsize=(columns * panel, HEADER + len(rows) * (panel + TITLE_BAND)), dpi=DPI)
    _draw_step(fig, steps[0], 0, 0, panel)
    for number, row in enumerate(rows, start=1):
        if number > 1:
            width, height = fig.get_size_inches()
            top = cell_top(fig, number - 1, panel)
            band(fig, number - 1, 0, panel, f"stage {number} reads")
            text = f"{shape_text(rows[number - 2][-1].values.shape)}\n{_fan_in_text(spec, number)}"
            fig.text(
                0.5 * panel / width,
                (top - TITLE_BAND - 0.1) / height,
                text,
                ha="center",
                va="top",
                fontsize=9,
                linespacing=1.5,
            )
        for column, step in enumerate(row, start=1):
            _draw_step(fig, step, number - 1, column, panel)
    header(fig, " · ".join(parts))
    return fig
