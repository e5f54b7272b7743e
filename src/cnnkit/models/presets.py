"""Named networks: the lecture's ``lecun83``, LeNet-5, and a small one for 28×28 digits.

``from_name(name, **overrides)`` returns an :class:`ArchitectureSpec`; the overrides each
preset accepts are the keyword arguments of its builder function below.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

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
    norm = NormSpec(kind="contrast", window=9) if normalization else None
    nonlin = (nonlinearity,)
    return ArchitectureSpec(
        name="lecun83",
        input=InputSpec(height=83, width=83, maps=1),
        stages=(
            StageSpec(
                filters=FilterBankSpec(maps=64, kernel=9, table="full"),
                nonlinearity=nonlin,
                norm=norm,
                pool=PoolSpec(kind=pooling, window=10, stride=5, p=p),
            ),
            StageSpec(
                filters=FilterBankSpec(maps=256, kernel=9, table="random", fan_in=16, seed=0),
                nonlinearity=nonlin,
                norm=norm,
                pool=PoolSpec(kind=pooling, window=6, stride=4, p=p),
            ),
        ),
        classifier=ClassifierSpec(classes=classes),
        weight_sharing=weight_sharing,
    )


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
    norm = NormSpec(kind="contrast", window=5) if normalization else None
    nonlin = (nonlinearity,)
    return ArchitectureSpec(
        name="digits28",
        input=InputSpec(height=28, width=28, maps=1),
        stages=(
            StageSpec(
                filters=FilterBankSpec(maps=16, kernel=5),
                nonlinearity=nonlin,
                norm=norm,
                pool=PoolSpec(kind=pooling, window=2, stride=2),
            ),
            StageSpec(
                filters=FilterBankSpec(maps=32, kernel=5, table="random", fan_in=8, seed=0),
                nonlinearity=nonlin,
                norm=norm,
                pool=PoolSpec(kind=pooling, window=2, stride=2),
            ),
        ),
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
