"""The three networks of the weight-sharing study, and their first layer's weight count.

They read the same image and differ only in how the first layers connect:

- ``convolutional``: the preset as it is -- one kernel per connection-table row, slid over
  the whole map (``weight_sharing = "shared"``);
- ``locally_connected``: the same stages with a kernel and a bias at every output
  position, never tied (``weight_sharing = "none"``): the same outputs read the same
  inputs, but nothing is shared;
- ``fully_connected``: one hidden layer with as many units as the preset's first filter
  bank has outputs (``maps x H_out x W_out``), each joined to every input pixel, the first
  stage's non-linearity, then the linear classifier. It is written as a one-stage spec
  whose filter bank has a kernel as large as the image: each of its maps is then a single
  unit that sees every pixel, which is exactly a dense layer.
"""

from __future__ import annotations

import dataclasses

from cnnkit._shapes import valid_size
from cnnkit.analysis import summarize
from cnnkit.models.spec import ArchitectureSpec, ClassifierSpec, FilterBankSpec, StageSpec

FAMILIES = ("convolutional", "locally_connected", "fully_connected")
DENSE_LIMIT_BYTES = 256 * 2**20
"""Largest float32 weight matrix the fully connected family may have (256 MiB)."""


@dataclasses.dataclass(frozen=True)
class Family:
    """One family's network; ``note`` says what was changed to make it fit, if anything."""

    name: str
    spec: ArchitectureSpec
    note: str | None = None


def dense_units(spec: ArchitectureSpec) -> int:
    """Outputs of ``spec``'s first filter bank: ``maps x H_out x W_out``."""
    maps, height, width = spec.shapes()[0].filters
    return maps * height * width


def families(spec: ArchitectureSpec) -> list[Family]:
    """The convolutional, locally connected and fully connected networks made from ``spec``.

    The fully connected network has ``dense_units(spec)`` hidden units unless their
    ``units x maps x H x W`` float32 weights would pass :data:`DENSE_LIMIT_BYTES`; then
    as many units as fit, and ``note`` says so.
    """
    if spec.input.height != spec.input.width:
        raise ValueError(
            f"the fully connected family needs a square input, but {spec.name!r} reads "
            f"{spec.input.height}×{spec.input.width}"
        )
    conv = dataclasses.replace(spec, weight_sharing="shared")
    local = dataclasses.replace(spec, name=f"{spec.name}-local", weight_sharing="none")
    pixels = spec.input.maps * spec.input.height * spec.input.width
    wanted = dense_units(spec)
    fitting = DENSE_LIMIT_BYTES // (4 * pixels)
    units, note = wanted, None
    if wanted > fitting:
        units = fitting
        note = (
            f"fully connected: {wanted:,} hidden units would need "
            f"{wanted * pixels * 4 / 2**20:,.0f} MiB of float32 weights; capped to "
            f"{units:,} units to stay within 256 MiB"
        )
    first = spec.stages[0]
    dense = ArchitectureSpec(
        name=f"{spec.name}-dense",
        input=spec.input,
        stages=(
            StageSpec(
                filters=FilterBankSpec(maps=units, kernel=spec.input.height),
                nonlinearity=first.nonlinearity,
            ),
        ),
        classifier=ClassifierSpec(classes=spec.classifier.classes),
    )
    return [
        Family("convolutional", conv),
        Family("locally_connected", local),
        Family("fully_connected", dense, note),
    ]


def first_layer_weights(family: str, spec: ArchitectureSpec, size: int) -> int:
    """Weights and biases between a ``size x size`` input and the first hidden layer.

    With the first bank's ``K`` table rows of ``k x k`` kernels into ``M`` maps and
    ``P = (size - k + 1)^2`` output positions, the input's maps ``C``:

    - convolutional: ``K k^2 + M`` -- the same for every ``size``;
    - locally connected: ``(K k^2 + M) P``;
    - fully connected: ``(C size^2 + 1) M P`` (``M P`` units, uncapped), each reading
      every input unit.
    """
    bank = spec.stages[0].filters
    small = dataclasses.replace(spec, stages=spec.stages[:1], weight_sharing="shared")
    row = summarize(small).row("stage1.filters")
    shared = row.weights + row.biases
    if bank.kernel > size:
        raise ValueError(f"input size {size} is smaller than the first kernel ({bank.kernel})")
    positions = valid_size(size, bank.kernel) ** 2
    if family == "convolutional":
        return shared
    if family == "locally_connected":
        return shared * positions
    if family == "fully_connected":
        return (spec.input.maps * size * size + 1) * bank.maps * positions
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
