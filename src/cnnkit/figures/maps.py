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
from matplotlib.patches import Rectangle
from torch import nn

from cnnkit._validation import check_nonnegative_int, check_positive_int
from cnnkit.data.images import load_image, prepare_image
from cnnkit.figures._common import (
    COLOUR_BAND,
    DPI,
    HEADER,
    TITLE_BAND,
    band,
    cell_top,
    check_network,
    check_stage,
    colour_bar,
    header,
    panel_axes,
    panel_for,
    range_text,
    repeat_for,
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

PANEL = 2.7  # inches: the least side of one map panel in the whole-network figure
STAGE_PANEL = 3.5  # inches: the same in a one-stage figure
DEFAULT_MAPS = 16
"""How many maps of each step a feature-map figure draws unless told (a 4×4 mosaic)."""
MAP_PX = 64  # pixels: the least side of each map drawn (panels grow to keep it)
_OVERLAY = "#00b140"  # the pooling window and its dots: green, in neither colour scale


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


def _draw_step(fig: Figure, step: MapStep, count: int, row: int, column: int, panel: float) -> None:
    """The first ``count`` maps of ``step`` in cell ``(row, column)``, with its colour bar."""
    ax = panel_axes(fig, row, column, panel, COLOUR_BAND)
    ax.set_label(step.layer or f"stage{step.stage}.pool (stride 1)")
    shown = step.values[:count]  # (n, H, W)
    limits = (0.0, 1.0) if step.layer == "input" else None
    image = show(ax, shown, limits=limits, repeat=repeat_for(*shown.shape[1:]))
    colour_bar(fig, ax, image)
    total = step.values.shape[0]
    which = f"first {len(shown)} of {total} maps" if len(shown) < total else _all(total)
    lines = (step.detail, f"{which} · {range_text(shown)}")
    band(fig, row, column, panel, step.title, *lines, below=COLOUR_BAND)


def _all(count: int) -> str:
    return "1 map" if count == 1 else f"all {count} maps"


def pooling_label(spec: ArchitectureSpec, number: int) -> str:
    """How stage ``number`` pools, with its sizes: for lecun83's stage 1 (the lecture's
    Figure 3), ``"10×10 window, step 5: 75×75 → 14×14"``. The stage must pool."""
    pool = spec.stages[number - 1].pool
    if pool is None:
        raise ValueError(f"stage {number} of {spec.name} has no pooling")
    shapes = spec.shapes()[number - 1]
    (_, height, width), (_, out_h, out_w) = shapes.filters, shapes.pooled
    return (
        f"{pool.window}×{pool.window} window, step {pool.stride}: "
        f"{height}×{width} → {out_h}×{out_w}"
    )


def _draw_pooling(
    fig: Figure,
    spec: ArchitectureSpec,
    number: int,
    before: MapStep,
    row: int,
    column: int,
    panel: float,
) -> None:
    """The lecture's Figure 3 for stage ``number`` in cell ``(row, column)``.

    Map 0 of ``before`` (the maps entering the pooling layer) with the pooling window at
    the kept place nearest the map's middle (solid), one stride to the right and one
    stride down (dashed), and a dot at the centre of every window whose value
    subsampling keeps: ``((H - k) // s + 1) x ((W - k) // s + 1)`` dots for a ``k x k``
    window at stride ``s``.
    """
    pool = spec.stages[number - 1].pool
    window, stride = pool.window, pool.stride
    ax = panel_axes(fig, row, column, panel, COLOUR_BAND)
    ax.set_label(f"stage{number}.pooling window")
    one = before.values[:1]  # (1, H, W)
    _, height, width = one.shape
    repeat = repeat_for(height, width)
    colour_bar(fig, ax, show(ax, one, repeat=repeat))
    out_h, out_w = (height - window) // stride + 1, (width - window) // stride + 1
    # The window drawn solid: the kept place nearest the middle of the map.
    top, left = stride * ((out_h - 1) // 2), stride * ((out_w - 1) // 2)
    places = [(top, left, "-", "window")]
    if left + stride + window <= width:
        places.append((top, left + stride, "--", f"one step ({stride}) on"))
    if top + stride + window <= height:
        places.append((top + stride, left, "--", f"one step ({stride}) down"))
    # Map pixel (i, j) is drawn over [R j - 1/2, R (j + 1) - 1/2] across, likewise down.
    side = repeat * window
    for y, x, style, label in places:
        corner = (repeat * x - 0.5, repeat * y - 0.5)
        ax.add_patch(
            Rectangle(corner, side, side, fill=False, edgecolor=_OVERLAY, linewidth=1.3,
                      linestyle=style, label=label)
        )  # fmt: skip
    across = repeat * (np.arange(out_w) * stride + window / 2) - 0.5  # (out_w,)
    down = repeat * (np.arange(out_h) * stride + window / 2) - 0.5  # (out_h,)
    xs, ys = np.meshgrid(across, down)  # (out_h, out_w) each
    ax.plot(xs.ravel(), ys.ravel(), linestyle="none", marker="o", markersize=1.5,
            color=_OVERLAY, label="centres of the windows kept")  # fmt: skip
    ax.set_xlim(-0.5, repeat * width - 0.5)
    ax.set_ylim(repeat * height - 0.5, -0.5)
    title = f"stage {number} · pooling window"
    detail = f"{pool.kind}, map 0 after {before.step}; dots: {out_h}×{out_w} kept"
    band(fig, row, column, panel, title, pooling_label(spec, number), detail, below=COLOUR_BAND)


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


def first_pooling_stage(spec: ArchitectureSpec) -> int | None:
    """The number (1-based) of the first stage of ``spec`` that pools, or ``None``."""
    return next((n for n, s in enumerate(spec.stages, start=1) if s.pool is not None), None)


def _entering_pool(row: list[MapStep]) -> MapStep:
    """The step of a stage's ``row`` whose maps enter its pooling layer."""
    first = next(i for i, s in enumerate(row) if s.step in ("pool", "pool + subsample"))
    return row[first - 1]


def feature_maps_figure(
    model: Network,
    image: Any,
    *,
    stage: int | None = None,
    note: str | None = None,
    split_pooling: bool = True,
    maps: int = DEFAULT_MAPS,
) -> Figure:
    """Grids of the maps after every step of every stage (or of one ``stage``) for one image.

    The maps are :func:`feature_maps` (same arguments); each step's panel draws its first
    ``maps`` maps (all of them when it has fewer) as a mosaic titled like
    ``"stage 1 · filters · 64@75×75"``, with the step's settings, how many maps it shows
    and their value range below the title, and a colour bar under it ticked at the ends
    of its scale. The header names the network, the image file (when ``image`` is a
    path) and ``note`` (say where the weights come from, e.g. ``"weights: seeded random
    (seed 0)"``). Each panel's axes carries the step's ``layer`` as its label
    (``ax.get_label()``); its colour bar's axes is labelled ``"<layer> · colour bar"``.

    One more panel draws the lecture's Figure 3 for the first stage that pools (for
    ``stage=n``, for stage ``n`` if it pools): map 0 entering the pooling layer with the
    pooling window and its next places at the stride, a dot at the centre of each window
    kept, and the sizes (:func:`pooling_label`); its axes is labelled
    ``"stageN.pooling window"``. A network that never pools has no such panel.

    Whole network (``stage=None``): one row per stage, the input image first in the first
    row, the pooling panel last in its stage's row; later rows start with how the stage
    reads the maps above. ``stage=n``: one row, the maps entering stage ``n``, its steps,
    then its pooling panel.

    Size: ``columns p`` by ``0.5 + rows (0.75 + p + 0.45)`` inches at :data:`DPI`, where
    ``columns`` is the most panels in a row (plus one for the reads column of the whole
    network) and ``p``, the side of a panel, is the least multiple of 0.1 inch at which
    every map drawn is at least 64 pixels on its shorter side (:func:`panel_for`), and
    at least 2.7 (whole network) or 3.5 (one stage).
    """
    check_positive_int("maps", maps)
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
        row = [steps[0] if stage == 1 else rows[stage - 2][-1], *rows[stage - 1]]
        pooling = spec.stages[stage - 1].pool is not None
        panel = panel_for(MAP_PX, *(s.values[:maps] for s in row), minimum=STAGE_PANEL)
        fig = _grid_figure(len(row) + pooling, 1, panel)
        for column, step in enumerate(row):
            _draw_step(fig, step, maps, 0, column, panel)
        if pooling:
            before = _entering_pool(rows[stage - 1])
            _draw_pooling(fig, spec, stage, before, 0, len(row), panel)
        header(fig, " · ".join([parts[0], f"stage {stage}", *parts[1:]]))
        return fig
    pooling_stage = first_pooling_stage(spec)
    panel = panel_for(MAP_PX, *(s.values[:maps] for s in steps), minimum=PANEL)
    columns = max(1 + len(r) + (n == pooling_stage) for n, r in enumerate(rows, start=1))
    fig = _grid_figure(columns, len(rows), panel)
    _draw_step(fig, steps[0], maps, 0, 0, panel)
    for number, row in enumerate(rows, start=1):
        if number > 1:
            width, height = fig.get_size_inches()
            top = cell_top(fig, number - 1, panel, COLOUR_BAND)
            band(fig, number - 1, 0, panel, f"stage {number} reads", below=COLOUR_BAND)
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
            _draw_step(fig, step, maps, number - 1, column, panel)
        if number == pooling_stage:
            before = _entering_pool(row)
            _draw_pooling(fig, spec, number, before, number - 1, 1 + len(row), panel)
    header(fig, " · ".join(parts))
    return fig


def _grid_figure(columns: int, rows: int, panel: float) -> Figure:
    """An empty figure of ``columns x rows`` cells of side ``panel`` with their bands."""
    height = HEADER + rows * (TITLE_BAND + panel + COLOUR_BAND)
    return Figure(figsize=(columns * panel, height), dpi=DPI)
