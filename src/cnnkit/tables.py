"""Connection tables: which input maps feed which output maps of a filter bank.

A table is plain data, a ``(K, 2)`` ``int64`` tensor with one row per 2-D kernel: column 0
is the input map, column 1 the output map. Output map ``o`` of a filter bank is the sum,
over the rows ``r`` with ``table[r, 1] == o``, of input map ``table[r, 0]`` correlated with
kernel ``r`` (see :func:`cnnkit.ops.table_conv.table_conv2d`). The map counts are read from
the table itself: ``n_inputs(table) = max input + 1``, ``n_outputs(table) = max output + 1``.

The builders return rows sorted by output map, then input map:

- :func:`full` -- every input to every output (an ordinary convolution layer);
- :func:`one_to_one` -- input ``i`` to output ``i`` only;
- :func:`random` -- each output draws ``fan_in`` distinct inputs (the lecture's layer 3:
  256 maps, each from 16 of 64 maps, 4096 kernels), by default with every input used
  equally often, or with ``balanced=False`` independently for each output;
- :func:`lenet5_c3` -- the hand-made table of LeNet-5's layer C3.

:func:`check` validates a table and names the offending row; :func:`plan_table` checks it
once and builds the index tensors its filter bank needs (:class:`TablePlan`), and
:func:`dense_weight` scatters a bank's kernels into an ordinary convolution weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cnnkit._validation import check_nonnegative_int, check_positive_int

__all__ = [
    "TablePlan",
    "check",
    "dense_weight",
    "describe",
    "fan_in",
    "full",
    "lenet5_c3",
    "n_inputs",
    "n_outputs",
    "one_to_one",
    "plan_table",
    "random",
]


def _from_rows(rows: list[tuple[int, int]]) -> torch.Tensor:
    """Build a table from ``(input, output)`` pairs, sorted by output map then input map."""
    rows = sorted(rows, key=lambda row: (row[1], row[0]))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)  # (K, 2)


def full(n_in: int, n_out: int) -> torch.Tensor:
    """Connect every input map to every output map: ``n_in * n_out`` rows.

    A filter bank with this table is an ordinary ``n_in -> n_out`` convolution layer.
    """
    check_positive_int("n_in", n_in)
    check_positive_int("n_out", n_out)
    inputs = torch.arange(n_in).repeat(n_out)  # (n_out * n_in,)
    outputs = torch.arange(n_out).repeat_interleave(n_in)  # (n_out * n_in,)
    return torch.stack([inputs, outputs], dim=1)  # (K, 2)


def one_to_one(n: int) -> torch.Tensor:
    """Connect input map ``i`` to output map ``i`` only, for ``i = 0 .. n-1``: ``n`` rows."""
    check_positive_int("n", n)
    index = torch.arange(n)
    return torch.stack([index, index], dim=1)  # (n, 2)


def random(
    n_in: int, n_out: int, fan_in: int, seed: int = 0, *, balanced: bool = True
) -> torch.Tensor:
    """Give each output map ``fan_in`` distinct input maps drawn at random.

    Returns ``n_out * fan_in`` rows. Two draws:

    - ``balanced=True`` (the default, Torch7's ``nn.tables.random``): every input map is
      used equally often -- ``n_out * fan_in / n_in`` times when that divides exactly,
      otherwise the floor or the ceiling of it; so ``random(64, 256, 16)`` uses each of
      the 64 maps exactly 64 times. Outputs are filled in order; each takes the
      ``fan_in`` inputs used least so far, ties broken by uniform random keys. Taking the
      least used keeps every count within one of every other at all times, which is what
      makes the table balanced. One consequence: when ``fan_in`` divides ``n_in``, each
      run of ``n_in / fan_in`` consecutive outputs splits the inputs among themselves
      (outputs 0-3 of ``random(64, 256, 16)`` read 64 different maps).
    - ``balanced=False``: each output draws its ``fan_in`` inputs independently of the
      others, uniformly among all ``C(n_in, fan_in)`` subsets -- the lecture's "randomly
      select 16 feature maps out of 64" read literally. How many outputs an input feeds
      then varies (binomially, with mean ``n_out * fan_in / n_in``).

    The draws come from NumPy's PCG64 generator seeded with ``seed``, so a seed gives the
    same table on every run and machine.
    """
    check_positive_int("n_in", n_in)
    check_positive_int("n_out", n_out)
    check_positive_int("fan_in", fan_in)
    check_nonnegative_int("seed", seed)
    if not isinstance(balanced, bool):
        raise TypeError(f"balanced must be True or False, got {balanced!r}")
    if fan_in > n_in:
        raise ValueError(
            f"fan_in must be at most n_in ({n_in}): an output map cannot take the same "
            f"input map twice, got fan_in={fan_in}"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    rows = []
    if not balanced:
        for output in range(n_out):
            chosen = rng.choice(n_in, size=fan_in, replace=False)  # (fan_in,) distinct
            rows.extend((int(i), output) for i in chosen)
        return _from_rows(rows)
    uses = np.zeros(n_in, dtype=np.int64)
    for output in range(n_out):
        keys = rng.random(n_in)
        chosen = np.lexsort((keys, uses))[:fan_in]  # least used first, then by key
        uses[chosen] += 1
        rows.extend((int(i), output) for i in chosen)
    return _from_rows(rows)


# LeCun, Bottou, Bengio and Haffner (1998), "Gradient-based learning applied to document
# recognition", Table I: the S2 maps (0-5) that feed each of the 16 C3 maps.
_LENET5_C3 = (
    (0, 1, 2),
    (1, 2, 3),
    (2, 3, 4),
    (3, 4, 5),
    (4, 5, 0),
    (5, 0, 1),
    (0, 1, 2, 3),
    (1, 2, 3, 4),
    (2, 3, 4, 5),
    (3, 4, 5, 0),
    (4, 5, 0, 1),
    (5, 0, 1, 2),
    (0, 1, 3, 4),
    (1, 2, 4, 5),
    (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


def lenet5_c3() -> torch.Tensor:
    """LeNet-5's C3 table: 6 input maps to 16 output maps through 60 kernels.

    Maps 0-5 take 3 contiguous inputs (cyclically), maps 6-11 take 4 contiguous inputs,
    maps 12-14 take 4 non-contiguous inputs and map 15 takes all 6 (LeCun et al. 1998,
    Table I).
    """
    return _from_rows([(i, o) for o, inputs in enumerate(_LENET5_C3) for i in inputs])


def check(
    table: torch.Tensor,
    n_in: int | None = None,
    n_out: int | None = None,
    *,
    name: str = "table",
) -> torch.Tensor:
    """Validate a connection table and return it unchanged.

    A valid table is a ``(K, 2)`` integer tensor with ``K >= 1``, no negative entry, no
    repeated row, input maps below ``n_in`` and output maps below ``n_out`` (when given),
    and at least one row for every output map ``0 .. n_out - 1`` (``n_out`` defaulting
    to ``n_outputs(table)``). Errors name the offending row, e.g.
    ``table row 5 names input map 70, but only 64 input maps exist (0..63)``.
    """
    if not isinstance(table, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (K, 2), got {type(table).__name__}"
        )
    if table.dtype == torch.bool or table.is_floating_point() or table.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {table.dtype}")
    if table.dim() != 2 or table.shape[1] != 2 or table.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (K, 2) with K >= 1 rows of (input map, output map), "
            f"got shape {tuple(table.shape)}"
        )
    if n_in is not None:
        check_positive_int("n_in", n_in)
    if n_out is not None:
        check_positive_int("n_out", n_out)
    rows = table.detach().to("cpu", torch.int64)  # (K, 2)

    negative = (rows < 0).any(dim=1).nonzero()
    if len(negative):
        r = int(negative[0])
        raise ValueError(
            f"{name} row {r} has a negative map index: {tuple(rows[r].tolist())} "
            "(map indices start at 0)"
        )
    for column, role, limit in ((0, "input", n_in), (1, "output", n_out)):
        if limit is None:
            continue
        beyond = (rows[:, column] >= limit).nonzero()
        if len(beyond):
            r = int(beyond[0])
            raise ValueError(
                f"{name} row {r} names {role} map {int(rows[r, column])}, but only {limit} "
                f"{role} maps exist (0..{limit - 1})"
            )

    keys = rows[:, 0] * _maps_named(rows[:, 1]) + rows[:, 1]  # (K,) one key per pair
    order = torch.argsort(keys, stable=True)
    repeated = (keys[order][1:] == keys[order][:-1]).nonzero()
    if len(repeated):
        first, second = sorted(int(r) for r in order[int(repeated[0]) : int(repeated[0]) + 2])
        i, o = rows[first].tolist()
        raise ValueError(
            f"{name} rows {first} and {second} both connect input map {i} to output map {o}"
        )

    outputs = n_out if n_out is not None else _maps_named(rows[:, 1])
    empty = (torch.bincount(rows[:, 1], minlength=outputs) == 0).nonzero()
    if len(empty):
        raise ValueError(
            f"{name} gives output map {int(empty[0])} no input map (every output map "
            f"0..{outputs - 1} needs at least one row)"
        )
    return table


def _maps_named(column: torch.Tensor) -> int:
    """How many maps a column of a table implies: its largest map number + 1."""
    return int(column.max()) + 1


def n_inputs(table: torch.Tensor) -> int:
    """The number of input maps a table reads: its largest input map + 1."""
    check(table)
    return _maps_named(table[:, 0])


def n_outputs(table: torch.Tensor) -> int:
    """The number of output maps a table writes: its largest output map + 1."""
    check(table)
    return _maps_named(table[:, 1])


def fan_in(table: torch.Tensor) -> torch.Tensor:
    """How many input maps feed each output map: an ``int64`` tensor of ``n_outputs`` counts."""
    check(table)
    return torch.bincount(table[:, 1].to(torch.int64), minlength=n_outputs(table))


def describe(table: torch.Tensor, n_in: int | None = None) -> str:
    """A short name for a table's shape: ``"full"``, ``"one-to-one"``, ``"fan-in 16"``
    (every output has 16 inputs) or ``"fan-in 3-6"`` (the smallest and largest).

    ``n_in`` is the number of input maps when it exceeds ``n_inputs(table)``: a table
    that leaves some input maps unread is neither full nor one-to-one.
    """
    check(table, n_in=n_in)
    ins = n_in if n_in is not None else n_inputs(table)
    outs = n_outputs(table)
    if len(table) == ins * outs:  # rows are distinct, so every pair is present
        return "full"
    if ins == outs == len(table) and bool((table[:, 0] == table[:, 1]).all()):
        return "one-to-one"
    counts = fan_in(table)
    low, high = int(counts.min()), int(counts.max())
    return f"fan-in {low}" if low == high else f"fan-in {low}-{high}"


@dataclass(frozen=True, eq=False)
class TablePlan:
    """A connection table checked once, with the index tensors
    :func:`~cnnkit.ops.table_conv.table_conv2d` needs; pass it instead of the table to
    skip both on every call (a module holding a fixed table does).

    Attributes:
        table: the ``(K, 2)`` ``int64`` table.
        in_maps: the number of input maps it was checked against.
        out_maps: ``n_outputs(table)``.
        slot_rows: ``(in_maps, S)``, the table rows reading each input map, padded with
            ``K`` (a zero kernel); ``S`` is the most rows any input map has.
        slot_outputs: ``(in_maps, S)``, the output map of each of those rows, padded
            with ``out_maps`` (a discarded extra map).
    """

    table: torch.Tensor
    in_maps: int
    out_maps: int
    slot_rows: torch.Tensor
    slot_outputs: torch.Tensor

    def to(self, device: torch.device) -> TablePlan:
        """The plan with its tensors on ``device``."""
        if self.table.device == device:
            return self
        return TablePlan(
            self.table.to(device),
            self.in_maps,
            self.out_maps,
            self.slot_rows.to(device),
            self.slot_outputs.to(device),
        )


def plan_table(table: torch.Tensor, in_maps: int | None = None) -> TablePlan:
    """Check ``table`` (:func:`cnnkit.tables.check`, against ``in_maps`` input maps,
    default ``n_inputs(table)``) and build its :class:`TablePlan`."""
    check(table, n_in=in_maps)
    # ordinary tensors even under inference_mode: a later training step indexes with them
    with torch.inference_mode(False):
        return _build_plan(table.detach().clone(), in_maps)


def _build_plan(table: torch.Tensor, in_maps: int | None) -> TablePlan:
    table = table.to(dtype=torch.int64)
    rows = table.shape[0]
    in_maps = n_inputs(table) if in_maps is None else in_maps
    out_maps = _maps_named(table[:, 1])
    order = torch.argsort(table[:, 0], stable=True)  # rows grouped by input map
    inputs = table[order, 0]
    counts = torch.bincount(inputs, minlength=in_maps)  # (in_maps,)
    first = torch.cumsum(counts, 0) - counts  # position of each map's first row in order
    slot = torch.arange(rows, device=table.device) - first[inputs]
    slots = int(counts.max())
    slot_rows = torch.full((in_maps, slots), rows, dtype=torch.int64, device=table.device)
    slot_rows[inputs, slot] = order
    slot_outputs = torch.full_like(slot_rows, out_maps)
    slot_outputs[inputs, slot] = table[order, 1]
    return TablePlan(table, in_maps, out_maps, slot_rows, slot_outputs)


def dense_weight(
    weight: torch.Tensor,
    plan: TablePlan,
    c_in: int,
    layout: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """``(C_out, C_in, kh, kw)`` in ``layout``: each kernel at its table row's place, zeros
    elsewhere. The convolution writes its output in the layout of this weight."""
    return dense_from_rows(weight, plan.table, plan.out_maps, c_in, layout)


def dense_from_rows(
    weight: torch.Tensor,
    table: torch.Tensor,
    out_maps: int,
    c_in: int,
    layout: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """:func:`dense_weight` for a checked ``(K, 2)`` table of distinct rows and its number
    of output maps."""
    shape = (out_maps, c_in, *weight.shape[1:])
    dense = torch.empty(shape, dtype=weight.dtype, device=weight.device, memory_format=layout)
    return dense.zero_().index_put((table[:, 1], table[:, 0]), weight)  # rows are distinct
