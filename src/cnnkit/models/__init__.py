"""Architecture specs, named presets and the builder that turns a spec into a module."""

from cnnkit.models.build import Network, build
from cnnkit.models.layers import Layer, stage_layers
from cnnkit.models.presets import from_name, list_presets
from cnnkit.models.serialize import load_spec, save_spec
from cnnkit.models.spec import (
    ArchitectureSpec,
    ClassifierSpec,
    FilterBankSpec,
    InputSpec,
    NormSpec,
    PoolSpec,
    StageSpec,
)

__all__ = [
    "ArchitectureSpec",
    "ClassifierSpec",
    "FilterBankSpec",
    "InputSpec",
    "Layer",
    "Network",
    "NormSpec",
    "PoolSpec",
    "StageSpec",
    "build",
    "from_name",
    "list_presets",
    "load_spec",
    "save_spec",
    "stage_layers",
]
