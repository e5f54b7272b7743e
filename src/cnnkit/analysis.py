"""The lecture's analysis of a network: shapes, weights, kernels and connections per layer.

Definitions used in every row (and in ``cnnkit summary --help``):

- **units**: values in the layer's output, maps × height × width.
- **weights** / **biases**: trainable parameters, counted separately. A connection-table
  filter bank stores one 2-D kernel per table row.
- **kernels**: 2-D kernels of the filter bank (the lecture's 4,096 in layer 3).
- **connections**: (input unit, output unit) pairs the layer joins, per image, through a
  weight or a window: for a filter bank, kernels × kernel area × output positions; for
  pooling, output units × window area; for normalization, every pair inside its window
  (cut at the borders; a contrast normalization counts its two windows); for an
  element-wise layer, one per unit.
- **multiply-adds**: products of a trainable weight and an input, per image (filter banks,
  trainable pooling coefficients, the classifier). Weight-free layers have none.

A fused pooling layer (``PoolSpec(fused=True)`` with a stride > 1, the presets' default)
pools only where subsampling keeps a value, so the network never holds the lecture's
stride-1 pooled maps (lecun83's 64@66×66, Figure 3). Its summary still shows the lecture's
two steps, as the rows an unfused network would have -- ``stageN.pool`` (pooling at stride
1, 66×66) and ``stageN.subsample`` (14×14) -- marked ``view="lecture"``. Their counts are
those of the fused layer, which is what runs: the pooling row carries its coefficients,
its connections (output units of the subsampled map × window area) and multiply-adds; the
subsampling row none. So totals are the same whether the two steps are shown or not.

Everything here is computed from a spec alone; :func:`parameter_counts` reads a built
model so the two can be compared.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from torch import nn

from cnnkit._shapes import valid_size
from cnnkit.models.layers import Layer, stage_layers
from cnnkit.models.spec import ArchitectureSpec, NormSpec, PoolSpec


@dataclass(frozen=True)
class LayerRow:
    """One layer of the summary: what it does and what it costs per image."""

    name: str
    operation: str
    maps: int
    height: int
    width: int
    weights: int = 0
    biases: int = 0
    kernels: int = 0
    connections: int = 0
    multiply_adds: int = 0
    # Untied filter banks (weight_sharing="averaged") store a kernel and a bias at every
    # output position; ``weights``/``biases`` then count the free (tied) values. With
    # weight_sharing="none" nothing is tied: every stored copy is a weight.
    stored_weights: int | None = None
    stored_biases: int | None = None
    # "lecture" on the two rows that show a fused pooling layer as the lecture's unfused
    # steps (their maps are not held by the network; their counts are the fused layer's).
    view: str | None = None

    @property
    def stored(self) -> int:
        """Entries held in memory: the stored copies for an untied bank, else the parameters."""
        if self.stored_weights is None:
            return self.weights + self.biases
        return self.stored_weights + (self.stored_biases or 0)

    @property
    def units(self) -> int:
        return self.maps * self.height * self.width

    @property
    def shape(self) -> str:
        return f"{self.maps}@{self.height}×{self.width}"


class _Total:
    """A read-only attribute of a :class:`Summary`: the sum of its rows' attribute of the
    same name."""

    def __init__(self, doc: str = "") -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, summary: Summary | None, owner: type | None = None) -> int:
        if summary is None:
            return self  # the class's attribute: this descriptor
        return sum(getattr(row, self.name) for row in summary.rows)


@dataclass(frozen=True)
class Summary:
    """All rows (the first is the input) and their totals."""

    spec: ArchitectureSpec
    rows: tuple[LayerRow, ...]

    weights = _Total("Trainable weights of every row.")
    biases = _Total("Trainable biases of every row.")
    kernels = _Total("2-D kernels of every filter bank.")
    stored = _Total("Parameter entries held in memory (differs from ``parameters`` when untied).")
    connections = _Total("Connections of every row, per image.")
    multiply_adds = _Total("Multiply-adds of every row, per image.")

    @property
    def parameters(self) -> int:
        return self.weights + self.biases

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r}; layers: {', '.join(r.name for r in self.rows)}")


@dataclass(frozen=True)
class DenseComparison:
    """Section 4: a fully connected layer from the input to a hidden layer, counted."""

    input_hw: tuple[int, int]
    hidden_hw: tuple[int, int]

    @property
    def input_units(self) -> int:
        return self.input_hw[0] * self.input_hw[1]

    @property
    def hidden_units(self) -> int:
        return self.hidden_hw[0] * self.hidden_hw[1]

    @property
    def weights(self) -> int:
        """One weight per (input pixel, hidden unit) pair."""
        return self.input_units * self.hidden_units


def dense_equivalent(input_hw: tuple[int, int], hidden_hw: tuple[int, int]) -> DenseComparison:
    """Weights of a fully connected layer, e.g. ``((1000, 1000), (100, 100))`` -> 10^10."""
    for name, hw in (("input_hw", input_hw), ("hidden_hw", hidden_hw)):
        if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
            raise ValueError(f"{name} must be two positive integers (height, width), got {hw!r}")
    return DenseComparison(tuple(input_hw), tuple(hidden_hw))


def _window_pairs(size: int, window: int) -> int:
    """Sum over the ``size`` positions of the window cells that fall inside, along one axis."""
    before = (window - 1) // 2
    return sum(sum(1 for p in range(window) if 0 <= j + p - before < size) for j in range(size))


def _norm_connections(norm: NormSpec, maps: int, height: int, width: int) -> int:
    per_window = (
        maps * maps * _window_pairs(height, norm.window) * _window_pairs(width, norm.window)
    )
    return per_window * (2 if norm.kind == "contrast" else 1)


def _table_size(kind: str, fan_in: int | None, connections, in_maps: int, out_maps: int) -> int:
    if kind == "full":
        return in_maps * out_maps
    if kind == "one-to-one":
        return out_maps
    if kind == "random":
        return fan_in * out_maps
    return len(connections)


def _describe_pool(pool: PoolSpec, *, stride_one: bool = False) -> str:
    """``"max pooling 10×10, subsampling 5"``; ``stride_one``: the pooling step alone."""
    kind = {"max": "max", "avg": "average", "lp": f"L{pool.p:g}"}[pool.kind]
    text = f"{kind} pooling {pool.window}×{pool.window}"
    if stride_one:
        text += ", stride 1"
    elif pool.stride > 1:
        text += f", subsampling {pool.stride}"
    if pool.trainable:
        text += ", trainable"
    return text


def _filter_row(layer: Layer, weight_sharing: str) -> LayerRow:
    bank, in_maps = layer.part, layer.input[0]
    k = bank.kernel
    kernels = _table_size(bank.table, bank.fan_in, bank.connections, in_maps, bank.maps)
    out_maps, out_h, out_w = layer.output
    untied = weight_sharing == "averaged"
    # weight_sharing="none": every position's kernel and bias is a free weight.
    copies = out_h * out_w if weight_sharing == "none" else 1
    table = {
        "full": "full",
        "one-to-one": "one-to-one",
        "random": f"{bank.fan_in} random of {in_maps}",
        "explicit": f"table of {kernels}",
    }[bank.table]
    return LayerRow(
        layer.path,
        f"filter bank {k}×{k}, {table}",
        *layer.output,
        weights=kernels * k * k * copies,
        biases=(out_maps if bank.bias else 0) * copies,
        kernels=kernels * copies,
        connections=kernels * k * k * out_h * out_w,
        multiply_adds=kernels * k * k * out_h * out_w,
        stored_weights=kernels * k * k * out_h * out_w if untied else None,
        stored_biases=(out_maps * out_h * out_w if bank.bias else 0) if untied else None,
    )


def _pool_rows(layer: Layer) -> list[LayerRow]:
    """A pooling layer's rows; a fused one (``stride > 1``) as the lecture's two steps."""
    pool, (maps, in_h, in_w) = layer.part, layer.input
    trainable = maps if pool.trainable else 0
    pooled_units = math.prod(layer.output)
    if layer.stride == 1:  # pooling at stride 1: alone, or before its own subsampling
        row = LayerRow(
            layer.path,
            _describe_pool(pool, stride_one=pool.stride > 1),
            *layer.output,
            weights=trainable,
            biases=trainable,
            connections=pooled_units * pool.window**2,
            multiply_adds=pooled_units if pool.trainable else 0,
        )
        return [row]
    # Fused: shown as pooling at stride 1, then subsampling, the lecture's two steps; it
    # evaluates only the kept windows, so those carry the counts.
    full = (maps, valid_size(in_h, pool.window), valid_size(in_w, pool.window))
    return [
        LayerRow(
            layer.path,
            _describe_pool(pool, stride_one=True),
            *full,
            weights=trainable,
            biases=trainable,
            connections=pooled_units * pool.window**2,
            multiply_adds=pooled_units if pool.trainable else 0,
            view="lecture",
        ),
        LayerRow(
            f"stage{layer.stage}.subsample",
            f"subsampling {pool.stride}",
            *layer.output,
            view="lecture",
        ),
    ]


def _stage_rows(layer: Layer, weight_sharing: str) -> list[LayerRow]:
    """The summary rows of one named layer (:mod:`cnnkit.models.layers`)."""
    units = math.prod(layer.output)
    if layer.kind == "filters":
        return [_filter_row(layer, weight_sharing)]
    if layer.kind == "nonlinearity":
        operation = {"abs": "rectification |x|", "relu": "ReLU", "tanh": "tanh"}[layer.part]
        return [LayerRow(layer.path, operation, *layer.output, connections=units)]
    if layer.kind == "norm":
        norm = layer.part
        return [
            LayerRow(
                layer.path,
                f"{norm.kind} normalization {norm.window}×{norm.window}",
                *layer.output,
                connections=_norm_connections(norm, *layer.output),
            )
        ]
    if layer.kind == "pool":
        return _pool_rows(layer)
    if layer.kind == "subsample":
        operation = f"subsampling {layer.stride}"
        return [LayerRow(layer.path, operation, *layer.output, connections=units)]
    return [LayerRow(layer.path, "tanh", *layer.output, connections=units)]  # pool_act


def summarize(spec: ArchitectureSpec) -> Summary:
    """Per-layer rows for ``spec``, in the order and with the names ``build`` uses
    (:func:`cnnkit.models.layers.stage_layers`)."""
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"spec must be an ArchitectureSpec, got {type(spec).__name__}")
    maps, height, width = spec.input.maps, spec.input.height, spec.input.width
    kind = "gray image" if maps == 1 else f"{maps}-map image"
    rows = [LayerRow("input", kind, maps, height, width)]
    for layers in stage_layers(spec):
        for layer in layers:
            rows += _stage_rows(layer, spec.weight_sharing)
        maps, height, width = layers[-1].output
    features = maps * height * width
    head = spec.classifier
    if head.hidden is not None:
        rows.append(
            LayerRow(
                "classifier.hidden",
                f"fully connected, {head.hidden_activation}",
                head.hidden,
                1,
                1,
                weights=features * head.hidden,
                biases=head.hidden,
                connections=features * head.hidden,
                multiply_adds=features * head.hidden,
            )
        )
        features = head.hidden
    rows.append(
        LayerRow(
            "classifier.output",
            "linear classifier",
            head.classes,
            1,
            1,
            weights=features * head.classes,
            biases=head.classes,
            connections=features * head.classes,
            multiply_adds=features * head.classes,
        )
    )
    return Summary(spec, tuple(rows))


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer name: (weights, biases)}`` stored in a built model's parameters.

    Parameters named ``bias`` count as biases, every other one as weights. For untied
    banks these are the stored entries (compare with ``LayerRow.stored_weights``).
    """
    counts: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        layer, _, leaf = name.rpartition(".")
        entry = counts.setdefault(layer, [0, 0])
        entry[1 if leaf == "bias" else 0] += parameter.numel()
    return {layer: (w, b) for layer, (w, b) in counts.items()}


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

_COLUMNS = (
    ("Layer", "name", "<"),
    ("Operation", "operation", "<"),
    ("Output", "shape", ">"),
    ("Units", "units", ">"),
    ("Weights", "weights", ">"),
    ("Biases", "biases", ">"),
    ("Kernels", "kernels", ">"),
    ("Connections", "connections", ">"),
    ("Mult-adds", "multiply_adds", ">"),
)


def _cell(value: object) -> str:
    if isinstance(value, int):
        return f"{value:,}" if value else "-"
    return str(value)


LECTURE_MARK = "*"
"""Appended to the operation of a row in the lecture's view in :func:`format_table`."""


def _text_cells(row: LayerRow) -> list[str]:
    cells = [_cell(getattr(row, attr)) for _, attr, _ in _COLUMNS]
    if row.view == "lecture":
        cells[1] += f" {LECTURE_MARK}"
    return cells


def format_table(summary: Summary, dense: DenseComparison | None = None) -> str:
    """Aligned text: one row per layer, then a totals footer (and Section 4's comparison).

    Rows in the lecture's view (a fused pooling layer shown as pooling at stride 1, then
    subsampling) are marked ``*`` after the operation, and a line below the table says so.
    """
    header = [title for title, _, _ in _COLUMNS]
    body = [_text_cells(row) for row in summary.rows]
    totals = ["Total", "", "", "", *(
        _cell(getattr(summary, attr))
        for attr in ("weights", "biases", "kernels", "connections", "multiply_adds")
    )]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *body, totals]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [
            f"{c:{align}{w}}" for c, w, (_, _, align) in zip(cells, widths, _COLUMNS, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "─" * len(line(header))
    spec = summary.spec
    out = [f"{spec.name}: {summary.rows[0].shape} input -> {spec.classifier.classes} classes", rule]
    out += [line(header), rule, *(line(r) for r in body), rule, line(totals)]
    out.append(
        f"Trainable parameters: {summary.parameters:,} "
        f"({summary.weights:,} weights + {summary.biases:,} biases)"
    )
    if any(row.view == "lecture" for row in summary.rows):
        out.append(
            f"{LECTURE_MARK} the lecture's view of a fused pooling layer: pooling at stride 1, "
            "then subsampling;"
        )
        out.append(
            "  the layer pools only where subsampling keeps a value, and these rows count what "
            "it computes"
        )
    if summary.stored != summary.parameters:
        out.append(
            f"Stored entries: {summary.stored:,} (filter banks hold a kernel at every "
            f"position, tied by averaging); free values: {summary.parameters:,}"
        )
    if dense is not None:
        out += ["", *_dense_lines(summary, dense)]
    return "\n".join(out)


def _dense_lines(summary: Summary, dense: DenseComparison) -> list[str]:
    first = summary.rows[1]
    ratio = dense.weights / first.weights
    return [
        f"Fully connected {dense.input_hw[0]}×{dense.input_hw[1]} input -> "
        f"{dense.hidden_hw[0]}×{dense.hidden_hw[1]} hidden: "
        f"{dense.input_units:,} × {dense.hidden_units:,} = {dense.weights:,} weights",
        f"First filter bank ({first.operation}): {first.weights:,} weights, "
        f"whatever the image size — {ratio:,.0f}× fewer",
    ]


def to_json(summary: Summary, dense: DenseComparison | None = None) -> str:
    """The summary for scripts: every row with its units and shape, plus totals.

    A row in the lecture's view has ``"view": "lecture"``; other rows have no ``view`` key.
    """
    rows = []
    for row in summary.rows:
        data = asdict(row)
        view = data.pop("view")
        data.update(units=row.units, shape=row.shape, stored=row.stored)
        if view is not None:
            data["view"] = view
        rows.append(data)
    result = {
        "name": summary.spec.name,
        "rows": rows,
        "totals": {
            "weights": summary.weights,
            "biases": summary.biases,
            "parameters": summary.parameters,
            "kernels": summary.kernels,
            "connections": summary.connections,
            "multiply_adds": summary.multiply_adds,
            "stored": summary.stored,
        },
    }
    if dense is not None:
        result["dense"] = {
            "input_hw": list(dense.input_hw),
            "hidden_hw": list(dense.hidden_hw),
            "input_units": dense.input_units,
            "hidden_units": dense.hidden_units,
            "weights": dense.weights,
            "first_filter_bank_weights": summary.rows[1].weights,
        }
    return json.dumps(result, indent=2)
