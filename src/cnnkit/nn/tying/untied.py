"""The untied filter bank: one kernel and one bias at every output position.

:class:`LocallyConnected2d` is the untied form of a convolution: where a
:class:`~cnnkit.nn.filter_bank.FilterBank` slides one ``kh x kw`` kernel per table row
over the whole input map, this layer keeps a separate kernel (and bias) at every output
position. It converts both ways: :meth:`~LocallyConnected2d.from_filter_bank` copies a
bank's kernels to every position (the same function), and
:meth:`~LocallyConnected2d.to_filter_bank` averages them back into one shared kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnkit import tables
from cnnkit._shapes import valid_hw
from cnnkit._validation import check_maps, check_positive_int, pair
from cnnkit.nn.filter_bank import FilterBank
from cnnkit.ops.locally_connected import (
    UntiedLayout,
    layer_row_order,
    locally_connected2d,
    untied_layout,
)

__all__ = ["LocallyConnected2d"]


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
            ``layer.table`` with its rows sorted by input map, then output map, so that
            every input map's rows are contiguous and the forward pass needs no
            rearranging of the weights.
        bias: whether to add a bias at every output position of every map.
        stride: ``s`` or ``(s_h, s_w)``, the step between positions.

    Shapes and math: :func:`cnnkit.ops.locally_connected.locally_connected2d`, with
    ``(H, W) == input_hw``. ``weight`` is ``(H_out, W_out, K, kh, kw)``, ``weight[p, q, r]``
    the kernel of ``layer.table[r]`` at position ``(p, q)``; ``bias`` is ``(C_out, H_out,
    W_out)``.

    Initialization (``reset_parameters``): as :class:`~cnnkit.nn.filter_bank.FilterBank`'s,
    at every position -- uniform in ``(-b, b)``, ``b = 1 / sqrt(fan_in)`` with the
    table's fan-in of the output map fed, ``(rows of the table into o) * kh * kw``.

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
        (kh, kw), (h, w) = self.kernel_size, self.input_hw
        if kh > h or kw > w:
            raise ValueError(
                f"kernel_size {self.kernel_size} does not fit in input_hw {self.input_hw}: "
                "a valid filter needs kernel <= input on both axes"
            )
        self.output_hw = valid_hw(self.input_hw, self.kernel_size, self.stride)
        self.full_table = table is None
        if table is None:
            table = tables.full(self.in_maps, self.out_maps)
        else:
            tables.check(table, n_in=self.in_maps, n_out=self.out_maps)
            table = table.detach().to("cpu", torch.int64)
        table = table[layer_row_order(table)]  # (K, 2) by input map, then output map
        layout = untied_layout(table, self.in_maps)
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

    def _layout(self) -> UntiedLayout:
        """The table's :class:`~cnnkit.ops.locally_connected.UntiedLayout`, from the
        buffers built with it."""
        return UntiedLayout(
            self._row_slot,
            self._slot_output,
            self._slots,
            self._dense,
            self._identity,
            self.in_maps,
            self.out_maps,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_maps("x", x, maps=self.in_maps)
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"x must have spatial size input_hw={self.input_hw}, got {tuple(x.shape)}"
            )
        return locally_connected2d(x, self.weight, self.bias, self._layout(), self.stride)

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

    # -- conversion to and from a shared filter bank ------------------------------------------

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
            out_maps = tables.n_outputs(table)
            if in_maps is None:
                in_maps = tables.n_inputs(table)
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
        kernels = kernels[layer_row_order(table)]  # (K, kh, kw) in the layer's row order
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
        (:func:`cnnkit.nn.tying.convolution_groups`), its tied projection otherwise.
        ``table`` orders the bank's rows (the same rows as ``layer.table`` in any order,
        e.g. the table of the bank this layer came from, so that the state dicts match);
        default ``layer.table``. The bank lives on the layer's device and dtype.
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
