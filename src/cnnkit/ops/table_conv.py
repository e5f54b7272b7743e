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
in, 256 maps of 6x6 out, 4096 kernels.

How it is computed
------------------
Four exact methods; ``method="auto"`` picks one from the shapes and whether a derivative
is recorded:

- ``"dense"``: scatter the K kernels into a zero ``(C_out, C_in, kh, kw)`` weight (a
  differentiable ``index_put``, so the gradient flows back to the K kernels) and make
  one ``F.conv2d`` call. It multiplies by the zeros too, but runs at the full speed of
  the library's convolution; a full table has no zeros at all.
- ``"depthwise"``: when every output map has exactly one input map (``one_to_one`` and
  its relatives), gather those inputs and make one ``F.conv2d(groups=C_out)`` call.
- ``"unfold"``: group the kernels by input map. The patches of every input map
  (``F.unfold``, ``kh * kw`` values per output position) are multiplied by the matrix of
  that map's kernels (``S x kh kw``, ``S`` the most kernels any input map has, shorter
  lists padded with zero kernels), and each product row is added into its output map.
  It does the table's useful multiply-adds only (plus the padding) in one batched
  matrix product; the batch of small products pays off only for a few images at a time
  (a single image: about half the time of ``"dense"`` at the lecture's layer 3).
- ``"fourier"``: the correlation theorem on the ``H x W`` grid (after trimming ``x`` to
  the rows and columns the output reads): with ``^`` the 2-D discrete Fourier transform,
  ``y_o^ = sum_r x_{in(r)}^ * conj(w_r^)`` at every frequency. The valid outputs never
  wrap around the grid, so they are exact. Per frequency the sum over rows is one real
  matrix product with the kernels' spectra scattered into a ``(2 C_in, C_out)`` matrix,
  and the inverse transform onto the ``H_out x W_out`` kept positions is one more. On
  small maps with large kernels -- the lecture's layer 3, where a 9x9 kernel covers
  most of a 14x14 map -- it needs far fewer multiply-adds than any direct method.

The measurements behind the choice are in ``docs/performance.md`` (connection-table
filter bank).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnkit import tables
from cnnkit._validation import check_choice, check_floating, check_maps, pair
from cnnkit.ops._derived import derivative_recorded, derived

__all__ = ["METHODS", "TablePlan", "plan_table", "table_conv2d"]

METHODS = ("auto", "dense", "depthwise", "fourier", "unfold")

# "auto" takes "fourier" when the dense convolution needs this many times more
# multiply-adds. The library convolution ran each multiply-add about 2.2x faster than the
# Fourier method's smaller products and transforms on shapes around the lecture's; the
# margin above that keeps "auto" off every Fourier call that measured slower than dense
# (docs/performance.md, connection-table filter bank).
_FOURIER_MARGIN = 3.5
# "auto" takes "unfold" for tables with at most this share of the dense weight's kernels
# when the batch has at most _UNFOLD_MAX_POSITIONS output positions per map in all
# (measured at the lecture's layer 3, forward + backward: 2.2x faster than dense for 1
# image, 1.2x for 8, 1.1x for 16 where "fourier" is 1.5x; docs/performance.md).
# Without a derivative to record the Fourier method's kernel spectra are kept between
# calls, and it overtakes "unfold" at 5 images of layer 3 (180 positions; 4 images:
# unfold 1.13x faster, 5: fourier 1.06x, 8: 1.18x).
_UNFOLD_MAX_FILL = 0.5
_UNFOLD_MAX_POSITIONS = 512
_UNFOLD_MAX_POSITIONS_NO_GRAD = 160
# "auto" takes "depthwise" for one-input-per-output tables from this many input maps on:
# below it the dense convolution wastes little and runs faster than a grouped one.
_DEPTHWISE_MIN_MAPS = 8


@dataclass(frozen=True, eq=False)
class TablePlan:
    """A connection table checked once, with the index tensors :func:`table_conv2d`
    needs; pass it instead of the table to skip both on every call (a module holding a
    fixed table does).

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
    tables.check(table, n_in=in_maps)
    # ordinary tensors even under inference_mode: a later training step indexes with them
    with torch.inference_mode(False):
        return _build_plan(table.detach().clone(), in_maps)


def _build_plan(table: torch.Tensor, in_maps: int | None) -> TablePlan:
    table = table.to(dtype=torch.int64)
    rows = table.shape[0]
    in_maps = tables.n_inputs(table) if in_maps is None else in_maps
    out_maps = int(table[:, 1].max()) + 1
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
        method: ``"auto"`` (default), ``"dense"``, ``"depthwise"``, ``"fourier"`` or
            ``"unfold"``; all compute the same values (see the module notes).

    Returns:
        ``(N, C_out, (H - kh) // stride_h + 1, (W - kw) // stride_w + 1)``, or the same
        without ``N`` for unbatched ``x``. Output map ``o`` is ``bias[o]`` plus, for every
        row ``r`` with ``table[r, 1] == o``, the valid correlation of input map
        ``table[r, 0]`` with ``weight[r]``. Usually contiguous; the dense method returns
        channels-last maps on a CPU for float32 input that is channels-last or has one
        map, when no derivative is recorded (a faster kernel; values equal to rounding).

    Without a derivative to record, the transformed kernels are kept between calls
    while ``weight`` is unchanged (:mod:`cnnkit.ops._derived`; an edit through
    ``.data`` goes unseen).
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
    if weight.dtype != x.dtype:
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
        if bias.dtype != x.dtype:
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
        recorded = derivative_recorded(batch) or derivative_recorded(weight)
        method = _choose(batch.shape, weight.shape, c_out, stride, x.dtype, recorded)
    if method == "depthwise":
        y = _depthwise(batch, table, weight, bias, stride, c_out)
    elif method == "fourier":
        y = _fourier(batch, plan, weight, bias, stride)
    elif method == "unfold":
        y = _unfold(batch, plan, weight, bias, stride)
    else:
        y = _dense(batch, plan, weight, bias, stride)
    return y.squeeze(0) if unbatched else y


def _valid_size(
    size: Sequence[int], kernel: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int]:
    """``(H_out, W_out)`` of a valid correlation: ``(H - kh) // stride_h + 1``, likewise W."""
    return tuple((n - k) // s + 1 for n, k, s in zip(size, kernel, stride, strict=True))


def _choose(
    x_shape: torch.Size,
    weight_shape: torch.Size,
    c_out: int,
    stride: tuple[int, int],
    dtype: torch.dtype,
    recorded: bool = True,
) -> str:
    """Pick the method with the fewest multiply-adds, weighted by their measured speed;
    ``recorded``: whether a derivative of the input or the weight is being recorded."""
    n, c_in, height, width = x_shape
    rows, kh, kw = weight_shape
    if rows == c_out and c_in >= _DEPTHWISE_MIN_MAPS:  # each output has exactly one input
        return "depthwise"
    h_out, w_out = _valid_size((height, width), (kh, kw), stride)
    sparse = rows <= _UNFOLD_MAX_FILL * c_in * c_out
    limit = _UNFOLD_MAX_POSITIONS if recorded else _UNFOLD_MAX_POSITIONS_NO_GRAD
    if sparse and n * h_out * w_out <= limit:
        return "unfold"
    if dtype not in (torch.float32, torch.float64):  # no half-precision FFT on every device
        return "dense"
    dense = n * c_out * c_in * h_out * w_out * kh * kw
    h, w = (h_out - 1) * stride[0] + kh, (w_out - 1) * stride[1] + kw
    spectrum = 2 * h * (w // 2 + 1)  # real numbers per map in the half spectrum
    fourier = spectrum * (
        2 * n * c_in * c_out  # the per-frequency products
        + n * c_out * h_out * w_out  # the inverse transform onto the kept positions
    )
    if recorded:  # else the kernels' spectra are kept from an earlier call
        fourier += spectrum * (
            rows * kh * kw  # the kernels' spectra (as a plain DFT would; an FFT needs less)
            + c_in * c_out  # scattering them into the dense spectrum
        )
    return "fourier" if _FOURIER_MARGIN * fourier < dense else "dense"


def _dense(
    x: torch.Tensor,
    plan: TablePlan,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
) -> torch.Tensor:
    c_in = x.shape[1]
    layout = _output_layout(x, weight)
    if x.is_contiguous():
        # Standard strides: a contiguous tensor with one map can carry channels-last
        # strides (the map's stride is free when there is one), and the library's
        # convolution would then take its channels-last kernels, slower for training.
        x = x.view(-1).view(x.shape)
    dense = _from_weight(
        weight, "dense", (plan, c_in, layout), lambda w: _dense_weight(w, plan, c_in, layout)
    )
    return F.conv2d(x, dense, bias, stride)


def _output_layout(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout the dense convolution should write: channels-last on a CPU for float32
    maps when nothing records a derivative and the input is channels-last already, or has
    one map (both layouts then coincide). The library's channels-last kernel computes
    the lecture's first filter bank 1.2x faster, and the normalization and pooling after
    it run at least as fast on its output; with a backward to run, or in float64, it was
    slower."""
    channels_last = x.shape[1] == 1 or x.is_contiguous(memory_format=torch.channels_last)
    if (
        channels_last
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (derivative_recorded(x) or derivative_recorded(weight))
    ):
        return torch.channels_last
    return torch.contiguous_format


def _dense_weight(
    weight: torch.Tensor, plan: TablePlan, c_in: int, layout: torch.memory_format
) -> torch.Tensor:
    """``(C_out, C_in, kh, kw)`` in ``layout``: each kernel at its table row's place, zeros
    elsewhere. The convolution writes its output in the layout of this weight."""
    table = plan.table
    shape = (plan.out_maps, c_in, *weight.shape[1:])
    dense = torch.empty(shape, dtype=weight.dtype, device=weight.device, memory_format=layout)
    return dense.zero_().index_put((table[:, 1], table[:, 0]), weight)  # rows are distinct


def _unfold(
    x: torch.Tensor,
    plan: TablePlan,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
) -> torch.Tensor:
    n = x.shape[0]
    kh, kw = weight.shape[1:]
    h_out, w_out = _valid_size(x.shape[2:], (kh, kw), stride)
    positions = h_out * w_out
    c_in, slots = plan.slot_rows.shape
    x = x[:, :c_in]  # maps beyond the table's are never read
    kernels = _from_weight(weight, "slot kernels", plan, lambda w: _slot_kernels(w, plan))
    windows = x.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # (N, C_in, Ho, Wo, kh, kw)
    # one copy straight into the layout of the product (twice as fast as F.unfold here)
    patches = windows.permute(1, 4, 5, 0, 2, 3).reshape(c_in, kh * kw, n * positions)
    products = torch.bmm(kernels, patches).view(c_in * slots, n * positions)
    # Whole rows added along dim 0: much faster than along an inner dim.
    sums = products.new_zeros(plan.out_maps + 1, n * positions)  # last map: the padding's
    sums = sums.index_add(0, plan.slot_outputs.view(-1), products)
    y = sums[: plan.out_maps]  # (C_out, N L)
    if bias is not None:
        y = y + bias.view(-1, 1)
    return y.view(plan.out_maps, n, h_out, w_out).transpose(0, 1).contiguous()


def _slot_kernels(weight: torch.Tensor, plan: TablePlan) -> torch.Tensor:
    """``(C_in, S, kh kw)``: the kernels of each input map's table rows, zero-padded."""
    rows, kh, kw = weight.shape
    padded = torch.cat([weight.reshape(rows, kh * kw), weight.new_zeros(1, kh * kw)])
    return padded[plan.slot_rows]


def _depthwise(
    x: torch.Tensor,
    table: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    c_out: int,
) -> torch.Tensor:
    if table.shape[0] != c_out:
        raise ValueError(
            f'method="depthwise" needs exactly one input map per output map, but the table '
            f"has {table.shape[0]} rows for {c_out} output maps"
        )
    order = torch.argsort(table[:, 1])  # row of output 0, output 1, ...
    x = x.index_select(1, table[order, 0])  # (N, C_out, H, W)
    return F.conv2d(x, weight[order].unsqueeze(1), bias, stride, groups=c_out)


def _fourier(
    x: torch.Tensor,
    plan: TablePlan,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
) -> torch.Tensor:
    n, c_in = x.shape[:2]
    c_out = plan.out_maps
    kh, kw = weight.shape[1:]
    h_out, w_out = _valid_size(x.shape[2:], (kh, kw), stride)
    h, w = (h_out - 1) * stride[0] + kh, (w_out - 1) * stride[1] + kw
    freqs = h * (w // 2 + 1)
    x = x[:, :, :h, :w]  # the rows and columns the output reads

    # Each frequency's complex product, in real arithmetic: a row of (Re z, Im z) pairs
    # times columns of (Re w^, Im w^) pairs gives Re(z conj(w^)); the same row for -i z,
    # i.e. (Im z, -Re z), gives Im(z conj(w^)).
    z = torch.fft.rfft2(x).permute(2, 3, 0, 1).reshape(freqs, n, c_in)  # (F, N, C_in) complex
    z = torch.view_as_real(torch.cat([z, -1j * z], 1)).view(freqs, 2 * n, 2 * c_in)

    spectra = functools.partial(_dense_spectra, plan=plan, size=(h, w), c_in=c_in)
    w_hat = _from_weight(weight, "dense spectra", (plan, h, w, c_in), spectra)

    y_hat = torch.bmm(z, w_hat)  # (F, 2N, C_out) = (F, Re/Im, N, C_out)
    basis = _inverse_basis(h, w, h_out, w_out, stride, x.dtype, x.device)  # (H_out W_out, 2F)
    y = basis @ y_hat.view(2 * freqs, n * c_out)  # (H_out W_out, N C_out)
    y = y.view(h_out, w_out, n, c_out).permute(2, 3, 0, 1)  # (N, C_out, H_out, W_out)
    if bias is not None:
        y = y + bias.view(c_out, 1, 1)
    return y.contiguous()


def _dense_spectra(
    weight: torch.Tensor, plan: TablePlan, size: tuple[int, int], c_in: int
) -> torch.Tensor:
    """``(F, 2 C_in, C_out)``: the kernels' half spectra on the ``size`` grid, each pair
    ``(Re w^, Im w^)`` at rows ``2 i, 2 i + 1`` and column ``o`` of its table row ``(i, o)``."""
    table, c_out = plan.table, plan.out_maps
    rows = table.shape[0]
    freqs = size[0] * (size[1] // 2 + 1)
    w_hat = torch.view_as_real(torch.fft.rfft2(weight, s=size)).view(rows, freqs, 2)
    w_hat = w_hat.permute(1, 0, 2).reshape(freqs, 2 * rows)  # (F, K re/im pairs)
    at = 2 * table[:, 0] * c_out + table[:, 1]  # (K,) row 2i, column o of a 2C_in x C_out
    at = torch.stack([at, at + c_out], 1).view(2 * rows)  # (2K,) Re w^ at row 2i, Im at 2i+1
    w_hat = w_hat.new_zeros(freqs, 2 * c_in * c_out).index_add(1, at, w_hat)
    return w_hat.view(freqs, 2 * c_in, c_out)


def _from_weight(
    weight: torch.Tensor,
    kind: str,
    params: Hashable,
    build: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``build(weight)``; kept between calls while ``weight`` is unchanged when no
    derivative is recorded for it (evaluation and inference: see :mod:`cnnkit.ops._derived`)."""
    if derivative_recorded(weight):
        return build(weight)
    return derived(weight, kind, params, lambda: build(weight.detach()))


@functools.lru_cache(maxsize=8)
def _inverse_basis(
    h: int,
    w: int,
    h_out: int,
    w_out: int,
    stride: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The inverse real 2-D DFT from a half spectrum onto the kept output positions.

    Returns ``(h_out * w_out, 2 * h * (w // 2 + 1))``: column ``2 f + c`` multiplies the
    real (``c = 0``) or imaginary (``c = 1``) part at frequency ``f = (u, v)``, and

        y(a, b) = 1/(h w) sum_{u < h, v <= w/2} m_v (Re Y(u, v) cos t - Im Y(u, v) sin t),
        t = 2 pi (u a stride_h / h + v b stride_w / w),

    where ``m_v = 2`` counts the mirrored column ``w - v``, and ``m_v = 1`` for ``v = 0``
    and ``v = w/2``, which have no mirror.
    """
    # The basis is cached across calls: it must be an ordinary tensor even when first
    # built under inference_mode, or a later training step could not save it for backward.
    with torch.inference_mode(False):
        return _build_inverse_basis(h, w, h_out, w_out, stride, dtype, device)


def _build_inverse_basis(
    h: int,
    w: int,
    h_out: int,
    w_out: int,
    stride: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    f64 = torch.float64
    u = torch.arange(h, dtype=f64).view(1, 1, h, 1)
    v = torch.arange(w // 2 + 1, dtype=f64).view(1, 1, 1, -1)
    a = torch.arange(h_out, dtype=f64).view(-1, 1, 1, 1) * stride[0]
    b = torch.arange(w_out, dtype=f64).view(1, -1, 1, 1) * stride[1]
    angle = 2 * math.pi * (u * a / h + v * b / w)  # (h_out, w_out, h, w//2+1)
    mirrored = torch.full((w // 2 + 1,), 2.0, dtype=f64)
    mirrored[0] = 1.0
    if w % 2 == 0:
        mirrored[-1] = 1.0
    scale = mirrored / (h * w)
    basis = torch.stack([angle.cos() * scale, -angle.sin() * scale], dim=-1)
    return basis.reshape(h_out * w_out, -1).to(device=device, dtype=dtype)
