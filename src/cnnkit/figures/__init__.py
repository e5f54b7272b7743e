"""Figures of a network at work: feature maps step by step, learned kernels against Sobel's
filters, training curves.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot``, so it
runs headless (PNG through Agg) and shows in a notebook; ``fig.savefig(path)`` writes it.
Each docstring gives the figure's size in inches; at :data:`DPI` (100) a figure of
``w x h`` inches saves as a ``100 w x 100 h`` pixel PNG.
"""

from cnnkit.figures._common import DPI, mosaic_shape, tile_maps, untile
from cnnkit.figures.curves import curves_figure
from cnnkit.figures.filters import (
    SOBEL_GX,
    SobelMatch,
    SobelReport,
    as_stored,
    chance_similarity,
    filters_figure,
    resize_kernel,
    sobel_report,
    sobel_scores,
    sobel_templates,
    stage_kernels,
)
from cnnkit.figures.maps import (
    DEFAULT_MAPS,
    MapStep,
    feature_maps,
    feature_maps_figure,
    first_pooling_stage,
    pooling_label,
    prepare_input,
    random_network,
)

__all__ = [
    "DEFAULT_MAPS",
    "DPI",
    "SOBEL_GX",
    "MapStep",
    "SobelMatch",
    "SobelReport",
    "as_stored",
    "chance_similarity",
    "curves_figure",
    "feature_maps",
    "feature_maps_figure",
    "filters_figure",
    "first_pooling_stage",
    "mosaic_shape",
    "pooling_label",
    "prepare_input",
    "random_network",
    "resize_kernel",
    "sobel_report",
    "sobel_scores",
    "sobel_templates",
    "stage_kernels",
    "tile_maps",
    "untile",
]
