"""Named networks: the lecture's ``lecun83``, LeNet-5, and a small one for 28×28 digits.

``from_name(name, **overrides)`` returns an :class:`ArchitectureSpec`; the overrides each
preset accepts are the keyword arguments of its builder function below.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from cnnkit import tables
from cnnkit.models.spec import (
    ArchitectureSpec,
    ClassifierSpec,
    FilterBankSpec,
    InputSpec,
    NormSpec,
    PoolSpec,
    StageSpec,
)


def lecun83(
    classes: int = 101,
    pooling: str = "max",
    nonlinearity: str = "abs",
    normalization: bool = True,
    p: float = 2.0,
    weight_sharing: str = "shared",
) -> ArchitectureSpec:
    """The lecture's Figure 1 network (LeCun's multi-stage example).

    83×83 gray input (6,889 units) -> 64 kernels 9×9 -> 64@75×75 -> non-linearity ->
    contrast normalization (9×9 Gaussian) -> pooling 10×10 (64@66×66) -> subsampling 5
    (64@14×14) -> 256 maps, each from 16 random maps of the 64 (4,096 kernels of 9×9)
    -> 256@6×6 -> non-linearity -> normalization -> pooling 6×6, subsampling 4 ->
    256@1×1 -> linear classifier. With the defaults: 363,237 trainable parameters.
    """
    return _lecture_kind(_LECUN83, classes, pooling, nonlinearity, normalization, weight_sharing, p)


def lenet5(classes: int = 10, weight_sharing: str = "shared") -> ArchitectureSpec:
    """LeNet-5 (LeCun et al., 1998) on 32×32 input, with a linear output layer.

    C1 6@28×28 (5×5) -> S2 2×2 average, trainable coefficient and bias per map -> C3
    16@10×10 from the paper's 60-connection table -> S4 like S2 -> C5 120@1×1 (5×5, full)
    -> F6 84 tanh -> linear 10-way output (the paper's RBF units replaced). tanh follows
    every C- and S-layer. 60,850 trainable parameters.
    """
    subsampling = PoolSpec(kind="avg", window=2, stride=2, trainable=True, activation="tanh")
    return ArchitectureSpec(
        name="lenet5",
        input=InputSpec(height=32, width=32, maps=1),
        stages=(
            StageSpec(
                filters=FilterBankSpec(maps=6, kernel=5),
                nonlinearity=("tanh",),
                pool=subsampling,
            ),
            StageSpec(
                filters=FilterBankSpec(
                    maps=16, kernel=5, table="explicit", connections=LENET5_C3_TABLE
                ),
                nonlinearity=("tanh",),
                pool=subsampling,
            ),
            StageSpec(filters=FilterBankSpec(maps=120, kernel=5), nonlinearity=("tanh",)),
        ),
        classifier=ClassifierSpec(classes=classes, hidden=84, hidden_activation="tanh"),
        weight_sharing=weight_sharing,
    )


def digits28(
    classes: int = 10,
    pooling: str = "max",
    nonlinearity: str = "abs",
    normalization: bool = True,
    weight_sharing: str = "shared",
) -> ArchitectureSpec:
    """A small two-stage network of the lecture's kind for 28×28 digits (fast to train).

    28×28 -> 16 kernels 5×5 -> 16@24×24 -> non-linearity -> contrast normalization (5×5)
    -> max pooling 2, subsampling 2 (16@12×12) -> 32 maps, each from 8 random maps of the
    16 (256 kernels 5×5) -> 32@8×8 -> non-linearity -> normalization -> pooling 2,
    subsampling 2 -> 32@4×4 -> linear classifier.
    """
    return _lecture_kind(_DIGITS28, classes, pooling, nonlinearity, normalization, weight_sharing)


@dataclass(frozen=True)
class _Geometry:
    """The sizes of a two-stage network of the lecture's kind (see :func:`_lecture_kind`)."""

    name: str
    side: int
    kernel: int
    maps: tuple[int, int]
    fan_in: int
    pools: tuple[tuple[int, int], tuple[int, int]]  # (window, stride) of each stage


_LECUN83 = _Geometry("lecun83", 83, kernel=9, maps=(64, 256), fan_in=16, pools=((10, 5), (6, 4)))
_DIGITS28 = _Geometry("digits28", 28, kernel=5, maps=(16, 32), fan_in=8, pools=((2, 2), (2, 2)))


def _lecture_kind(
    size: _Geometry,
    classes: int,
    pooling: str,
    nonlinearity: str,
    normalization: bool,
    weight_sharing: str,
    p: float = 2.0,
) -> ArchitectureSpec:
    """Two stages of the lecture's kind on a ``size.side`` x ``size.side`` gray image.

    A full bank of ``size.maps[0]`` kernels, then ``size.maps[1]`` maps each reading
    ``size.fan_in`` random maps of the first (seed 0), all kernels ``size.kernel`` square;
    each bank followed by the non-linearity, contrast normalization over a window of the
    kernel's size (when ``normalization``) and pooling over ``size.pools[i] = (window,
    stride)``, then a linear classifier. The other arguments are the presets' options.
    """
    kernel, (first, second) = size.kernel, size.maps
    norm = NormSpec(kind="contrast", window=kernel) if normalization else None
    banks = (
        FilterBankSpec(maps=first, kernel=kernel, table="full"),
        FilterBankSpec(maps=second, kernel=kernel, table="random", fan_in=size.fan_in, seed=0),
    )
    stages = tuple(
        StageSpec(
            filters=bank,
            nonlinearity=(nonlinearity,),
            norm=norm,
            pool=PoolSpec(kind=pooling, window=window, stride=stride, p=p),
        )
        for bank, (window, stride) in zip(banks, size.pools, strict=True)
    )
    return ArchitectureSpec(
        name=size.name,
        input=InputSpec(height=size.side, width=size.side, maps=1),
        stages=stages,
        classifier=ClassifierSpec(classes=classes),
        weight_sharing=weight_sharing,
    )


# LeNet-5's C3 table (LeCun et al. 1998, Table I) as (S2 map, C3 map) pairs.
LENET5_C3_TABLE: tuple[tuple[int, int], ...] = tuple(
    (int(i), int(o)) for i, o in tables.lenet5_c3().tolist()
)

PRESETS: dict[str, Callable[..., ArchitectureSpec]] = {
    "lecun83": lecun83,
    "lenet5": lenet5,
    "digits28": digits28,
}


def list_presets() -> list[str]:
    """Names accepted by :func:`from_name`."""
    return sorted(PRESETS)


def from_name(name: str, **overrides: object) -> ArchitectureSpec:
    """The preset ``name`` with ``overrides`` applied, e.g. ``from_name("lecun83", classes=10)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(list_presets())}")
    builder = PRESETS[name]
    accepted = inspect.signature(builder).parameters
    for key in overrides:
        if key not in accepted:
            raise ValueError(
                f"preset {name!r} has no option {key!r}; it accepts {', '.join(accepted)}"
            )
    return builder(**overrides)
