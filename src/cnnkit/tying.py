"""Tied weights held equal by averaging after every step (the lecture's Section 3).

The home of these names is :mod:`cnnkit.nn.tying`, beside the untied layer they tie; this
module keeps the old door open with the same objects.
"""

from cnnkit.nn.tying import (
    TieCounts,
    TieGroups,
    TieHandle,
    check_tied,
    convolution_groups,
    free_parameters,
    is_tied,
    project_,
    scale_gradients_by_group_size,
    stored_and_free,
    stored_entries,
    tie_after_step,
)

__all__ = [
    "TieCounts",
    "TieGroups",
    "TieHandle",
    "check_tied",
    "convolution_groups",
    "free_parameters",
    "is_tied",
    "project_",
    "scale_gradients_by_group_size",
    "stored_and_free",
    "stored_entries",
    "tie_after_step",
]
