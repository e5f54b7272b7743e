"""A filter bank wired by a connection table: each output map sums the 2-D correlations
of the input maps its table rows name.

Shapes and math
---------------
``x`` is ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``; ``table`` is a ``(K, 2)``
connection table (:mod:`cnnkit.tables`) of (input map, output map) rows; ``weight`` is
``(K, kh, kw)``, one 2-D kernel per row; ``bias`` is ``(C_out,)`` or ``None``, with
``C_out = n_outputs(table)``. The output is ``(N, C_out, H_out, W_out)`` with

    H_out = (H - kh) // stride_h + 1,    W_out = (W - kw) // stride_w + 1

(valid positions only, no padding), and output map ``o`` is

    y[n, o, a, b] = bias[o] + sum over rows r with table[r, 1] == o of
                    sum_{p < kh, q < kw} x[n, table[r, 0], a*stride_h + p, b*stride_w + q]
                                         * weight[r, p, q]

a correlation: the lecture's 2-D convolution (its Section 5) with the kernel flipped on
both axes and indexed from its corner, the form deep-learning libraries call
convolution; for learned kernels the two describe the same layers. With the table
``random(64, 256, 16)`` and 9x9 kernels this is the lecture's layer 3: 64 maps of 14x14
in, 256 maps of 6x6 out, 4096 kernels. These notes serve every filter bank:
:class:`~cnnkit.nn.filter_bank.FilterBank` is this function's module, and the untied bank
(:mod:`cnnkit.ops.locally_connected`) differs only in holding a kernel per position.

How it is computed
------------------
The plain path scatters the K kernels into a zero ``(C_out, C_in, kh, kw)`` weight (a
differentiable ``index_put``, so the gradient flows back to the K kernels) and makes one
``F.conv2d`` call: it multiplies by the zeros too, but a full table has none. Faster
exact methods for sparse tables and small maps (direct, interleaved, unfold, Fourier,
depthwise) are in
:mod:`cnnkit.kernels.table_conv`; ``method="auto"`` picks among them where
:func:`cnnkit.kernels.fast_path_allowed` allows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnkit._validation import check_choice, check_floating, check_maps, pair
from cnnkit.kernels import table_conv as fast
from cnnkit.kernels.table_conv import METHODS
from cnnkit.tables import TablePlan, dense_weight, plan_table

__all__ = ["METHODS", "TablePlan", "plan_table", "table_conv2d"]


def table_conv2d(
    x: torch.Tensor,
    table: torch.Tensor | TablePlan,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    *,
    method: str = "auto",
) -> torch.Tensor:
    """Apply a connection-table filter bank: one 2-D kernel per table row, summed per output.

    Args:
        x: ``(N, C_in, H, W)`` or ``(C_in, H, W)``; every input map the table names must
            exist (``C_in > max input map``).
        table: ``(K, 2)`` integer rows of (input map, output map), valid for
            :func:`cnnkit.tables.check`; or its :class:`TablePlan` (checked already).
        weight: ``(K, kh, kw)``, kernel ``r`` belonging to table row ``r``.
        bias: ``(C_out,)`` with ``C_out = n_outputs(table)``, or ``None``.
        stride: an int or ``(stride_h, stride_w)``.
        method: ``"auto"`` (default), ``"dense"``, ``"depthwise"``, ``"direct"``,
            ``"fourier"``, ``"interleaved"`` or ``"unfold"``; all compute the same values
            (see the module notes and :mod:`cnnkit.kernels.table_conv`).

    Returns:
        ``(N, C_out, H_out, W_out)`` as in the module notes, or the same without ``N`` for
        unbatched ``x``. Usually contiguous; the ``"direct"`` method returns channels-last
        maps, and so does the fast dense method on a CPU for float32 input that is
        channels-last or has one map, when no derivative is recorded (a faster kernel;
        values equal to rounding).
    """
    unbatched = check_maps("x", x)
    c_in, height, width = x.shape[-3:]
    if isinstance(table, TablePlan):
        if table.in_maps > c_in:
            raise ValueError(
                f"x must have at least the {table.in_maps} input maps the table was planned "
                f"for, got {c_in}"
            )
        plan = table.to(x.device)
    else:
        plan = plan_table(table, c_in).to(x.device)
    table = plan.table
    check_floating("weight", weight)
    rows = table.shape[0]
    if weight.dim() != 3 or weight.shape[0] != rows:
        raise ValueError(
            f"weight must have shape (K, kh, kw) with K = {rows} (one kernel per table row), "
            f"got shape {tuple(weight.shape)}"
        )
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    if weight.dtype != x.dtype and not autocast:
        raise TypeError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    kh, kw = weight.shape[1:]
    if kh > height or kw > width:
        raise ValueError(
            f"weight kernels of {kh}x{kw} do not fit in x maps of {height}x{width}: "
            "a valid correlation needs the kernel inside the map"
        )
    c_out = plan.out_maps
    if bias is not None:
        check_floating("bias", bias)
        if bias.dtype != x.dtype and not autocast:
            raise TypeError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
        if bias.shape != (c_out,):
            raise ValueError(
                f"bias must have shape ({c_out},), one value per output map of the table, "
                f"got shape {tuple(bias.shape)}"
            )
    stride = pair("stride", stride)
    check_choice("method", method, METHODS)

    batch = x.unsqueeze(0) if unbatched else x  # (N, C_in, H, W)
    if method == "auto":
        method = fast.auto_method(batch, weight, plan, stride, bias)
    if method == "plain":
        dense = dense_weight(weight, plan, c_in)  # (C_out, C_in, kh, kw), zeros elsewhere
        y = F.conv2d(batch, dense, bias, stride)
    else:
        y = fast.conv(method, batch, plan, weight, bias, stride)
    return y.squeeze(0) if unbatched else y
