"""The connection-table filter bank as a module: parameters and the table, one op call."""

from __future__ import annotations

import torch
from torch import nn

from cnnkit import tables
from cnnkit._validation import check_maps, check_positive_int, pair
from cnnkit.ops.table_conv import TablePlan, plan_table, table_conv2d

__all__ = ["FilterBank"]


class FilterBank(nn.Module):
    """A bank of 2-D kernels wired by a connection table: the module of :func:`table_conv2d`.

    Shapes and math are in the notes of :mod:`cnnkit.ops.table_conv`, written once for
    this bank, its functional form and the untied bank
    (:class:`~cnnkit.nn.tying.LocallyConnected2d`): ``(N, in_maps, H, W)`` in,
    ``(N, out_maps, H_out, W_out)`` out at the valid positions. The lecture's layer 3 is
    ``FilterBank(tables.random(64, 256, 16), 9)``: 14x14 maps in, 6x6 out, 4096 kernels.

    Args:
        table: ``(K, 2)`` connection table of (input map, output map) rows
            (:mod:`cnnkit.tables`); ``in_maps`` and ``out_maps`` are read from it.
        kernel_size: ``k`` or ``(kh, kw)``.
        stride: ``s`` or ``(stride_h, stride_w)``.
        bias: whether to learn one bias per output map.
        in_maps: the number of input maps, when it exceeds the largest one the table
            names + 1 (maps no row reads); default: read from the table.

    Parameters and buffers:
        weight: ``(K, kh, kw)``, one kernel per table row (not a dense
            ``(out_maps, in_maps, kh, kw)`` tensor).
        bias: ``(out_maps,)``, or ``None`` with ``bias=False``.
        table: the ``(K, 2)`` ``int64`` table, saved in the ``state_dict``; its
            :class:`~cnnkit.tables.TablePlan` is built with it (again when a new
            table is assigned or loaded) and its index tensors are non-persistent buffers.

    Initialization (:meth:`reset_parameters`): uniform in ``[-b_o, b_o]`` with
    ``b_o = 1 / sqrt(fan_in_o * kh * kw)`` for every kernel and the bias of output map
    ``o``, where ``fan_in_o`` is the number of table rows into ``o`` -- the inputs it
    really sums, not all ``in_maps``.
    """

    def __init__(
        self,
        table: torch.Tensor,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        in_maps: int | None = None,
    ) -> None:
        super().__init__()
        if in_maps is not None:
            check_positive_int("in_maps", in_maps)
        tables.check(table, n_in=in_maps)
        kh, kw = pair("kernel_size", kernel_size)
        pair("stride", stride)  # validates
        self.stride = stride if isinstance(stride, int) else tuple(stride)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        self._in_maps = in_maps if in_maps is not None else tables.n_inputs(table)
        self.register_buffer("table", None)
        self.table = table.detach().to("cpu", torch.int64).clone()  # plans it too
        self.weight = nn.Parameter(torch.empty(len(table), kh, kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(tables.n_outputs(table)))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def in_maps(self) -> int:
        return self._in_maps

    @property
    def out_maps(self) -> int:
        return self._out_maps

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.weight.shape[1], self.weight.shape[2])

    def reset_parameters(self) -> None:
        """Uniform in ``+-1 / sqrt(fan_in_o * kh * kw)``, per output map ``o`` (Torch7's
        ``SpatialConvolutionMap``): each kernel takes the bound of the output it feeds."""
        kh, kw = self.kernel_size
        table = self.table.to(self.weight.device)
        bound = (tables.fan_in(table).to(self.weight) * (kh * kw)).rsqrt()  # (out_maps,)
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0).mul_(bound[table[:, 1]].view(-1, 1, 1))
            if self.bias is not None:
                self.bias.uniform_(-1.0, 1.0).mul_(bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_maps("x", x, maps=self.in_maps)
        return table_conv2d(x, self._plan(), self.weight, self.bias, self.stride)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "table" and isinstance(value, torch.Tensor):
            self._set_plan(plan_table(value, self.in_maps))

    def _set_plan(self, plan: TablePlan) -> None:
        self._out_maps = plan.out_maps
        self.register_buffer("slot_rows", plan.slot_rows, persistent=False)
        self.register_buffer("slot_outputs", plan.slot_outputs, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "table" in state_dict:  # a loaded table is planned again
            self.table = self.table

    def _plan(self) -> TablePlan:
        """The table's plan, from the buffers built with it."""
        return TablePlan(self.table, self.in_maps, self.out_maps, self.slot_rows, self.slot_outputs)

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        parts = [f"{self.in_maps}->{self.out_maps}", f"kernel {kh}x{kw}"]
        if self.stride not in (1, (1, 1)):
            sh, sw = pair("stride", self.stride)
            parts.append(f"stride {sh}" if sh == sw else f"stride {sh}x{sw}")
        if self.bias is None:
            parts.append("bias=False")
        shape = tables.describe(self.table, n_in=self.in_maps)
        if shape != "full":
            parts.append(f"table {shape} ({len(self.table)} kernels)")
        return ", ".join(parts)
