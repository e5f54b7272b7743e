"""What the figures share: their size rules, map mosaics, panels and title bands.

Sizes are fixed in inches at :data:`DPI` dots per inch, so a saved figure has a known pixel
size. Maps are drawn as *mosaics*: the ``C`` maps of a step, ``(C, H, W)``, tiled row by
row in a grid of ``ceil(sqrt(C H / W))`` columns with a gap of
``max(1, round(0.06 max(H, W)))`` pixels; the gaps are masked. The drawn array holds the
maps' own values (no rescaling), so :func:`untile` of a panel's image gives them back
exactly. Values all >= 0 are drawn in gray from 0 (black) to their maximum (white); signed
values in blue (negative), white (0), red (positive), symmetric about 0. One colour scale
per panel, so the maps of a step compare with each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from cnnkit.models.spec import ArchitectureSpec

DPI = 100
"""Dots per inch of every figure: a figure of ``w x h`` inches saves as ``100 w x 100 h`` px."""
TITLE_BAND = 0.75  # inches above each panel for its title lines
HEADER = 0.5  # inches at the top of a figure for its header line
_GAP_SIGNED = "#505050"  # gap colour between tiles on the blue-white-red scale
_GAP_GRAY = "#9ecae1"  # gap colour on the gray scale


# --------------------------------------------------------------------------------------
# Mosaics
# --------------------------------------------------------------------------------------


def _layout(count: int, height: int, width: int) -> tuple[int, int, int]:
    """``(rows, columns, gap)`` of the mosaic of ``count`` maps of ``height x width``."""
    columns = min(count, max(1, math.ceil(math.sqrt(count * height / width))))
    rows = math.ceil(count / columns)
    gap = max(1, round(0.06 * max(height, width)))
    return rows, columns, gap


def tile_maps(maps: np.ndarray) -> np.ma.MaskedArray:
    """Tile ``(C, H, W)`` maps into one masked 2-D array, row by row, gaps masked.

    Map ``c`` sits at row ``(c // cols) (H + g)`` and column ``(c % cols) (W + g)`` of the
    result, which has shape ``(rows H + (rows - 1) g, cols W + (cols - 1) g)``; see the
    module docstring for ``cols`` and ``g``. The values are copied unchanged.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ValueError(f"maps must have a non-empty shape (C, H, W), got {maps.shape}")
    count, height, width = maps.shape
    rows, columns, gap = _layout(count, height, width)
    shape = (rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap)
    data = np.zeros(shape, dtype=maps.dtype)
    mask = np.ones(shape, dtype=bool)
    for c in range(count):
        top, left = (c // columns) * (height + gap), (c % columns) * (width + gap)
        data[top : top + height, left : left + width] = maps[c]
        mask[top : top + height, left : left + width] = False
    return np.ma.MaskedArray(data, mask)


def untile(mosaic: np.ndarray, count: int, height: int, width: int) -> np.ndarray:
    """The ``(count, height, width)`` maps that :func:`tile_maps` laid out in ``mosaic``."""
    rows, columns, gap = _layout(count, height, width)
    expected = (rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap)
    data = np.ma.getdata(mosaic)
    if data.shape != expected:
        raise ValueError(
            f"mosaic of {count} maps {height}x{width} must have shape {expected}, got {data.shape}"
        )
    out = np.empty((count, height, width), dtype=data.dtype)
    for c in range(count):
        top, left = (c // columns) * (height + gap), (c % columns) * (width + gap)
        out[c] = data[top : top + height, left : left + width]
    return out


def show(
    ax: Any,
    maps: np.ndarray,
    *,
    signed: bool | None = None,
    limits: tuple[float, float] | None = None,
) -> None:
    """Draw the mosaic of ``maps`` on ``ax`` with one colour scale (module docstring).

    ``signed`` picks the blue-white-red scale (True) or gray (False); by default, signed
    when a value is < 0. ``limits`` fixes ``(vmin, vmax)``; by default ``(-m, m)`` with
    ``m`` the largest ``|value|`` (signed) or ``(0, max)`` (gray).
    """
    low, high = float(maps.min()), float(maps.max())
    if signed is None:
        signed = low < 0
    if signed:
        cmap, gap = colormaps["RdBu_r"], _GAP_SIGNED
        limit = max(-low, high) or 1.0
        vmin, vmax = limits if limits is not None else (-limit, limit)
    else:
        cmap, gap = colormaps["gray"], _GAP_GRAY
        vmin, vmax = limits if limits is not None else (0.0, high or 1.0)
    mosaic = tile_maps(maps)
    # Upscaled mosaics keep their pixels sharp; shrunk ones are antialiased.
    width_px = ax.get_position().width * ax.figure.get_figwidth() * DPI
    interpolation = "nearest" if width_px >= mosaic.shape[1] else "antialiased"
    ax.imshow(
        mosaic,
        cmap=cmap.with_extremes(bad=gap),
        vmin=vmin,
        vmax=vmax,
        interpolation=interpolation,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def shape_text(shape: Sequence[int]) -> str:
    """``(64, 75, 75)`` -> ``"64@75×75"``."""
    maps, height, width = shape
    return f"{maps}@{height}×{width}"


def range_text(values: np.ndarray) -> str:
    """``"values −1.3 … 4.59"``: the least and greatest value, 3 significant digits."""
    return f"values {float(values.min()):.3g} … {float(values.max()):.3g}".replace("-", "−")


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


def cell_top(fig: Figure, row: int, panel: float) -> float:
    """Inches from the bottom of ``fig`` to the top of grid row ``row`` (below the header)."""
    return fig.get_figheight() - HEADER - row * (panel + TITLE_BAND)


def panel_axes(fig: Figure, row: int, column: int, panel: float) -> Any:
    """A square axes filling grid cell ``(row, column)`` below its title band."""
    width, height = fig.get_size_inches()
    pad = 0.06 * panel
    side = panel - 2 * pad
    x = column * panel + pad
    y = cell_top(fig, row, panel) - TITLE_BAND - panel + pad
    return fig.add_axes((x / width, y / height, side / width, side / height))


def band(fig: Figure, row: int, column: int, panel: float, title: str, *lines: str) -> None:
    """The title band of cell ``(row, column)``: a bold title, then up to two smaller lines."""
    width, height = fig.get_size_inches()
    x = (column + 0.5) * panel / width
    top = cell_top(fig, row, panel)
    fig.text(x, (top - 0.08) / height, title, ha="center", va="top", fontsize=9.5, weight="bold")
    for i, line in enumerate(lines):
        y = (top - 0.3 - 0.17 * i) / height
        fig.text(x, y, line, ha="center", va="top", fontsize=8, color="#333")


def header(fig: Figure, text: str) -> None:
    """The figure's header line, top left."""
    fig.text(0.1 / fig.get_figwidth(), 1 - 0.12 / fig.get_figheight(), text, va="top", fontsize=11)
