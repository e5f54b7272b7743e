"""A filter bank whose kernels are not shared: one kernel and one bias per output position.

:class:`LocallyConnected2d` is the untied form of a convolution. Where a convolutional
filter bank slides one ``kh x kw`` kernel over the whole input map, this layer keeps a
separate kernel (and a separate bias) at every output position. Tying all the positions
of each kernel together (:func:`cnnkit.tying.convolution_groups`) turns it back into the
convolution, which is how the lecture's Section 3 trains a CNN: untied weights held equal
by averaging after every step.

Connections follow a connection table, as in :mod:`cnnkit.tables`: a ``(K, 2)`` integer
tensor whose row ``r = (i, o)`` says that kernel ``r`` reads input map ``i`` and adds into
output map ``o``; ``table=None`` means :func:`cnnkit.tables.full`. The layer keeps its
table with the rows sorted by input map, then output map (``layer.table``), and
``weight[:, :, r]`` belongs to row ``r`` of that sorted table: then every input map's
rows are contiguous and the forward pass needs no rearranging of the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit import tables
from cnnkit._validation import check_maps, check_positive_int, pair
from cnnkit.nn.filter_bank import FilterBank

__all__ = ["LocallyConnected2d", "locally_connected2d", "untie_filter_banks"]


def _output_hw(input_hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]):
    (h, w), (kh, kw), (sh, sw) = input_hw, kernel, stride
    if kh > h or kw > w:
        raise ValueError(
            f"kernel_size {kernel} does not fit in input_hw {input_hw}: "
            "a valid filter needs kernel <= input on both axes"
        )
    return ((h - kh) // sh + 1, (w - kw) // sw + 1)


class _Layout(NamedTuple):
    """The table's rows grouped by input map, each map padded to the same number of slots.

    Row ``r`` goes to flat slot ``row_slot[r] = table[r, 0] * slots + (rank of r among the
    rows reading the same input map)``; ``slot_output[s]`` is the output map of slot ``s``
    (0 for an empty padding slot, whose weight stays zero); ``slots`` is the largest number
    of rows reading one input map; ``dense`` says that ``row_slot`` is ``0..K-1`` (rows
    already sorted by input map, no padding), so the weight needs no rearranging;
    ``identity`` that moreover slot ``s`` feeds output map ``s`` (one input map, rows in
    output order), so the slots need no summing into outputs.
    """

    row_slot: torch.Tensor
    slot_output: torch.Tensor
    slots: int
    dense: bool
    identity: bool


def _row_order(table: torch.Tensor) -> torch.Tensor:
    """The permutation sorting a table's rows by input map, then output map."""
    keys = table[:, 0] * (int(table[:, 1].max()) + 1) + table[:, 1]  # (K,)
    return torch.argsort(keys, stable=True)


def _layout(table: torch.Tensor, in_maps: int) -> _Layout:
    inputs = table[:, 0]
    counts = torch.bincount(inputs, minlength=in_maps)  # (in_maps,)
    slots = int(counts.max())
    order = torch.argsort(inputs, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inputs)
    rank[order] = torch.arange(len(inputs), device=table.device) - starts[inputs[order]]
    row_slot = inputs * slots + rank  # (K,)
    slot_output = torch.zeros(in_maps * slots, dtype=torch.int64, device=table.device)
    slot_output[row_slot] = table[:, 1]
    dense = len(inputs) == in_maps * slots and bool(
        (row_slot == torch.arange(len(inputs), device=table.device)).all()
    )
    out_maps = int(table[:, 1].max()) + 1
    identity = (
        dense
        and in_maps * slots == out_maps
        and bool((slot_output == torch.arange(out_maps, device=table.device)).all())
    )
    return _Layout(row_slot, slot_output, slots, dense, identity)


def _locally_connected(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_maps: int,
    out_maps: int,
    stride: tuple[int, int],
    layout: _Layout,
) -> torch.Tensor:
    out_h, out_w, rows, kh, kw = weight.shape
    n, positions, taps, slots = x.shape[0], out_h * out_w, kh * kw, layout.slots
    # One small matrix product per (position, input map): that map's unfolded patches
    # times the kernels of the rows reading it, at that position.
    cols = F.unfold(x, (kh, kw), stride=stride)  # (N, C*kh*kw, L)
    cols = cols.view(n, in_maps, taps, positions).permute(3, 1, 0, 2)  # (L, C, N, kh*kw)
    cols = cols.reshape(positions * in_maps, n, taps)  # (L*C, N, kh*kw)
    w = weight.reshape(positions, rows, taps)  # (L, K, kh*kw)
    if not layout.dense:  # pad every input map to `slots` rows, zeros where it has fewer
        w = w.new_zeros(positions, in_maps * slots, taps).index_copy(1, layout.row_slot, w)
    w = w.reshape(positions * in_maps, slots, taps)  # (L*C, S, kh*kw)
    per_slot = torch.bmm(cols, w.transpose(1, 2))  # (L*C, N, S)
    if layout.identity:
        out = per_slot.view(positions, n, out_maps)  # (L, N, C_out)
    else:
        per_slot = per_slot.view(positions, in_maps, n, slots).transpose(1, 2)  # (L, N, C, S)
        per_slot = per_slot.reshape(positions, n, in_maps * slots)  # (L, N, C*S)
        out = per_slot.new_zeros(positions, n, out_maps)
        out = out.index_add(2, layout.slot_output, per_slot)  # (L, N, C_out)
    out = out.permute(1, 2, 0).reshape(n, out_maps, out_h, out_w)  # (N, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias
    return out


def locally_connected2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Valid 2-D filtering with a separate kernel and bias at every output position.

    Shapes:
        ``x``: ``(N, C_in, H, W)`` or ``(C_in, H, W)``.
        ``weight``: ``(H_out, W_out, K, kh, kw)``, kernel of table row ``r`` at output
        position ``(p, q)`` in ``weight[p, q, r]``.
        ``bias``: ``(C_out, H_out, W_out)`` or ``None``.
        ``table``: ``(K, 2)`` rows ``(input map, output map)`` in any order; ``None`` is the
        full table in :class:`LocallyConnected2d`'s order (``K = C_in * C_out``, row
        ``i * C_out + o`` = ``(i, o)``, so ``C_out = K / C_in``).
        Output: ``(N, C_out, H_out, W_out)`` with ``H_out = (H - kh) // s_h + 1`` and
        ``W_out = (W - kw) // s_w + 1`` (no padding).

    Math (correlation, as deep-learning convolutions and :class:`FilterBank` compute it)::

        out[n, o, p, q] = bias[o, p, q]
            + sum over rows r with table[r, 1] == o of
              sum_{u, v} x[n, table[r, 0], p*s_h + u, q*s_w + v] * weight[p, q, r, u, v]

    With ``weight[p, q, r]`` the same for every ``(p, q)`` and ``bias[o]`` constant over
    positions this is the connection-table convolution.
    """
    unbatched = check_maps("x", x)
    if weight.dim() != 5:
        raise ValueError(
            f"weight must have shape (H_out, W_out, K, kh, kw), got {tuple(weight.shape)}"
        )
    out_h, out_w, rows, kh, kw = weight.shape
    in_maps = x.shape[-3]
    if table is None:
        if rows % in_maps != 0:
            raise ValueError(
                f"weight has K={rows} rows, which a full table over {in_maps} input maps "
                "cannot have (K must be in_maps * out_maps); pass table"
            )
        out_maps = rows // in_maps
        table = tables.full(in_maps, out_maps)
        table = table[_row_order(table)]  # (K, 2) the layer's order: by input, then output
    else:
        tables.check(table, n_in=in_maps)
        out_maps = int(table[:, 1].max()) + 1
        if table.shape[0] != rows:
            raise ValueError(
                f"weight has K={rows} kernels per position but table has {table.shape[0]} rows"
            )
    stride = pair("stride", stride)
    expected = _output_hw(tuple(x.shape[-2:]), (kh, kw), stride)
    if expected != (out_h, out_w):
        raise ValueError(
            f"weight has {out_h}x{out_w} positions, but a {kh}x{kw} kernel at stride {stride} "
            f"on a {tuple(x.shape[-2:])} input gives {expected[0]}x{expected[1]}"
        )
    if bias is not None and tuple(bias.shape) != (out_maps, out_h, out_w):
        raise ValueError(
            f"bias must have shape {(out_maps, out_h, out_w)}, got {tuple(bias.shape)}"
        )
    xb = x.unsqueeze(0) if unbatched else x
    layout = _layout(table.to(device=x.device, dtype=torch.int64), in_maps)
    out = _locally_connected(xb, weight, bias, in_maps, out_maps, stride, layout)
    return out.squeeze(0) if unbatched else out


class LocallyConnected2d(nn.Module):
    """A connection-table filter bank with untied weights: its own kernel at every position.

    Args:
        in_maps: number of input maps ``C_in``.
        out_maps: number of output maps ``C_out``.
        kernel_size: ``kh`` or ``(kh, kw)``.
        input_hw: the input's ``(H, W)``; the layer holds one kernel per output position,
            so the input size is fixed.
        table: ``(K, 2)`` connection table of ``(input map, output map)`` rows, valid for
            :func:`cnnkit.tables.check` with ``C_in`` and ``C_out``, or ``None`` for the
            full table :func:`cnnkit.tables.full` (``K = C_in * C_out``). Stored as
            ``layer.table`` with its rows sorted by input map, then output map.
        bias: whether to add a bias at every output position of every map.
        stride: ``s`` or ``(s_h, s_w)``, the step between positions.

    Shapes:
        Input ``(N, C_in, H, W)`` or ``(C_in, H, W)`` with ``(H, W) == input_hw``.
        Output ``(N, C_out, H_out, W_out)``, ``H_out = (H - kh) // s_h + 1``,
        ``W_out = (W - kw) // s_w + 1`` (valid: no padding).
        ``weight``: ``(H_out, W_out, K, kh, kw)``, ``weight[p, q, r]`` the kernel of
        ``layer.table[r]`` at position ``(p, q)``; ``bias``: ``(C_out, H_out, W_out)``.

    The math is :func:`locally_connected2d`. Initialization (``reset_parameters``): every
    kernel of row ``r`` and every bias of map ``o`` uniform in ``(-b, b)`` with
    ``b = 1 / sqrt(fan_in)``, the fan-in of the output map the row feeds:
    ``fan_in = (rows of the table into o) * kh * kw`` -- the table's fan-in, not ``C_in``.

    Memory: ``H_out * W_out * K * kh * kw`` weights. The lecture's first stage
    (1 -> 64 maps, 9x9, 83x83 input) stores 29,160,000 of them; build it with
    ``device="meta"`` to count without allocating.
    """

    def __init__(
        self,
        in_maps: int,
        out_maps: int,
        kernel_size: int | Sequence[int],
        input_hw: int | Sequence[int],
        table: torch.Tensor | None = None,
        bias: bool = True,
        stride: int | Sequence[int] = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_maps = check_positive_int("in_maps", in_maps)
        self.out_maps = check_positive_int("out_maps", out_maps)
        self.kernel_size = pair("kernel_size", kernel_size)
        self.input_hw = pair("input_hw", input_hw)
        self.stride = pair("stride", stride)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        self.output_hw = _output_hw(self.input_hw, self.kernel_size, self.stride)
        self.full_table = table is None
        if table is None:
            table = tables.full(self.in_maps, self.out_maps)
        else:
            tables.check(table, n_in=self.in_maps, n_out=self.out_maps)
            table = table.detach().to("cpu", torch.int64)
        table = table[_row_order(table)]  # (K, 2) by input map, then output map
        layout = _layout(table, self.in_maps)
        self._rows_into = torch.bincount(table[:, 1], minlength=self.out_maps)  # (C_out,)
        self._slots, self._dense, self._identity = layout.slots, layout.dense, layout.identity
        self.register_buffer("table", table.to(device))
        self.register_buffer("_row_slot", layout.row_slot.to(device), persistent=False)
        self.register_buffer("_slot_output", layout.slot_output.to(device), persistent=False)
        factory = {"device": device, "dtype": dtype}
        weight_shape = (*self.output_hw, table.shape[0], *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_maps, *self.output_hw, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def rows(self) -> int:
        """Number of kernels ``K`` per output position: the table's rows."""
        return self.weight.shape[2]

    def fan_in(self) -> torch.Tensor:
        """``(C_out,)``: the number of weights feeding one position of each output map."""
        return self._rows_into * (self.kernel_size[0] * self.kernel_size[1])

    def reset_parameters(self) -> None:
        """Uniform in ``(-b, b)``, ``b = 1/sqrt(fan_in)`` of the output map fed."""
        if self.weight.device.type == "meta":
            return
        bound = 1.0 / self.fan_in().clamp_min(1).to(torch.float64).sqrt()  # (C_out,)
        row_bound = bound.to(self.table.device)[self.table[:, 1]].to(self.weight)  # (K,)
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).mul_(row_bound.view(1, 1, -1, 1, 1))
            if self.bias is not None:
                self.bias.uniform_(-1.0, 1.0).mul_(bound.to(self.bias).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = check_maps("x", x, maps=self.in_maps)
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"x must have spatial size input_hw={self.input_hw}, got {tuple(x.shape)}"
            )
        xb = x.unsqueeze(0) if unbatched else x
        out = _locally_connected(
            xb,
            self.weight,
            self.bias,
            self.in_maps,
            self.out_maps,
            self.stride,
            _Layout(self._row_slot, self._slot_output, self._slots, self._dense, self._identity),
        )
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        (kh, kw), (h, w), (oh, ow) = self.kernel_size, self.input_hw, self.output_hw
        parts = [
            f"{self.in_maps}->{self.out_maps}",
            f"kernel {kh}x{kw}",
            f"input {h}x{w}",
            f"{oh}x{ow} positions",
        ]
        if self.stride != (1, 1):
            sh, sw = self.stride
            parts.append(f"stride {sh}" if sh == sw else f"stride {sh}x{sw}")
        if self.bias is None:
            parts.append("bias=False")
        if not self.full_table:
            parts.append(f"table {tables.describe(self.table.cpu())} ({self.rows} kernels)")
        return ", ".join(parts)

    @classmethod
    def from_convolution(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        input_hw: int | Sequence[int],
        *,
        table: torch.Tensor | None = None,
        in_maps: int | None = None,
        stride: int | Sequence[int] = 1,
    ) -> LocallyConnected2d:
        """The untied layer computing exactly a given convolution, its kernel copied everywhere.

        ``weight`` is ``(C_out, C_in, kh, kw)`` (an ordinary convolution, ``table=None``)
        or ``(K, kh, kw)`` (a connection-table bank, one kernel per row of ``table``);
        ``bias`` is ``(C_out,)`` or ``None``. ``in_maps`` defaults to ``C_in`` or to the
        largest input map the table names, plus one. The kernels follow their rows into
        the layer's sorted table. The result lives on ``weight``'s device and dtype.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        weight = weight.detach()
        if table is None:
            if weight.dim() != 4:
                raise ValueError(
                    "weight must have shape (C_out, C_in, kh, kw) when table is None, "
                    f"got {tuple(weight.shape)}"
                )
            out_maps, in_maps_w = weight.shape[:2]
            if in_maps is not None and in_maps != in_maps_w:
                raise ValueError(f"in_maps is {in_maps} but weight has {in_maps_w} input maps")
            in_maps = in_maps_w
            table = tables.full(in_maps, out_maps).to(weight.device)
            kernels = weight.reshape(out_maps * in_maps, *weight.shape[2:])  # (K, kh, kw)
        else:
            if weight.dim() != 3:
                raise ValueError(
                    f"weight must have shape (K, kh, kw) with a table, got {tuple(weight.shape)}"
                )
            tables.check(table)
            out_maps = int(table[:, 1].max()) + 1
            if in_maps is None:
                in_maps = int(table[:, 0].max()) + 1
            kernels = weight  # (K, kh, kw)
        table = table.to(device=weight.device, dtype=torch.int64)
        if kernels.shape[0] != len(table):
            raise ValueError(f"weight has {kernels.shape[0]} kernels but table has {len(table)}")
        layer = cls(
            in_maps,
            out_maps,
            tuple(kernels.shape[1:]),
            input_hw,
            table=table,
            bias=bias is not None,
            stride=stride,
            device=weight.device,
            dtype=weight.dtype,
        )
        if bias is not None and tuple(bias.shape) != (out_maps,):
            raise ValueError(f"bias must have shape ({out_maps},), got {tuple(bias.shape)}")
        kernels = kernels[_row_order(table)]  # (K, kh, kw) in the layer's row order
        with torch.no_grad():
            layer.weight.copy_(kernels.expand_as(layer.weight))
            if bias is not None:
                layer.bias.copy_(bias.detach().view(-1, 1, 1).expand_as(layer.bias))
        return layer

    @classmethod
    def from_filter_bank(
        cls, bank: FilterBank | nn.Conv2d, input_hw: int | Sequence[int]
    ) -> LocallyConnected2d:
        """The untied copy of a filter bank, computing the same function on ``input_hw``.

        ``bank`` is a :class:`cnnkit.nn.filter_bank.FilterBank` (its table, kernels, bias,
        stride and ``in_maps`` are copied) or an ``nn.Conv2d`` with ``groups=1``,
        ``dilation=1`` and no padding (this layer is valid-only).
        """
        if isinstance(bank, FilterBank):
            return cls.from_convolution(
                bank.weight,
                bank.bias,
                input_hw,
                table=bank.table,
                in_maps=bank.in_maps,
                stride=bank.stride,
            )
        if isinstance(bank, nn.Conv2d):
            padding = bank.padding if isinstance(bank.padding, str) else tuple(bank.padding)
            if (
                bank.groups != 1
                or tuple(bank.dilation) != (1, 1)
                or padding not in ((0, 0), "valid")
            ):
                raise ValueError(
                    "bank must be an nn.Conv2d with groups=1, dilation=1 and padding=0, "
                    f"got groups={bank.groups}, dilation={bank.dilation}, padding={bank.padding}"
                )
            return cls.from_convolution(bank.weight, bank.bias, input_hw, stride=bank.stride)
        raise TypeError(f"bank must be a FilterBank or an nn.Conv2d, got {type(bank).__name__}")

    def to_filter_bank(self, table: torch.Tensor | None = None) -> FilterBank:
        """The shared-weight :class:`FilterBank` holding each kernel's mean over positions.

        Kernel of row ``r`` is ``weight[:, :, r].mean((0, 1))`` and bias ``o`` is
        ``bias[o].mean()``: exactly the layer's function when it is tied
        (:func:`cnnkit.tying.convolution_groups`), its tied projection otherwise. ``table``
        orders the bank's rows (the same rows as ``layer.table`` in any order, e.g. the
        table of the bank this layer came from, so that the state dicts match); default
        ``layer.table``. The bank lives on the layer's device and dtype.
        """
        kernels = self.weight.detach().mean((0, 1))  # (K, kh, kw) in the layer's row order
        if table is None:
            table = self.table.cpu()
        else:
            tables.check(table, n_in=self.in_maps, n_out=self.out_maps)
            table = table.detach().to("cpu", torch.int64)
            keys = self.table.cpu() @ torch.tensor([self.out_maps, 1])  # (K,) ascending
            wanted = table @ torch.tensor([self.out_maps, 1])  # (K',)
            rows = torch.searchsorted(keys, wanted).clamp_max(len(keys) - 1)
            if len(wanted) != len(keys) or not bool((keys[rows] == wanted).all()):
                raise ValueError(
                    f"table must hold the same {len(keys)} rows as layer.table, in any order"
                )
            kernels = kernels[rows.to(kernels.device)]
        bank = FilterBank(
            table,
            self.kernel_size,
            stride=self.stride,
            bias=self.bias is not None,
            in_maps=self.in_maps,
        ).to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            bank.weight.copy_(kernels)
            if self.bias is not None:
                bank.bias.copy_(self.bias.mean((1, 2)))
        return bank


def untie_filter_banks(model: nn.Module, example_input: torch.Tensor) -> list[LocallyConnected2d]:
    """Replace every filter bank inside ``model`` by its untied :class:`LocallyConnected2d`.

    Filter banks are :class:`cnnkit.nn.filter_bank.FilterBank` and ``nn.Conv2d`` modules
    (the latter with ``groups=1``, ``dilation=1``, no padding). Each bank's input size is
    read from one forward pass of ``example_input`` (any batch size, under ``no_grad``);
    each new layer starts with the bank's kernel and bias copied to every position, so the model
    computes the same function. Returns the new layers in module order; tie them with
    ``cnnkit.tying.convolution_groups(*layers)``. A bank that the forward pass never
    reaches, or reaches with two input sizes, is an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    banks = [
        (name, m) for name, m in model.named_modules() if isinstance(m, (FilterBank, nn.Conv2d))
    ]
    if banks and banks[0][0] == "":
        raise TypeError(
            "model must contain filter banks, not be one: use "
            "LocallyConnected2d.from_filter_bank(bank, input_hw)"
        )
    seen: dict[str, tuple[int, int]] = {}
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            hw = tuple(args[0].shape[-2:])
            if seen.setdefault(name, hw) != hw:
                raise ValueError(
                    f"filter bank {name!r} is called on two input sizes, "
                    f"{seen[name]} and {hw}; an untied layer needs one"
                )

        return hook

    for name, bank in banks:
        hooks.append(bank.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in hooks:
            handle.remove()
    layers = []
    for name, bank in banks:
        if name not in seen:
            raise ValueError(
                f"filter bank {name!r} was not reached by a forward pass of example_input"
            )
        layer = LocallyConnected2d.from_filter_bank(bank, seen[name])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers.append(layer)
    return layers
