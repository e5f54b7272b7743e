"""Valid 2-D filtering with untied kernels: its own kernel and bias at every output position.

Shapes and math
---------------
The same filter bank as :func:`cnnkit.ops.table_conv.table_conv2d` -- a ``(K, 2)``
connection table (:mod:`cnnkit.tables`), valid positions only, correlation -- except that
the kernel of table row ``r`` and the bias of output map ``o`` may differ at every output
position ``(p, q)``:

    out[n, o, p, q] = bias[o, p, q]
        + sum over rows r with table[r, 1] == o of
          sum_{u, v} x[n, table[r, 0], p*s_h + u, q*s_w + v] * weight[p, q, r, u, v]

``x`` is ``(N, C_in, H, W)`` or ``(C_in, H, W)``; ``weight`` is ``(H_out, W_out, K, kh,
kw)``; ``bias`` is ``(C_out, H_out, W_out)`` or ``None``; the output is ``(N, C_out,
H_out, W_out)`` with ``H_out = (H - kh) // s_h + 1`` and ``W_out = (W - kw) // s_w + 1``
(:func:`cnnkit._shapes.valid_hw`). With ``weight[p, q, r]`` the same at every ``(p, q)``
and ``bias[o]`` constant over positions this is the table's convolution; the lecture's
Section 3 trains a CNN as this untied layer held tied (:mod:`cnnkit.nn.tying`).

How it is computed
------------------
One batched matrix product per (position, input map): the map's unfolded patches times
the kernels of the rows reading it at that position. :class:`UntiedLayout` groups the
table's rows by input map, each map padded to the same number of slots, so the weight
needs rearranging only for a table whose rows are not sorted by input map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cnnkit import tables
from cnnkit._shapes import valid_hw
from cnnkit._validation import check_maps, pair

__all__ = ["UntiedLayout", "layer_row_order", "locally_connected2d", "untied_layout"]


class UntiedLayout(NamedTuple):
    """A table's rows grouped by input map, each map padded to the same number of slots.

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
    in_maps: int
    out_maps: int


def layer_row_order(table: torch.Tensor) -> torch.Tensor:
    """The permutation sorting a table's rows by input map, then output map: the order
    :class:`~cnnkit.nn.tying.LocallyConnected2d` keeps its table in."""
    keys = table[:, 0] * tables.n_outputs(table) + table[:, 1]  # (K,)
    return torch.argsort(keys, stable=True)


def untied_layout(table: torch.Tensor, in_maps: int) -> UntiedLayout:
    """The :class:`UntiedLayout` of a checked ``(K, 2)`` ``int64`` table over ``in_maps``."""
    inputs = table[:, 0]
    rows = len(inputs)
    counts = torch.bincount(inputs, minlength=in_maps)  # (in_maps,)
    slots = int(counts.max())
    order = torch.argsort(inputs, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inputs)
    rank[order] = torch.arange(rows, device=table.device) - starts[inputs[order]]
    row_slot = inputs * slots + rank  # (K,)
    slot_output = torch.zeros(in_maps * slots, dtype=torch.int64, device=table.device)
    slot_output[row_slot] = table[:, 1]
    dense = rows == in_maps * slots and bool(
        (row_slot == torch.arange(rows, device=table.device)).all()
    )
    out_maps = tables.n_outputs(table)
    identity = (
        dense
        and in_maps * slots == out_maps
        and bool((slot_output == torch.arange(out_maps, device=table.device)).all())
    )
    return UntiedLayout(row_slot, slot_output, slots, dense, identity, in_maps, out_maps)


def locally_connected2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    table: torch.Tensor | UntiedLayout | None = None,
    stride: int | Sequence[int] = 1,
) -> torch.Tensor:
    """Valid 2-D filtering with a separate kernel and bias at every output position.

    Shapes and math as in the module notes. ``table`` is a ``(K, 2)`` table in any order
    (``weight[:, :, r]`` belongs to its row ``r``), its :class:`UntiedLayout` (built
    already, as the layer keeps it), or ``None`` for the full table in the layer's order
    (``K = C_in * C_out``, row ``i * C_out + o`` = ``(i, o)``, so ``C_out = K / C_in``).
    """
    unbatched = check_maps("x", x)
    if weight.dim() != 5:
        raise ValueError(
            f"weight must have shape (H_out, W_out, K, kh, kw), got {tuple(weight.shape)}"
        )
    out_h, out_w, rows, kh, kw = weight.shape
    in_maps = x.shape[-3]
    if isinstance(table, UntiedLayout):
        layout = table
        if layout.in_maps != in_maps:
            raise ValueError(
                f"x must have the {layout.in_maps} input maps of the layout, got {in_maps}"
            )
        rows_in_table = len(layout.row_slot)
    else:
        if table is None:
            if rows % in_maps != 0:
                raise ValueError(
                    f"weight has K={rows} rows, which a full table over {in_maps} input maps "
                    "cannot have (K must be in_maps * out_maps); pass table"
                )
            table = tables.full(in_maps, rows // in_maps)
            table = table[layer_row_order(table)]  # (K, 2) by input, then output map
        else:
            tables.check(table, n_in=in_maps)
        rows_in_table = table.shape[0]
        layout = untied_layout(table.to(device=x.device, dtype=torch.int64), in_maps)
    if rows_in_table != rows:
        raise ValueError(
            f"weight has K={rows} kernels per position but table has {rows_in_table} rows"
        )
    stride = pair("stride", stride)
    if kh > x.shape[-2] or kw > x.shape[-1]:
        raise ValueError(
            f"weight's {kh}x{kw} kernels do not fit in x of shape {tuple(x.shape)}: "
            "a valid filter needs kernel <= input on both axes"
        )
    expected = valid_hw(x.shape[-2:], (kh, kw), stride)
    if expected != (out_h, out_w):
        raise ValueError(
            f"weight has {out_h}x{out_w} positions, but a {kh}x{kw} kernel at stride {stride} "
            f"on a {tuple(x.shape[-2:])} input gives {expected[0]}x{expected[1]}"
        )
    if bias is not None and tuple(bias.shape) != (layout.out_maps, out_h, out_w):
        raise ValueError(
            f"bias must have shape {(layout.out_maps, out_h, out_w)}, got {tuple(bias.shape)}"
        )
    out = _untied_correlation(x.unsqueeze(0) if unbatched else x, weight, bias, layout, stride)
    return out.squeeze(0) if unbatched else out


def _untied_correlation(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: UntiedLayout,
    stride: tuple[int, int],
) -> torch.Tensor:
    """The math of :func:`locally_connected2d` on checked ``(N, C_in, H, W)`` input."""
    out_h, out_w, rows, kh, kw = weight.shape
    n, positions, taps = x.shape[0], out_h * out_w, kh * kw
    in_maps, out_maps, slots = layout.in_maps, layout.out_maps, layout.slots
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
