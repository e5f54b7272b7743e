"""Learned kernels, and how close they come to Sobel's edge filters.

The lecture's Section 4 says that learned kernels come to behave like image-processing
filters such as Sobel's ``Gx = [[+1, 0, -1], [+2, 0, -2], [+1, 0, -1]]``. This module puts
a number on it for a trained network: for Gx and its seven turns by 45° (``Gy``, ``-Gx``,
``-Gy`` and the diagonals), the most similar kernel of a stage and their cosine
similarity, next to the similarity the best of as many random kernels would reach.

Matches are named for what a kernel computes in the network. The lecture's Gx is a
convolution kernel (convolving a ramp that rises to the right gives ``+8`` per unit of
slope, a discrete ``∂/∂x``), while a filter bank correlates; correlating with a kernel
turned by 180° is convolving with the kernel itself, so the stored kernel scored as "Gx"
is Gx turned by 180° (:func:`as_stored`; for Sobel's filters, ``-Gx``).

Method: the stored form of the 3×3 template is resized to the kernel's size by bilinear
interpolation with corners aligned (:func:`resize_kernel`), so a 9×9 kernel is compared
with a smooth 9×9 ramp of the same shape, then ``cos = <w, s> / (|w| |s|)`` over all
``k_h k_w`` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from cnnkit._validation import check_positive_int
from cnnkit.figures._common import (
    DPI,
    HEADER,
    TITLE_BAND,
    band,
    check_network,
    check_stage,
    header,
    panel_axes,
    show,
)
from cnnkit.models.build import Network

SOBEL_GX = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
"""The lecture's Sobel filter Gx; ``Gy = Gx.T``."""

# The outer ring of a 3×3 kernel, clockwise from the top-left corner.
_RING = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))
_ANGLE_NAMES = {0: "Gx", 90: "-Gy", 180: "-Gx", 270: "Gy"}
SOBEL_METHOD = (
    "cosine similarity with the 3×3 Sobel filter turned by 180° (the kernel a correlating "
    "filter bank stores to convolve with it), resized to the kernel's size by bilinear "
    "interpolation (corners aligned)"
)


def sobel_templates() -> list[tuple[str, int, np.ndarray]]:
    """Gx turned counter-clockwise (row 0 at the top) by 0°, 45°, ..., 315°.

    Returns ``(name, angle, 3×3 array)``; names are ``"Gx"``, ``"Gx+45°"``, ``"-Gy"``
    (90°), ``"Gx+135°"``, ``"-Gx"``, ``"Gx+225°"``, ``"Gy"`` (270°, ``Gx.T``),
    ``"Gx+315°"``. A turn by 45° moves the outer ring of the 3×3 kernel one place.
    """
    templates = []
    kernel = SOBEL_GX.copy()
    for angle in range(0, 360, 45):
        templates.append((_ANGLE_NAMES.get(angle, f"Gx+{angle}°"), angle, kernel))
        turned = kernel.copy()
        for i, (r, c) in enumerate(_RING):  # the value at ring place i moves to place i - 1
            turned[_RING[i - 1]] = kernel[r, c]
        kernel = turned
    return templates


def as_stored(kernel: np.ndarray) -> np.ndarray:
    """The kernel a filter bank stores to compute convolution with ``kernel``: ``kernel``
    turned by 180° (``kernel[::-1, ::-1]``).

    A bank computes the correlation ``y(i, j) = sum_{p,q} x(i + p, j + q) w(p, q)``; with
    ``w(p, q) = K(-p, -q)`` (indices centred) that is the convolution ``(x * K)(i, j)`` of
    the lecture's Section 5. For Sobel's filters, which change sign when turned by 180°,
    the stored kernel of ``Gx`` is ``-Gx``.
    """
    return np.ascontiguousarray(np.asarray(kernel, dtype=np.float64)[::-1, ::-1])


def resize_kernel(kernel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 3×3 ``kernel`` resized to ``size = (k_h, k_w)`` by bilinear interpolation.

    Corners are aligned: output row ``i`` samples the input at ``t = 2 i / (k_h - 1)``
    (``t`` in [0, 2], between input rows ``floor(t)`` and ``floor(t) + 1``), columns
    likewise; so ``R K C^T`` with ``R`` ``(k_h, 3)`` and ``C`` ``(k_w, 3)`` interpolation
    matrices. Size 3 returns the kernel unchanged; sides must be >= 2.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.shape != (3, 3):
        raise ValueError(f"kernel must have shape (3, 3), got {kernel.shape}")

    def matrix(n: int) -> np.ndarray:
        if n < 2:
            raise ValueError(f"size must be at least 2 on each side, got {tuple(size)}")
        out = np.zeros((n, 3))  # (n, 3)
        for i in range(n):
            t = 2.0 * i / (n - 1)
            j = min(int(t), 1)
            out[i, j], out[i, j + 1] = 1.0 - (t - j), t - j
        return out

    return matrix(size[0]) @ kernel @ matrix(size[1]).T  # (k_h, k_w)


@dataclass(frozen=True)
class SobelMatch:
    """One learned kernel's similarity to one Sobel template.

    ``kernel`` is the row of the filter bank's connection table (and of its weight);
    ``input_map``/``output_map`` that row's pair when the table is known; ``rank`` 1 is
    the most similar kernel to ``template``.
    """

    template: str
    angle: int
    rank: int
    kernel: int
    similarity: float
    input_map: int | None = None
    output_map: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _kernel_array(weight: Any) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu().double().numpy()
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 3 or 0 in weight.shape:
        raise ValueError(f"weight must have a non-empty shape (K, k_h, k_w), got {weight.shape}")
    if min(weight.shape[1:]) < 2:
        raise ValueError(
            f"kernels must be at least 2×2 to compare with a Sobel filter, got "
            f"{weight.shape[1]}×{weight.shape[2]}"
        )
    return weight


def sobel_scores(weight: Any, table: Any = None, *, top: int = 1) -> list[SobelMatch]:
    """For each Sobel template (:func:`sobel_templates`), the ``top`` most similar kernels.

    ``weight`` is ``(K, k_h, k_w)``, the kernels as a filter bank stores them (one per
    table row); ``table`` the optional ``(K, 2)`` connection table. Similarity is the cosine
    ``<w, s> / (|w| |s|)`` between a kernel ``w`` and the template's stored form
    ``s = as_stored(template)`` resized to ``(k_h, k_w)`` (:func:`resize_kernel`): 1 for a
    kernel with which the bank computes the template's convolution up to a positive
    factor (``"Gx"`` scores 1 for the kernel that gives ``+∂/∂x``), -1 for the negative
    of that kernel; a zero kernel scores 0. Results are ordered by template, then rank;
    ties keep the lower kernel index first.
    """
    weight = _kernel_array(weight)
    check_positive_int("top", top)
    count, kh, kw = weight.shape
    pairs = None
    if table is not None:
        pairs = np.asarray(table.cpu() if isinstance(table, torch.Tensor) else table)
        if pairs.shape != (count, 2):
            raise ValueError(
                f"table must have shape ({count}, 2) for {count} kernels, got {pairs.shape}"
            )
    flat = weight.reshape(count, kh * kw)  # (K, d)
    norms = np.linalg.norm(flat, axis=1)
    matches = []
    for name, angle, template in sobel_templates():
        s = resize_kernel(as_stored(template), (kh, kw)).reshape(-1)  # (d,)
        cosine = np.divide(
            flat @ s, norms * np.linalg.norm(s), out=np.zeros(count), where=norms > 0
        )
        cosine = np.clip(cosine, -1.0, 1.0)  # rounding can step just outside
        order = np.argsort(-cosine, kind="stable")
        for rank, k in enumerate(order[:top], start=1):
            row = (None, None) if pairs is None else (int(pairs[k, 0]), int(pairs[k, 1]))
            matches.append(SobelMatch(name, angle, rank, int(k), float(cosine[k]), *row))
    return matches


def chance_similarity(
    count: int, size: tuple[int, int], *, draws: int = 1000, seed: int = 0
) -> float:
    """The median best similarity to one template among ``count`` random kernels.

    For a kernel of ``d = k_h k_w`` values drawn from an isotropic Gaussian, the squared
    cosine with any fixed direction follows Beta(1/2, (d - 1)/2) and its sign is a fair
    coin; the best of ``count`` such cosines is drawn ``draws`` times (seeded) and the
    median returned. A learned kernel scoring well above it resembles the template more
    than the best of as many random kernels would.
    """
    check_positive_int("count", count)
    d = check_positive_int("size[0]", size[0]) * check_positive_int("size[1]", size[1])
    if d < 2:
        raise ValueError(f"size must hold at least 2 values, got {tuple(size)}")
    rng = np.random.default_rng(seed)
    squared = rng.beta(0.5, (d - 1) / 2, size=(draws, count))
    signs = rng.choice((-1.0, 1.0), size=(draws, count))
    return float(np.median((signs * np.sqrt(squared)).max(axis=1)))


def stage_kernels(model: Network, stage: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
    """The 2-D kernels ``(K, k_h, k_w)`` (float64) and the ``(K, 2)`` table of a stage's bank.

    A bank storing a kernel per position (``(H_out, W_out, K, k_h, k_w)``, tied by
    averaging) gives the mean over positions, which is the tied kernel.
    """
    check_stage(check_network(model), stage)
    bank = getattr(model, f"stage{stage}").filters
    weight = bank.weight.detach().cpu().double()
    if weight.dim() == 5:
        weight = weight.mean(dim=(0, 1))  # (K, k_h, k_w)
    table = getattr(bank, "table", None)
    return weight.numpy(), None if table is None else table.detach().cpu().numpy()


_ROW = "{:<9}{:>6}{:>6}{:>8}  {:<11}{:>10}"


@dataclass(frozen=True)
class SobelReport:
    """The Sobel comparison of one stage's kernels, as text or JSON-ready dict."""

    stage: int
    kernels: int
    kernel_size: tuple[int, int]
    matches: list[SobelMatch]
    chance: float
    method: str = SOBEL_METHOD

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "kernels": self.kernels,
            "kernel_size": list(self.kernel_size),
            "method": self.method,
            "chance": self.chance,
            "matches": [m.to_dict() for m in self.matches],
        }

    def to_text(self) -> str:
        kh, kw = self.kernel_size
        lines = [
            f"stage {self.stage}: {self.kernels} kernels {kh}×{kw}; {self.method}",
            "",
            _ROW.format("template", "angle", "rank", "kernel", "input→map", "similarity"),
        ]
        for m in self.matches:
            pair = "" if m.input_map is None else f"{m.input_map}→{m.output_map}"
            angle = f"{m.angle}°"
            lines.append(
                _ROW.format(m.template, angle, m.rank, m.kernel, pair, f"{m.similarity:.3f}")
            )
        lines += [
            "",
            f"chance: the best of {self.kernels} random Gaussian kernels scores about "
            f"{self.chance:.3f} against one template (median)",
        ]
        return "\n".join(lines)


def sobel_report(model: Network, stage: int = 1, *, top: int = 1) -> SobelReport:
    """:func:`sobel_scores` of ``model``'s stage ``stage`` kernels, with the chance level."""
    weight, table = stage_kernels(model, stage)
    matches = sobel_scores(weight, table, top=top)
    count, kh, kw = weight.shape
    return SobelReport(stage, count, (kh, kw), matches, chance_similarity(count, (kh, kw)))


KERNEL_PANEL = 5.5  # inches: the kernel grid of the filters figure
MATCH_CELL = 1.3  # inches: one template or kernel (with its two title lines) on the right
MATCH_SIDE = 0.85  # inches: the side of its image


def _unit_kernels(weight: np.ndarray) -> np.ndarray:
    """Each kernel divided by its largest absolute value (a zero kernel stays zero)."""
    scale = np.abs(weight).max(axis=(1, 2), keepdims=True)  # (K, 1, 1)
    return np.divide(weight, scale, out=np.zeros_like(weight), where=scale > 0)


def _small_panel(
    fig: Figure, column: int, row: int, label: str, kernel: np.ndarray, title: str, detail: str
) -> None:
    """One kernel in cell ``(row, column)`` of the 4-column grid right of the kernel grid."""
    width, height = fig.get_size_inches()
    left = KERNEL_PANEL + column * MATCH_CELL + (MATCH_CELL - MATCH_SIDE) / 2
    top = height - HEADER - 0.1 - row * MATCH_CELL
    ax = fig.add_axes(
        (left / width, (top - 0.4 - MATCH_SIDE) / height, MATCH_SIDE / width, MATCH_SIDE / height)
    )
    ax.set_label(label)
    show(ax, kernel[None], signed=True, limits=(-1.0, 1.0))
    middle = (left + MATCH_SIDE / 2) / width
    fig.text(middle, top / height, title, ha="center", va="top", fontsize=8.5, weight="bold")
    fig.text(middle, (top - 0.18) / height, detail, ha="center", va="top", fontsize=8)


def filters_figure(
    model: Network, stage: int = 1, *, report: SobelReport | None = None, note: str | None = None
) -> Figure:
    """A stage's learned kernels as a grid, beside each Sobel template and its best match.

    Left: the ``K`` kernels of :func:`stage_kernels` as a mosaic in table-row order, each
    divided by its largest absolute value (blue -1, white 0, red +1), so its shape shows
    whatever its norm. Right: for each of the 8 templates of :func:`sobel_templates`, in
    its stored form (:func:`as_stored`, turned by 180°) resized to the kernel size, so it
    looks like the kernels beside it, the rank-1 kernel of ``report`` (computed by
    :func:`sobel_report` when not given) with its similarity. Axes labels:
    ``"kernels"``, ``"template Gx"``, ``"match Gx"``, ...

    Size: 10.7 by 6.75 inches at :data:`DPI` (1070×675 px).
    """
    weight, _ = stage_kernels(model, stage)
    count, kh, kw = weight.shape
    if report is None:
        report = sobel_report(model, stage)
    elif (report.stage, report.kernels, report.kernel_size) != (stage, count, (kh, kw)):
        raise ValueError(
            f"report is of stage {report.stage} ({report.kernels} kernels "
            f"{report.kernel_size[0]}×{report.kernel_size[1]}), not of stage {stage} "
            f"({count} kernels {kh}×{kw})"
        )
    unit = _unit_kernels(weight)
    fig = Figure(
        figsize=(KERNEL_PANEL + 4 * MATCH_CELL, HEADER + TITLE_BAND + KERNEL_PANEL), dpi=DPI
    )
    ax = panel_axes(fig, 0, 0, KERNEL_PANEL)
    ax.set_label("kernels")
    show(ax, unit, signed=True, limits=(-1.0, 1.0))
    title = f"stage {stage} · {count} kernels {kh}×{kw}"
    band(fig, 0, 0, KERNEL_PANEL, title, "each scaled to its largest |value|, table-row order")
    templates = {name: resize_kernel(as_stored(t), (kh, kw)) for name, _, t in sobel_templates()}
    best = [m for m in report.matches if m.rank == 1]
    for i, m in enumerate(best):
        row, column = divmod(2 * i, 4)
        template = templates[m.template] / np.abs(templates[m.template]).max()
        _small_panel(
            fig,
            column,
            row,
            f"template {m.template}",
            template,
            m.template,
            f"{m.angle}°, as stored",
        )
        where = "" if m.input_map is None else f" ({m.input_map}→{m.output_map})"
        detail = f"cos {m.similarity:.3f}"
        _small_panel(
            fig,
            column + 1,
            row,
            f"match {m.template}",
            unit[m.kernel],
            f"kernel {m.kernel}{where}",
            detail,
        )
    width, height = fig.get_size_inches()
    fig.text(
        (KERNEL_PANEL + 2 * MATCH_CELL) / width,
        0.15 / height,
        f"cosine similarity with the 3×3 Sobel filter turned\nby 180° (a bank correlates) and "
        f"resized to {kh}×{kw};\nthe best of {count} random kernels would score\nabout "
        f"{report.chance:.2f}",
        ha="center",
        va="bottom",
        fontsize=8.5,
        color="#333",
        linespacing=1.4,
    )
    header(fig, " · ".join(part for part in (model.spec.name, note) if part))
    return fig
