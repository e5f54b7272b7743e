"""Studies made of ordinary training runs: weight sharing against locally and fully
connected networks (:func:`sharing`), Jarrett et al.'s ablation grid (:func:`jarrett`),
and grids of any spec or training fields from a TOML file (:func:`grid`)."""

from cnnkit.experiments.families import FAMILIES, Family, families, first_layer_weights
from cnnkit.experiments.grid import Grid, grid, load_grid
from cnnkit.experiments.jarrett import jarrett
from cnnkit.experiments.sharing import sharing

__all__ = [
    "FAMILIES",
    "Family",
    "Grid",
    "families",
    "first_layer_weights",
    "grid",
    "jarrett",
    "load_grid",
    "sharing",
]
