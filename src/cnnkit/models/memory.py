"""A guard against networks whose activations cannot fit in memory.

The estimate counts, for one batch, every map a stage keeps alive while it runs: the
filter bank's output and one map of the same size per non-linearity and for the
normalization (plus two for its local mean and deviation), the pooled maps and the
stage's output, times the bytes of an element::

    bytes = batch * element_bytes * sum over stages of
            (filters_units * (1 + nonlinearities + 3 * normalized) + pooled_units + output_units)

It is a lower bound of what a forward pass needs; a backward pass needs about as much
again. The bound it is checked against is the memory the system reports as available
(``MemAvailable`` in ``/proc/meminfo``), or ``CNNKIT_MEMORY_LIMIT`` (bytes, or with a
``K``, ``M`` or ``G`` suffix, powers of 1024) when set.
"""

from __future__ import annotations

import math
import os

from cnnkit.models.spec import ArchitectureSpec

_SUFFIXES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def activation_bytes(spec: ArchitectureSpec, batch: int, element_bytes: int = 4) -> int:
    """The module docstring's estimate for ``batch`` images of ``spec``."""
    per_image = spec.input.maps * spec.input.height * spec.input.width
    for stage, shapes in zip(spec.stages, spec.shapes(), strict=True):
        filters = math.prod(shapes.filters)
        copies = 1 + len(stage.nonlinearity) + (3 if stage.norm is not None else 0)
        per_image += filters * copies + math.prod(shapes.output)
        if shapes.pooled is not None:
            per_image += math.prod(shapes.pooled)
    return per_image * batch * element_bytes


def memory_limit() -> int | None:
    """``CNNKIT_MEMORY_LIMIT`` if set, else the available memory; ``None`` if unknown."""
    text = os.environ.get("CNNKIT_MEMORY_LIMIT", "").strip()
    if text:
        number, suffix = text[:-1], text[-1].upper()
        if suffix not in _SUFFIXES or suffix == "":
            number, suffix = text, ""
        try:
            value = int(float(number) * _SUFFIXES[suffix])
        except ValueError:
            raise ValueError(
                f"CNNKIT_MEMORY_LIMIT must be a number of bytes, optionally with K, M or G, "
                f"got {text!r}"
            ) from None
        if value <= 0:
            raise ValueError(f"CNNKIT_MEMORY_LIMIT must be > 0, got {text!r}")
        return value
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_memory(spec: ArchitectureSpec, batch: int, what: str, element_bytes: int = 4) -> None:
    """Raise a ``ValueError`` if ``what`` (e.g. "a batch of 64") would
    need more memory than :func:`memory_limit`."""
    limit = memory_limit()
    need = activation_bytes(spec, batch, element_bytes)
    if limit is not None and need > limit:
        raise ValueError(
            f"the network {spec.name!r} at {spec.input.height}×{spec.input.width} needs at "
            f"least {_size(need)} for the activations of {what}, but {_size(limit)} is "
            "available; use a smaller input size, fewer maps, or a smaller --batch-size "
            "(CNNKIT_MEMORY_LIMIT sets the bound)"
        )
