"""Architecture specs: typed, validated descriptions of a multi-stage network.

A network is an input, a list of stages, and a classifier. Each stage is

    filter bank -> non-linearities -> normalization -> pooling (with subsampling)

with every part but the filter bank optional. Layer kinds are stored by name, so a spec
saves to TOML or JSON and loads back unchanged; nothing in a spec is a tensor.

Every dataclass checks its own fields in ``__post_init__``; :class:`ArchitectureSpec`
also walks the shapes stage by stage, so an impossible network is refused before any
tensor is built, with a message naming the stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit._shapes import valid_size
from cnnkit._validation import check_bool, check_choice, check_int, check_number
from cnnkit.models import _codec
from cnnkit.windowed_sum import BORDERS  # the normalization's borders, named once

NONLINEARITIES = ("abs", "relu", "tanh", "none")
TABLE_KINDS = ("full", "one-to-one", "random", "explicit")
NORM_KINDS = ("contrast", "subtractive", "divisive")
POOL_KINDS = ("max", "avg", "lp")
POOL_ACTIVATIONS = ("none", "tanh")
WEIGHT_SHARING = ("shared", "averaged", "none")
AVERAGED_STEPS = ("scaled", "literal")


_TOML_BOOL = ("true", "false")  # a spec's flags as its files spell them


def _positive(v: float) -> bool:
    return v > 0


# --------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """The image the network reads: ``maps`` planes of ``height`` x ``width`` pixels."""

    height: int
    width: int
    maps: int = 1

    def __post_init__(self) -> None:
        for name in ("height", "width", "maps"):
            check_int(f"input.{name}", getattr(self, name))


@dataclass(frozen=True)
class FilterBankSpec:
    """A bank of 2-D kernels joined to the previous maps by a connection table.

    ``table`` is ``"full"`` (every input to every output), ``"one-to-one"`` (map i to
    map i; needs as many outputs as inputs), ``"random"`` (each output draws ``fan_in``
    distinct inputs, seeded by ``seed``) or ``"explicit"`` (``connections`` lists the
    (input map, output map) pairs). For a random table, ``balanced = false`` draws each
    output's inputs independently instead of using every input equally often (unset:
    balanced; see :func:`cnnkit.tables.random`). ``trainable = false`` freezes the bank
    at its random initial kernels (Jarrett et al.'s random filters): training moves only
    the rest.
    """

    maps: int
    kernel: int
    table: str = "full"
    fan_in: int | None = None
    seed: int = 0
    connections: tuple[tuple[int, int], ...] | None = None
    bias: bool = True
    trainable: bool = True
    balanced: bool | None = None

    def __post_init__(self) -> None:
        where = "filters"
        for flag in ("bias", "trainable"):
            check_bool(f"filters.{flag}", getattr(self, flag), spelling=_TOML_BOOL)
        check_int("filters.maps", self.maps)
        check_int("filters.kernel", self.kernel)
        check_choice("filters.table", self.table, TABLE_KINDS)
        check_int("filters.seed", self.seed, minimum=0)
        if self.table == "random":
            if self.fan_in is None:
                raise ValueError(f"{where}: a random table needs fan_in")
            check_int("filters.fan_in", self.fan_in)
        elif self.fan_in is not None:
            raise ValueError(f"{where}: fan_in applies only to a random table, not {self.table!r}")
        if self.balanced is not None:
            check_bool("filters.balanced", self.balanced, spelling=_TOML_BOOL)
            if self.table != "random":
                raise ValueError(
                    f"{where}: balanced applies only to a random table, not {self.table!r}"
                )
        if self.table == "explicit":
            if not self.connections:
                raise ValueError(f"{where}: an explicit table needs a non-empty connections list")
            pairs = tuple(tuple(pair) for pair in self.connections)
            for row, pair in enumerate(pairs):
                if len(pair) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair
                ):
                    raise ValueError(
                        f"{where}: connections[{row}] must be a pair of non-negative "
                        f"integers (input map, output map), got {list(pair)!r}"
                    )
            object.__setattr__(self, "connections", pairs)
        elif self.connections is not None:
            raise ValueError(f"{where}: connections apply only to an explicit table")


@dataclass(frozen=True)
class NormSpec:
    """Local contrast normalization over a Gaussian ``window`` (see :mod:`cnnkit.ops`).

    ``kind`` is ``"contrast"`` (subtractive then divisive), ``"subtractive"`` or
    ``"divisive"``; ``threshold`` is the c of ``max(c, sigma)``: ``"mean"`` or a number.
    """

    kind: str = "contrast"
    window: int = 9
    sigma: float | None = None
    border: str = "renormalize"
    threshold: float | str = "mean"

    def __post_init__(self) -> None:
        check_choice("norm.kind", self.kind, NORM_KINDS)
        check_int("norm.window", self.window)
        if self.sigma is not None:
            check_number("norm.sigma", self.sigma, "> 0", _positive)
        check_choice("norm.border", self.border, BORDERS)
        check_number("norm.threshold", self.threshold, "> 0", _positive, choices=("mean",))


@dataclass(frozen=True)
class PoolSpec:
    """Pooling over ``window`` x ``window`` blocks, then subsampling at ``stride``.

    ``stride`` 1 keeps every pooled value. ``fused`` computes the pooled values only at
    the kept points (same numbers, less work). ``trainable`` adds a coefficient and a
    bias per map, followed by ``activation`` (LeNet-5's S-layers).
    """

    kind: str = "max"
    window: int = 2
    stride: int = 1
    p: float = 2.0
    fused: bool = True
    trainable: bool = False
    activation: str = "none"

    def __post_init__(self) -> None:
        check_choice("pool.kind", self.kind, POOL_KINDS)
        check_int("pool.window", self.window)
        check_int("pool.stride", self.stride)
        check_number("pool.p", self.p, "> 0", _positive)
        check_choice("pool.activation", self.activation, POOL_ACTIVATIONS)


@dataclass(frozen=True)
class StageSpec:
    """One stage: a filter bank, then non-linearities in order, normalization, pooling."""

    filters: FilterBankSpec
    nonlinearity: tuple[str, ...] = ("abs",)
    norm: NormSpec | None = None
    pool: PoolSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.nonlinearity, str):
            object.__setattr__(self, "nonlinearity", (self.nonlinearity,))
        object.__setattr__(self, "nonlinearity", tuple(self.nonlinearity))
        for name in self.nonlinearity:
            check_choice("stage.nonlinearity", name, NONLINEARITIES)


@dataclass(frozen=True)
class ClassifierSpec:
    """Flatten the last maps, an optional hidden layer, then a linear layer to ``classes``."""

    classes: int
    hidden: int | None = None
    hidden_activation: str = "tanh"

    def __post_init__(self) -> None:
        check_int("classifier.classes", self.classes, minimum=2)
        if self.hidden is not None:
            check_int("classifier.hidden", self.hidden)
        check_choice("classifier.hidden_activation", self.hidden_activation, NONLINEARITIES)


# --------------------------------------------------------------------------------------
# The whole network
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageShapes:
    """Map counts and sizes through one stage: (maps, height, width) after each step."""

    filters: tuple[int, int, int]
    pooled: tuple[int, int, int] | None
    output: tuple[int, int, int]


@dataclass(frozen=True)
class ArchitectureSpec:
    """A validated multi-stage network: input -> stages -> classifier.

    ``weight_sharing`` is ``"shared"`` (one kernel per table row, gradients summed over
    positions) or ``"averaged"`` (a kernel stored at every position, tied by averaging
    after each step, as in the lecture's Section 3). ``averaged_step`` applies to the
    latter: ``"scaled"`` multiplies each tied entry's gradient by its group's size, so a
    group moves as a shared weight would and ``averaged`` trains like ``shared``;
    ``"literal"`` keeps the lecture's rule, under which a group moves by the *mean* of its
    gradients, N times less than a shared weight (N = positions sharing it).
    ``"none"`` stores a kernel at every position like ``averaged`` but never ties them: a
    locally connected network with the convolution's connection tables, whose weights
    grow with the maps' area.
    """

    name: str
    input: InputSpec
    stages: tuple[StageSpec, ...]
    classifier: ClassifierSpec
    weight_sharing: str = "shared"
    averaged_step: str = "scaled"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ValueError("stages: a network needs at least one stage")
        check_choice("weight_sharing", self.weight_sharing, WEIGHT_SHARING)
        check_choice("averaged_step", self.averaged_step, AVERAGED_STEPS)
        self.shapes()  # walks the network and raises on the first impossible stage

    def shapes(self) -> list[StageShapes]:
        """The (maps, height, width) after each stage's filter bank, pooling and output."""
        maps, height, width = self.input.maps, self.input.height, self.input.width
        previous = "the input is"
        result = []
        for number, stage in enumerate(self.stages, start=1):
            where = f"stage {number}"
            bank = stage.filters
            k = bank.kernel
            if k > height or k > width:
                raise ValueError(
                    f"{where}: a {k}×{k} filter bank needs at least {k}×{k} input, "
                    f"but {previous} {height}×{width}"
                )
            _check_table(where, bank, maps)
            height, width, maps = valid_size(height, k), valid_size(width, k), bank.maps
            filtered = (maps, height, width)
            pooled = None
            if stage.pool is not None:
                window, stride = stage.pool.window, stage.pool.stride
                if window > height or window > width:
                    raise ValueError(
                        f"{where}: a {window}×{window} pooling window does not fit the "
                        f"{height}×{width} maps of its filter bank"
                    )
                height, width = (
                    valid_size(height, window, stride),
                    valid_size(width, window, stride),
                )
                pooled = (maps, height, width)
            result.append(
                StageShapes(filters=filtered, pooled=pooled, output=(maps, height, width))
            )
            previous = f"stage {number} leaves"
        return result

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(maps, height, width) of the last stage, which the classifier flattens."""
        return self.shapes()[-1].output

    def with_classes(self, classes: int) -> ArchitectureSpec:
        """The same network with a classifier for ``classes`` classes."""
        return dataclasses.replace(
            self, classifier=dataclasses.replace(self.classifier, classes=classes)
        )

    # Text and files go through cnnkit.models._codec, which knows no spec class;
    # cnnkit.models.serialize offers the same doors as plain functions.
    def to_dict(self) -> dict[str, Any]:
        """The spec as nested dicts and lists of str/int/float/bool."""
        data = _codec.plain(self)
        data["stages"] = [_codec.plain(stage) for stage in self.stages]
        return data

    def to_toml(self) -> str:
        """The spec as a TOML document (``[[stages]]`` tables in order)."""
        return _codec.dict_to_toml(self.to_dict())

    def to_json(self) -> str:
        return _codec.dict_to_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureSpec:
        """Rebuild a spec from :meth:`to_dict`'s output, checking every key."""
        return _spec_from_dict(cls, data)

    @classmethod
    def from_toml(cls, text: str) -> ArchitectureSpec:
        """Parse a TOML spec; a syntax error names its line and column."""
        return cls.from_dict(_codec.parse_toml(text))

    @classmethod
    def from_json(cls, text: str) -> ArchitectureSpec:
        """Parse a JSON spec; a syntax error names its line and column."""
        return cls.from_dict(_codec.parse_json(text))

    @classmethod
    def load(cls, path: str | Path) -> ArchitectureSpec:
        """Read a spec from a ``.toml`` or ``.json`` file; errors name the file."""
        suffix, text = _codec.read_spec_file(path)
        try:
            return cls.from_toml(text) if suffix == ".toml" else cls.from_json(text)
        except ValueError as error:
            raise ValueError(f"{Path(path)}: {error}") from None

    def save(self, path: str | Path) -> None:
        """Write the spec to ``path`` (TOML or JSON by its suffix), atomically."""
        _codec.write_spec_file(path, self.to_dict())


def _spec_from_dict(cls: type[ArchitectureSpec], data: Any) -> ArchitectureSpec:
    if not isinstance(data, dict):
        raise ValueError(f"spec: expected a table of keys, got {type(data).__name__}")
    data = dict(data)
    for key in ("name", "input", "stages", "classifier"):
        if key not in data:
            raise ValueError(f"spec: missing key {key!r}")
    if not isinstance(data["stages"], list):
        raise ValueError(f"spec: stages must be a list of stage tables, got {data['stages']!r}")
    stages = []
    for number, raw in enumerate(data["stages"], start=1):
        where = f"stage {number}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a table of keys, got {raw!r}")
        raw = dict(raw)
        if "filters" not in raw:
            raise ValueError(f"{where}: missing key 'filters'")
        raw["filters"] = _codec.build(FilterBankSpec, raw["filters"], f"{where} filters")
        if "norm" in raw:
            raw["norm"] = _codec.build(NormSpec, raw["norm"], f"{where} norm")
        if "pool" in raw:
            raw["pool"] = _codec.build(PoolSpec, raw["pool"], f"{where} pool")
        stages.append(_codec.build(StageSpec, raw, where))
    data["input"] = _codec.build(InputSpec, data["input"], "input")
    data["classifier"] = _codec.build(ClassifierSpec, data["classifier"], "classifier")
    data["stages"] = tuple(stages)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ValueError(f"spec: unknown key {key!r} (allowed: {', '.join(sorted(known))})")
    return cls(**data)


def _check_table(where: str, bank: FilterBankSpec, in_maps: int) -> None:
    """Refuse a table that cannot join ``in_maps`` inputs to ``bank.maps`` outputs."""
    if bank.table == "one-to-one" and bank.maps != in_maps:
        raise ValueError(
            f"{where}: a one-to-one table needs as many output maps as input maps "
            f"({in_maps}), got maps = {bank.maps}"
        )
    if bank.table == "random" and bank.fan_in is not None and bank.fan_in > in_maps:
        raise ValueError(
            f"{where}: a random table cannot draw fan_in = {bank.fan_in} distinct inputs "
            f"from {in_maps} maps"
        )
    if bank.table == "explicit":
        seen = set()
        for row, (i, o) in enumerate(bank.connections or ()):
            if i >= in_maps:
                raise ValueError(
                    f"{where}: table row {row} names input map {i}, but only {in_maps} "
                    f"maps (0..{in_maps - 1}) come in"
                )
            if o >= bank.maps:
                raise ValueError(
                    f"{where}: table row {row} names output map {o}, but the bank has "
                    f"{bank.maps} maps (0..{bank.maps - 1})"
                )
            if (i, o) in seen:
                raise ValueError(f"{where}: table row {row} repeats the pair ({i}, {o})")
            seen.add((i, o))
        fed = {o for _, o in seen}
        missing = [o for o in range(bank.maps) if o not in fed]
        if missing:
            raise ValueError(f"{where}: output map {missing[0]} has no input in the table")
