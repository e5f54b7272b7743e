"""The connection-table filter bank's faster exact methods, and the choice among them.

:func:`cnnkit.ops.table_conv2d` computes a filter bank as one convolution with a dense
weight (the plain path). The methods here compute the same values:

- ``"dense"`` with the layout the library's convolution runs fastest in;
- ``"direct"``: the dense correlation by cnnkit's compiled kernel for banks with few
  input maps (:mod:`cnnkit.kernels.direct_conv`; stride 1, output maps in whole
  vectors), channels-last maps out -- the lecture's first bank, one image to 64 maps;
- ``"interleaved"``: the table's multiply-adds only, by cnnkit's compiled kernel with a
  pixel of several images in each vector (:mod:`cnnkit.kernels.interleaved_conv`;
  stride 1) -- for sparse tables on small maps, the lecture's second bank, given a batch
  of images to fill the vectors;
- ``"depthwise"``: when every output map has exactly one input map (``one_to_one`` and
  its relatives), gather those inputs and make one ``F.conv2d(groups=C_out)`` call;
- ``"unfold"``: group the kernels by input map. The patches of every input map
  (``kh * kw`` values per output position) are multiplied by the matrix of that map's
  kernels (``S x kh kw``, ``S`` the most kernels any input map has, shorter lists padded
  with zero kernels), and each product row is added into its output map: only the
  table's multiply-adds (plus the padding), in one batched matrix product, which pays
  for a few images at a time;
- ``"fourier"``: the correlation theorem on the ``H x W`` grid (after trimming ``x`` to
  the rows and columns the output reads): with ``^`` the 2-D discrete Fourier transform,
  ``y_o^ = sum_r x_{in(r)}^ * conj(w_r^)`` at every frequency. The valid outputs never
  wrap around the grid, so they are exact. Per frequency the sum over rows is one real
  matrix product with the kernels' spectra scattered into a ``(2 C_in, C_out)`` matrix,
  and the inverse transform onto the kept positions is one more. On small maps with
  large kernels -- the lecture's layer 3, where a 9x9 kernel covers most of a 14x14 map
  -- it needs far fewer multiply-adds than any direct method.

Everything derived from the weight (the dense weight, the grouped kernels, the spectra)
is computed on every call, so an edited weight is always seen. Which method ``"auto"``
takes is timed once per machine and shape (:mod:`cnnkit.kernels.tuning`,
``docs/tuning.md``); the cost model below is the default where timing is off.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from cnnkit._native import native_ops
from cnnkit._shapes import valid_hw
from cnnkit.kernels import fast_path_allowed, recorded, tuning
from cnnkit.kernels.direct_conv import direct_conv2d, direct_conv2d_applies
from cnnkit.kernels.interleaved_conv import (
    interleaved_table_conv2d,
    interleaved_table_conv2d_applies,
)
from cnnkit.tables import TablePlan, dense_weight

__all__ = ["METHODS", "auto_method", "conv"]

METHODS = ("auto", "dense", "depthwise", "direct", "fourier", "interleaved", "unfold")

# The cost model that "auto" follows where no timing is allowed (CNNKIT_TUNE=0, or a
# device other than the CPU): safe defaults, not a machine's measurements.
# "fourier" when the dense convolution needs this many times more multiply-adds (a
# library convolution runs each of its multiply-adds some times faster than the Fourier
# method's smaller products and transforms):
_FOURIER_MARGIN = 3.5
# "unfold" for tables with at most this share of the dense weight's kernels, when the
# batch has at most _UNFOLD_MAX_POSITIONS output positions per map in all (a few images):
_UNFOLD_MAX_FILL = 0.5
_UNFOLD_MAX_POSITIONS = 512
# "interleaved" for such tables from this many bytes of one pixel's images on: a vector
# of the widest instruction set the kernel is built for filled with images.
_INTERLEAVED_MIN_BYTES = 64
# "depthwise" for one-input-per-output tables from this many input maps on (below it the
# dense convolution wastes little):
_DEPTHWISE_MIN_MAPS = 8


def auto_method(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: TablePlan,
    stride,  # noqa: ANN001
    bias: torch.Tensor | None = None,
) -> str:
    """The method ``"auto"`` takes for ``x`` (N, C_in, H, W): ``"plain"`` where the fast
    paths are not allowed (for ``x``, ``weight`` or ``bias``); else, on a CPU, the
    fastest on this machine for this shape class (:func:`cnnkit.kernels.tuning.choose`,
    measured once per machine), with the cost model of :func:`_choose` as the default
    where measuring is off (``CNNKIT_TUNE=0``) and on other devices."""
    if not fast_path_allowed(x, weight, bias):
        return "plain"
    direct = _direct_applies(x, weight, plan, stride, bias)
    interleaved = _interleaved_applies(x, weight, stride, bias)
    default = _choose(x.shape, weight.shape, plan.out_maps, stride, x.dtype, direct, interleaved)
    if x.device.type != "cpu":
        return default
    grad = recorded(x) or recorded(weight)
    case = (
        f"table_conv x{tuple(x.shape)} w{tuple(weight.shape)} out{plan.out_maps} "
        f"slots{plan.slot_rows.shape[1]} stride{tuple(stride)} {x.dtype} "
        f"{tuning.layout_name(x)} "
        f"{'grad' if grad else 'nograd'} threads{torch.get_num_threads()}"
    )
    candidates = _candidates(x, weight, plan, stride, grad, direct, interleaved)
    return tuning.choose(case, default, candidates)


def _direct_applies(x, weight, plan: TablePlan, stride, bias) -> bool:  # noqa: ANN001
    """Whether ``"direct"`` can compute this bank (:func:`direct_conv2d_applies` for its
    dense weight's shape, at stride 1)."""
    dense = weight.new_empty(()).expand(plan.out_maps, x.shape[1], *weight.shape[1:])
    return tuple(stride) == (1, 1) and direct_conv2d_applies(x, dense, bias)


def _interleaved_applies(x, weight, stride, bias) -> bool:  # noqa: ANN001
    """Whether ``"interleaved"`` can compute this bank (at stride 1)."""
    return tuple(stride) == (1, 1) and interleaved_table_conv2d_applies(x, weight, bias)


def _candidates(
    x, weight, plan: TablePlan, stride, grad: bool, direct: bool, interleaved: bool
) -> dict:
    """Each exact method that applies, as a function that runs it once (forward, and
    backward when ``grad``) on synthetic tensors of the shapes of ``x`` and ``weight``."""

    @functools.cache
    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)  # the global generator is untouched
        # laid out as x is (a channels-last input takes other library kernels)
        xs = torch.empty_like(x, device="cpu").normal_(generator=generator).to(x.device)
        ws = torch.randn(weight.shape, generator=generator, dtype=x.dtype).to(x.device)
        return xs.requires_grad_(recorded(x)), ws.requires_grad_(recorded(weight))

    def run(method: str) -> None:
        xs, ws = inputs()
        with torch.set_grad_enabled(grad):
            y = conv(method, xs, plan, ws, None, stride)
            if grad:
                torch.autograd.grad(y, [t for t in (xs, ws) if t.requires_grad], torch.ones_like(y))

    n, c_in, height, width = x.shape
    rows, kh, kw = weight.shape
    methods = ["dense", *(["direct"] if direct else []), *(["interleaved"] if interleaved else [])]
    if rows == plan.out_maps:
        methods.append("depthwise")
    h_out, w_out = valid_hw((height, width), (kh, kw), stride)
    patches = c_in * kh * kw * n * h_out * w_out * x.element_size()
    if patches <= 2**28:  # the unfolded copy must fit in memory comfortably
        methods.append("unfold")
    if x.dtype in (torch.float32, torch.float64):
        methods.append("fourier")
    return {method: functools.partial(run, method) for method in methods}


def conv(method: str, x, plan: TablePlan, weight, bias, stride) -> torch.Tensor:  # noqa: ANN001
    """The filter bank by ``method`` (not ``"auto"``), ``(N, C_out, H_out, W_out)``."""
    if method == "depthwise":
        return _depthwise(x, plan.table, weight, bias, stride, plan.out_maps)
    if method == "direct":
        return _direct(x, plan, weight, bias, stride)
    if method == "fourier":
        return _fourier(x, plan, weight, bias, stride)
    if method == "interleaved":
        return _interleaved(x, plan, weight, bias, stride)
    if method == "unfold":
        return _unfold(x, plan, weight, bias, stride)
    return _dense(x, plan, weight, bias, stride)


def _choose(
    x_shape: torch.Size,
    weight_shape: torch.Size,
    c_out: int,
    stride: tuple[int, int],
    dtype: torch.dtype,
    direct: bool = False,
    interleaved: bool = False,
) -> str:
    """Pick the method with the fewest multiply-adds, weighted by their measured speed;
    ``"direct"`` (where it applies, ``direct``) for a bank of one input map, which has no
    sum over maps for the library's convolution to spread over its vectors; and
    ``"interleaved"`` (where it applies) for a sparse table given enough images to fill
    its vectors, since it makes only the table's multiply-adds."""
    n, c_in, height, width = x_shape
    rows, kh, kw = weight_shape
    if direct and c_in == 1:
        return "direct"
    if rows == c_out and c_in >= _DEPTHWISE_MIN_MAPS:  # each output has exactly one input
        return "depthwise"
    h_out, w_out = valid_hw((height, width), (kh, kw), stride)
    sparse = rows <= _UNFOLD_MAX_FILL * c_in * c_out
    if sparse and n * h_out * w_out <= _UNFOLD_MAX_POSITIONS:
        return "unfold"
    if sparse and interleaved and n * dtype.itemsize >= _INTERLEAVED_MIN_BYTES:
        return "interleaved"
    if dtype not in (torch.float32, torch.float64):  # no half-precision FFT on every device
        return "dense"
    dense = n * c_out * c_in * h_out * w_out * kh * kw
    h, w = (h_out - 1) * stride[0] + kh, (w_out - 1) * stride[1] + kw
    spectrum = 2 * h * (w // 2 + 1)  # real numbers per map in the half spectrum
    fourier = spectrum * (
        2 * n * c_in * c_out  # the per-frequency products
        + n * c_out * h_out * w_out  # the inverse transform onto the kept positions
        + rows * kh * kw  # the kernels' spectra (as a plain DFT would; an FFT needs less)
        + c_in * c_out  # scattering them into the dense spectrum
    )
    return "fourier" if _FOURIER_MARGIN * fourier < dense else "dense"


def _dense(x, plan: TablePlan, weight, bias, stride) -> torch.Tensor:  # noqa: ANN001
    layout = _output_layout(x, weight)
    if x.is_contiguous():
        # Standard strides: a contiguous tensor with one map can carry channels-last
        # strides (the map's stride is free when there is one), and the library's
        # convolution would then take its channels-last kernels, slower for training.
        x = x.view(-1).view(x.shape)
    return F.conv2d(x, dense_weight(weight, plan, x.shape[1], layout), bias, stride)


def _direct(x, plan: TablePlan, weight, bias, stride) -> torch.Tensor:  # noqa: ANN001
    if tuple(stride) != (1, 1):
        raise ValueError(f'method="direct" needs stride 1, got stride {tuple(stride)}')
    if not _direct_applies(x, weight, plan, stride, bias):
        raise ValueError(
            'method="direct" cannot take these tensors: it needs float32 or float64 CPU '
            "tensors of one dtype, output maps that fill whole vectors (a multiple of 16 in "
            "float32, 8 in float64), the compiled kernels, and no transform, tracing or "
            f"autocast; got x {x.dtype} on {x.device.type}, weight {weight.dtype}, "
            f"{plan.out_maps} output maps, compiled kernels "
            f"{'built' if native_ops() is not None else 'not built'}"
        )
    return direct_conv2d(x, dense_weight(weight, plan, x.shape[1]), bias)


def _interleaved(x, plan: TablePlan, weight, bias, stride) -> torch.Tensor:  # noqa: ANN001
    if not _interleaved_applies(x, weight, stride, bias):
        raise ValueError(
            'method="interleaved" cannot take these tensors: it needs stride 1, float32 or '
            "float64 CPU tensors of one dtype, kernels at most 16 wide, the compiled kernels, "
            f"and no transform, tracing or autocast; got stride {tuple(stride)}, x {x.dtype} "
            f"on {x.device.type}, weight {weight.dtype} of shape {tuple(weight.shape)}, "
            f"compiled kernels {'built' if native_ops() is not None else 'not built'}"
        )
    return interleaved_table_conv2d(x, weight, bias, plan.table, plan.out_maps)


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
        and not (recorded(x) or recorded(weight))
    ):
        return torch.channels_last
    return torch.contiguous_format


def _unfold(
    x: torch.Tensor,
    plan: TablePlan,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
) -> torch.Tensor:
    n = x.shape[0]
    kh, kw = weight.shape[1:]
    h_out, w_out = valid_hw(x.shape[2:], (kh, kw), stride)
    positions = h_out * w_out
    c_in, slots = plan.slot_rows.shape
    x = x[:, :c_in]  # maps beyond the table's are never read
    kernels = _slot_kernels(weight, plan)
    windows = x.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # (N, C_in, Ho, Wo, kh, kw)
    # one copy straight into the layout of the product (twice as fast as F.unfold here)
    patches = windows.permute(1, 4, 5, 0, 2, 3).reshape(c_in, kh * kw, n * positions)
    products = torch.bmm(kernels, patches).view(c_in * slots, n * positions)
    # Whole rows added along dim 0: much faster than along an inner dim.
    sums = products.new_zeros(plan.out_maps + 1, n * positions)  # last map: the padding's
    sums = sums.index_add_(0, plan.slot_outputs.view(-1), products)
    y = sums[: plan.out_maps]  # (C_out, N L)
    if bias is not None:
        y = y + bias.view(-1, 1)
    return y.view(plan.out_maps, n, h_out, w_out).transpose(0, 1).contiguous()


def _slot_kernels(weight: torch.Tensor, plan: TablePlan) -> torch.Tensor:
    """``(C_in, S, kh kw)``: the kernels of each input map's table rows, zero-padded."""
    rows, kh, kw = weight.shape
    flat = weight.reshape(rows, kh * kw)
    if plan.slot_rows.numel() > rows:  # some input maps have fewer rows: pad with zeros
        flat = torch.cat([flat, weight.new_zeros(1, kh * kw)])
    slots = flat.index_select(0, plan.slot_rows.view(-1))  # its backward: one index_add
    return slots.view(*plan.slot_rows.shape, kh * kw)


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
    h_out, w_out = valid_hw(x.shape[2:], (kh, kw), stride)
    h, w = (h_out - 1) * stride[0] + kh, (w_out - 1) * stride[1] + kw
    freqs = h * (w // 2 + 1)
    x = x[:, :, :h, :w]  # the rows and columns the output reads

    # Each frequency's complex product, in real arithmetic: a row of (Re z, Im z) pairs
    # times columns of (Re w^, Im w^) pairs gives Re(z conj(w^)); the same row for -i z,
    # i.e. (Im z, -Re z), gives Im(z conj(w^)).
    z = torch.fft.rfft2(x).permute(2, 3, 0, 1).reshape(freqs, n, c_in)  # (F, N, C_in) complex
    z = torch.view_as_real(torch.cat([z, -1j * z], 1)).view(freqs, 2 * n, 2 * c_in)

    w_hat = _dense_spectra(weight, plan, (h, w), c_in)

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
    ``(Re w^, Im w^)`` at rows ``2 i, 2 i + 1`` and column ``o`` of its table row ``(i, o)``.

    The spectra of all ``K`` kernels are one matrix product with the DFT's basis
    (:func:`_forward_basis`), ``(2F, kh kw) @ (kh kw, K)``: for small kernels far cheaper
    than ``K`` zero-padded FFTs, and already in the order the scatter reads.
    """
    table, c_out = plan.table, plan.out_maps
    rows, kh, kw = weight.shape
    freqs = size[0] * (size[1] // 2 + 1)
    at = 2 * table[:, 0] * c_out + table[:, 1]  # (K,) row 2i, column o of a 2C_in x C_out
    order = torch.argsort(at)  # the scatter then writes in increasing addresses: 2x faster
    at = at[order]
    kernels = weight.reshape(rows, kh * kw).index_select(0, order)
    basis = _forward_basis(kh, kw, *size, weight.dtype, weight.device)  # (2F, kh kw)
    w_hat = (basis @ kernels.T).view(freqs, 2 * rows)  # (F, Re K | Im K)
    at = torch.cat([at, at + c_out])  # (2K,) Re w^ at row 2i, Im at row 2i + 1
    dense = w_hat.new_zeros(freqs, 2 * c_in * c_out).index_add_(1, at, w_hat)
    return dense.view(freqs, 2 * c_in, c_out)


@functools.lru_cache(maxsize=8)
def _forward_basis(
    kh: int, kw: int, h: int, w: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The half-spectrum DFT of a ``kh x kw`` kernel zero-padded to ``h x w``, as a matrix.

    Returns ``(2F, kh kw)`` with ``F = h (w // 2 + 1)``: row ``2 f`` gives ``Re w^(u, v)``
    and row ``2 f + 1`` gives ``Im w^(u, v)`` at frequency ``f = (u, v)``, where
    ``w^(u, v) = sum_{p, q} w(p, q) exp(-2 pi i (u p / h + v q / w))`` (``torch.fft.rfft2``).
    """
    f64 = torch.float64
    u = torch.arange(h, dtype=f64).view(-1, 1, 1, 1)
    v = torch.arange(w // 2 + 1, dtype=f64).view(1, -1, 1, 1)
    p = torch.arange(kh, dtype=f64).view(1, 1, -1, 1)
    q = torch.arange(kw, dtype=f64).view(1, 1, 1, -1)
    angle = (2 * math.pi * (u * p / h + v * q / w)).reshape(-1, kh * kw)  # (F, kh kw)
    with torch.inference_mode(False):  # kept: usable by a later training step
        basis = torch.stack([angle.cos(), -angle.sin()], dim=1).reshape(-1, kh * kw)
        return basis.to(device=device, dtype=dtype)


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
