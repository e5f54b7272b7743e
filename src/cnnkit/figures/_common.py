"""What the figures share: their size rules, map mosaics, panels and title bands.

Sizes are fixed in inches at :data:`DPI` dots per inch, so a saved figure has a known pixel
size. Maps are drawn as *mosaics*: the ``C`` maps of a step, ``(C, H, W)``, tiled row by
row in a grid of ``ceil(sqrt(C H / W))`` columns with a gap of
``max(1, round(0.06 max(H, W)))`` pixels; the gaps are masked. Small maps may be tiled
with each value repeated ``r x r`` (``repeat``), so that the one-pixel gap stays thin
beside them. The drawn array holds the maps' own values (no rescaling), so :func:`untile`
of a panel's image gives them back exactly. Values all >= 0 are drawn in gray from 0
(black) to their maximum (white); signed values in blue (negative), white (0), red
(positive), symmetric about 0. One colour scale per panel, so the maps of a step compare
with each other; :func:`colour_bar` draws it.

Separators are neutral, never a colour of the scale: on the blue-white-red scale the gaps
are dark gray; on the gray scale, where every gray is a value, they are the page itself
(left transparent) and each map gets a thin frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator
from torch import nn

from cnnkit._validation import check_positive_int
from cnnkit.models.spec import ArchitectureSpec

DPI = 100
"""Dots per inch of every figure: a figure of ``w x h`` inches saves as ``100 w x 100 h`` px."""
TITLE_BAND = 0.75  # inches above each panel for its title lines
HEADER = 0.5  # inches at the top of a figure for its header line
COLOUR_BAND = 0.45  # inches below a panel for its colour bar
SMALL_MAP = 16  # maps shorter than this many pixels are tiled with their values repeated
_GAP_SIGNED = "#505050"  # gap colour between tiles on the blue-white-red scale
_FRAME = "#8c8c8c"  # frame of each tile on the gray scale (whose gaps are the page)
_PAD = 0.06  # each side of a panel's axes, as a fraction of the panel


# --------------------------------------------------------------------------------------
# Mosaics
# --------------------------------------------------------------------------------------


def _layout(count: int, height: int, width: int) -> tuple[int, int, int]:
    """``(rows, columns, gap)`` of the mosaic of ``count`` maps of ``height x width``."""
    columns = min(count, max(1, math.ceil(math.sqrt(count * height / width))))
    rows = math.ceil(count / columns)
    gap = max(1, round(0.06 * max(height, width)))
    return rows, columns, gap


def mosaic_shape(count: int, height: int, width: int, repeat: int = 1) -> tuple[int, int]:
    """The shape of :func:`tile_maps`'s mosaic of ``count`` maps ``height x width``.

    With ``R = repeat`` each map takes ``R H x R W`` pixels; in a grid of ``rows x cols``
    with gap ``g`` (module docstring, for maps of ``R H x R W``) the mosaic is
    ``(rows R H + (rows - 1) g, cols R W + (cols - 1) g)``.
    """
    height, width = repeat * height, repeat * width
    rows, columns, gap = _layout(count, height, width)
    return rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap


def repeat_for(height: int, width: int) -> int:
    """How often to repeat each value of a ``height x width`` map when tiling it for a
    figure: ``ceil(16 / min(H, W))``, so its tile is at least 16 pixels on each side."""
    return max(1, math.ceil(SMALL_MAP / min(height, width)))


def _tiles(count: int, height: int, width: int) -> Iterator[tuple[int, int]]:
    """``(top, left)`` of each of ``count`` tiles ``height x width`` in their mosaic."""
    _, columns, gap = _layout(count, height, width)
    for c in range(count):
        yield (c // columns) * (height + gap), (c % columns) * (width + gap)


def tile_maps(maps: np.ndarray, repeat: int = 1) -> np.ma.MaskedArray:
    """Tile ``(C, H, W)`` maps into one masked 2-D array, row by row, gaps masked.

    With ``repeat = R`` each value fills ``R x R`` pixels. Map ``c`` sits at row
    ``(c // cols) (R H + g)`` and column ``(c % cols) (R W + g)`` of the result, whose
    shape is :func:`mosaic_shape`; see the module docstring for ``cols`` and ``g``. The
    values are copied unchanged.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"maps must have a non-empty shape (C, H, W), got {maps.shape}")
    check_positive_int("repeat", repeat)
    maps = maps.repeat(repeat, axis=1).repeat(repeat, axis=2)  # (C, R H, R W)
    count, height, width = maps.shape
    shape = mosaic_shape(count, height, width)
    data = np.zeros(shape, dtype=maps.dtype)
    mask = np.ones(shape, dtype=bool)
    for c, (top, left) in enumerate(_tiles(count, height, width)):
        data[top : top + height, left : left + width] = maps[c]
        mask[top : top + height, left : left + width] = False
    return np.ma.MaskedArray(data, mask)


def untile(mosaic: np.ndarray, count: int, height: int, width: int) -> np.ndarray:
    """The ``(count, height, width)`` maps that :func:`tile_maps` laid out in ``mosaic``.

    The repeat is read from the mosaic's shape (the shape grows with it, so only one
    repeat fits).
    """
    data = np.ma.getdata(mosaic)
    repeat = 1
    while mosaic_shape(count, height, width, repeat)[0] < data.shape[0]:
        repeat += 1
    if data.shape != mosaic_shape(count, height, width, repeat):
        raise ValueError(
            f"mosaic of {count} maps {height}x{width} must have shape "
            f"{mosaic_shape(count, height, width)} (or that of the maps repeated), "
            f"got {data.shape}"
        )
    big_h, big_w = repeat * height, repeat * width
    out = np.empty((count, height, width), dtype=data.dtype)
    for c, (top, left) in enumerate(_tiles(count, big_h, big_w)):
        out[c] = data[top : top + big_h : repeat, left : left + big_w : repeat]
    return out


def show(
    ax: Any,
    maps: np.ndarray,
    *,
    signed: bool | None = None,
    limits: tuple[float, float] | None = None,
    repeat: int = 1,
) -> Any:
    """Draw the mosaic of ``maps`` on ``ax`` with one colour scale (module docstring).

    ``signed`` picks the blue-white-red scale (True) or gray (False); by default, signed
    when a value is < 0. ``limits`` fixes ``(vmin, vmax)``; by default ``(-m, m)`` with
    ``m`` the largest ``|value|`` (signed) or ``(0, max)`` (gray). ``repeat`` as in
    :func:`tile_maps`. Returns the ``AxesImage`` (for :func:`colour_bar`).
    """
    low, high = float(maps.min()), float(maps.max())
    if signed is None:
        signed = low < 0
    if signed:
        cmap = colormaps["RdBu_r"].with_extremes(bad=_GAP_SIGNED)
        limit = max(-low, high) or 1.0
        vmin, vmax = limits if limits is not None else (-limit, limit)
    else:
        cmap = colormaps["gray"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
        vmin, vmax = limits if limits is not None else (0.0, high or 1.0)
    mosaic = tile_maps(maps, repeat)
    # Upscaled mosaics keep their pixels sharp; shrunk ones are antialiased.
    width_px = ax.get_position().width * ax.figure.get_figwidth() * DPI
    interpolation = "nearest" if width_px >= mosaic.shape[1] else "antialiased"
    image = ax.imshow(mosaic, cmap=cmap, vmin=vmin, vmax=vmax, interpolation=interpolation)
    if not signed:
        count, height, width = maps.shape
        height, width = repeat * height, repeat * width
        frames = [
            Rectangle((left - 0.5, top - 0.5), width, height)
            for top, left in _tiles(count, height, width)
        ]
        ax.add_collection(
            PatchCollection(frames, facecolor="none", edgecolor=_FRAME, linewidth=0.6)
        )
        for spine in ax.spines.values():
            spine.set_visible(False)
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def colour_bar(fig: Figure, ax: Any, image: Any) -> Any:
    """A horizontal colour bar for ``image`` under ``ax`` (in the band
    :data:`COLOUR_BAND` below it), ticked at both ends of the scale (and at 0 when the
    scale is signed). Its axes is labelled ``"<ax's label> · colour bar"``; returns it."""
    width, height = fig.get_size_inches()
    box = ax.get_position()  # figure fractions
    left, right = box.x0 + 0.1 * box.width, box.x1 - 0.1 * box.width
    bottom = box.y0 - 0.16 / height
    cax = fig.add_axes((left, bottom, right - left, 0.09 / height))
    cax.set_label(f"{ax.get_label()} · colour bar")
    bar = fig.colorbar(image, cax=cax, orientation="horizontal")
    low, high = image.get_clim()
    ticks = [low, 0.0, high] if low < 0 < high else [low, high]
    bar.locator = FixedLocator(ticks)
    bar.update_ticks()
    cax.set_xticklabels([_number(t) for t in ticks])
    cax.tick_params(labelsize=7, length=2, pad=1.5)
    bar.outline.set_linewidth(0.5)
    return cax


def _number(value: float) -> str:
    """3 significant digits, with a true minus sign."""
    return f"{value:.3g}".replace("-", "−")


def shape_text(shape: Sequence[int]) -> str:
    """``(64, 75, 75)`` -> ``"64@75×75"``."""
    maps, height, width = shape
    return f"{maps}@{height}×{width}"


def range_text(values: np.ndarray) -> str:
    """``"values −1.3 … 4.59"``: the least and greatest value, 3 significant digits."""
    return f"values {_number(float(values.min()))} … {_number(float(values.max()))}"


def check_network(model: Any) -> ArchitectureSpec:
    """Return ``model.spec`` if ``model`` is a network built from a spec, else raise."""
    spec = getattr(model, "spec", None)
    if not isinstance(model, nn.Module) or not isinstance(spec, ArchitectureSpec):
        raise TypeError(
            "model must be a network built by cnnkit.models.build (with .spec and "
            f".intermediates), got {type(model).__name__}"
        )
    return spec


def check_stage(spec: ArchitectureSpec, stage: int) -> int:
    """Return ``stage`` if it numbers one of ``spec``'s stages (1-based), else raise."""
    count = len(spec.stages)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise TypeError(f"stage must be an integer, got {stage!r}")
    if not 1 <= stage <= count:
        raise ValueError(
            f"stage must be between 1 and {count} (the network has {count} stages), got {stage}"
        )
    return stage


def size_text(pair: tuple[int, int]) -> str:
    """``(10, 10)`` -> ``"10×10"``."""
    return f"{pair[0]}×{pair[1]}"


def stride_text(pair: tuple[int, int]) -> str:
    """``(5, 5)`` -> ``"5"``; ``(2, 3)`` -> ``"2×3"``."""
    return str(pair[0]) if pair[0] == pair[1] else size_text(pair)


def cell_top(fig: Figure, row: int, panel: float, below: float = 0.0) -> float:
    """Inches from the bottom of ``fig`` to the top of grid row ``row`` (below the header).

    A row is ``TITLE_BAND + panel + below`` inches high: the title band, the square
    panel, then ``below`` (e.g. :data:`COLOUR_BAND` for a colour bar).
    """
    return fig.get_figheight() - HEADER - row * (TITLE_BAND + panel + below)


def panel_axes(fig: Figure, row: int, column: int, panel: float, below: float = 0.0) -> Any:
    """A square axes of side ``0.88 panel`` centred in grid cell ``(row, column)``'s panel."""
    width, height = fig.get_size_inches()
    pad = _PAD * panel
    side = panel - 2 * pad
    x = column * panel + pad
    y = cell_top(fig, row, panel, below) - TITLE_BAND - panel + pad
    return fig.add_axes((x / width, y / height, side / width, side / height))


def band(
    fig: Figure,
    row: int,
    column: int,
    panel: float,
    title: str,
    *lines: str,
    below: float = 0.0,
) -> None:
    """The title band of cell ``(row, column)``: a bold title, then up to two smaller lines."""
    width, height = fig.get_size_inches()
    x = (column + 0.5) * panel / width
    top = cell_top(fig, row, panel, below)
    fig.text(x, (top - 0.08) / height, title, ha="center", va="top", fontsize=9.5, weight="bold")
    for i, line in enumerate(lines):
        y = (top - 0.3 - 0.17 * i) / height
        fig.text(x, y, line, ha="center", va="top", fontsize=8, color="#333")


def panel_for(shortest_px: float, *maps: np.ndarray, minimum: float) -> float:
    """The panel side in inches (a multiple of 0.1, at least ``minimum``) at which every
    mosaic of ``maps`` (each ``(C, H, W)``, tiled with :func:`repeat_for`) shows each map
    at least ``shortest_px`` pixels on its shorter side.

    A mosaic of ``M_h x M_w`` pixels fills the square axes of side ``s`` (0.88 panel, at
    :data:`DPI`) by its longer side, so a map of ``R H x R W`` pixels is drawn
    ``s R min(H, W) / max(M_h, M_w)`` pixels on its shorter side.
    """
    side_px = 0.0
    for values in maps:
        count, height, width = values.shape
        repeat = repeat_for(height, width)
        longest = max(mosaic_shape(count, height, width, repeat))
        side_px = max(side_px, shortest_px * longest / (repeat * min(height, width)))
    panel = side_px / DPI / (1 - 2 * _PAD)
    return max(minimum, math.ceil(round(panel * 10, 6)) / 10)


def header(fig: Figure, text: str) -> None:
    """The figure's header line, top left."""
    fig.text(0.1 / fig.get_figwidth(), 1 - 0.12 / fig.get_figheight(), text, va="top", fontsize=11)
