"""Discrete convolution and correlation of N-d signals: the lecture's Section 5, made fast.

The kernel's rank ``d`` sets how many trailing axes of ``x`` are signal axes; any leading
axes of ``x`` are batch axes, each slice filtered by the same kernel. The work runs on
torch's convolution kernels (``conv1d``/``conv2d``/``conv3d``; more than three signal axes
are folded into the batch one kernel slice at a time), so it is differentiable with
respect to both ``x`` and ``kernel``.

On the CPU, for float32 and bfloat16, every signal of the batch becomes one channel of a
single grouped ("depthwise") convolution, the layout the CPU kernels vectorise best; a
batch too small to fill the vector lanes is cut into overlapping strips along its first
signal axis first. The results are the same as one convolution per signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from cnnkit._validation import check_choice

__all__ = ["convolve", "correlate"]

Mode = Literal["valid", "same", "full"]
Signal = torch.Tensor | npt.ArrayLike  # a tensor, or anything np.asarray takes
_MODES = ("valid", "same", "full")
_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

_NUMPY_FLOATS = {2: torch.float16, 4: torch.float32, 8: torch.float64}  # by itemsize

# Dtypes whose CPU grouped convolution is vectorised across channels (oneDNN's depthwise).
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# Channels those kernels like to see at once (two AVX-512 vectors of float32).
_LANES = 32
# Other dtypes' grouped convolutions loop over groups: worth it only for big signals.
_GROUPED_MIN_WORK = 16384


def convolve(x: Signal, kernel: Signal, mode: Mode = "valid") -> torch.Tensor | np.ndarray:
    """Discrete convolution ``(x * K)(i) = sum_j x(i - j) K(j)``, the lecture's eq. (1), in N-d.

    Args:
        x: signal of shape ``(*batch, n_1, ..., n_d)``: a ``torch.Tensor``, a NumPy array or
            anything ``np.asarray`` accepts.
        kernel: kernel of shape ``(L_1, ..., L_d)``, ``d >= 1``; its rank ``d`` sets the
            number of signal axes. Lengths may be odd or even and differ per axis.
        mode: which outputs to keep, with ``x`` taken as zero outside its support:

            - ``"valid"`` (default, the lecture's choice): only outputs that need no zeros,
              ``o_k = n_k - L_k + 1`` -- for ``L = 2m + 1``, the lecture's ``n - 2m``.
              Every ``L_k <= n_k`` is required (scipy would swap the arguments instead).
            - ``"same"``: ``o_k = n_k``, the middle of the full result, starting at its index
              ``(L_k - 1) // 2`` (scipy.signal's convention). Kernel index ``(L_k - 1) // 2``
              sits on the output sample; for even ``L_k`` that is the left of the two middle
              taps.
            - ``"full"``: every output some product reaches, ``o_k = n_k + L_k - 1``.

    Returns:
        ``(*batch, o_1, ..., o_d)``. A ``torch.Tensor`` when ``x`` or ``kernel`` is one
        (on its device, carrying autograd), otherwise a NumPy array. The dtype is the
        promotion of the floating dtypes among ``x`` and ``kernel`` (float32 with float64
        gives float64); integer operands take the other's floating dtype, and two integer
        operands give float64.

    Raises:
        ValueError: unknown ``mode``; empty ``x`` or ``kernel``; a 0-d kernel or one of
            higher rank than ``x``; in ``"valid"`` mode, a kernel longer than ``x`` on some
            axis; ``x`` and ``kernel`` on different devices.
        TypeError: a bool, complex or non-numeric dtype.

    Example: ``convolve([1., 2., 4., 7.], [1., 0., -1.])`` is ``[3., 5.]``, the central
    difference ``x(i + 1) - x(i - 1)``.
    """
    return _filter(x, kernel, mode, flip=True)


def correlate(x: Signal, kernel: Signal, mode: Mode = "valid") -> torch.Tensor | np.ndarray:
    """Discrete correlation ``y(i) = sum_j x(i + j) K(j)``, what deep-learning layers compute.

    ``correlate(x, K)`` equals ``convolve(x, K)`` with ``K`` reversed on every axis, e.g.
    ``correlate([1., 2., 4., 7.], [1., 0., -1.])`` is ``[-3., -5.]``, while ``convolve``
    gives ``[3., 5.]``. In ``"same"`` mode kernel index ``L_k // 2`` sits on the output
    sample (the mirror of :func:`convolve`'s ``(L_k - 1) // 2``), as in scipy.signal.

    Shapes, modes, dtypes, return kinds and errors are those of :func:`convolve`: ``x`` is
    ``(*batch, n_1, ..., n_d)``, ``kernel`` is ``(L_1, ..., L_d)``, the output is
    ``(*batch, o_1, ..., o_d)`` with ``o_k = n_k - L_k + 1`` (valid), ``n_k`` (same) or
    ``n_k + L_k - 1`` (full).
    """
    return _filter(x, kernel, mode, flip=False)


def _filter(x: Signal, kernel: Signal, mode: str, *, flip: bool) -> torch.Tensor | np.ndarray:
    check_choice("mode", mode, _MODES)
    signal, weight, to_numpy = _as_tensors(x, kernel)
    dims = weight.dim()
    spatial = tuple(signal.shape[signal.dim() - dims :])
    if mode == "valid" and any(k > n for n, k in zip(spatial, weight.shape, strict=True)):
        raise ValueError(
            f"kernel of shape {tuple(weight.shape)} is longer than the signal axes "
            f"{spatial} of x in mode 'valid', which needs kernel length <= signal length on "
            "every axis; use mode 'same' or 'full', or a smaller kernel"
        )
    if flip:
        weight = weight.flip(tuple(range(dims)))
    batch = tuple(signal.shape[: signal.dim() - dims])
    flat = signal.reshape(-1, *spatial)  # (B, n_1, ..., n_d)
    pads = _padding(weight.shape, mode)
    if any(left or right for left, right in pads):
        # F.pad lists (left, right) pairs from the last axis backwards.
        flat = F.pad(flat, [p for pair in reversed(pads) for p in pair])
    out = _correlate_valid(flat, weight)  # (B, o_1, ..., o_d)
    out = out.reshape(*batch, *out.shape[1:])  # (*batch, o_1, ..., o_d)
    return out.detach().cpu().numpy() if to_numpy else out


def _padding(lengths: torch.Size, mode: str) -> list[tuple[int, int]]:
    """Zeros to add (left, right) per axis so that a valid correlation yields ``mode``."""
    if mode == "full":
        return [(k - 1, k - 1) for k in lengths]
    if mode == "same":
        # Output starts at index (L-1)//2 of the full result: L-1 - (L-1)//2 = L//2 zeros left.
        return [(k // 2, (k - 1) // 2) for k in lengths]
    return [(0, 0) for _ in lengths]


def _correlate_valid(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Valid correlation of each signal of ``x`` (B, n_1..n_d) with ``kernel`` (L_1..L_d)."""
    dims = kernel.dim()
    if dims > 3:
        # out[i] = sum_j corr(x[i + j], kernel[j]) over the first axis; the rest recurses.
        batch, length = x.shape[0], kernel.shape[0]
        steps = x.shape[1] - length + 1
        total = None
        for j in range(length):
            part = x[:, j : j + steps].reshape(batch * steps, *x.shape[2:])  # (B*o_1, n_2..)
            term = _correlate_valid(part, kernel[j])  # (B*o_1, o_2, ..., o_d)
            total = term if total is None else total + term
        return total.reshape(batch, steps, *total.shape[1:])  # (B, o_1, ..., o_d)
    conv = _CONV[dims]
    if not _use_groups(x, kernel):
        return conv(x.unsqueeze(1), kernel[None, None]).squeeze(1)  # (B, o_1, ..., o_d)
    pieces = _strip_count(x, kernel)
    if pieces > 1:
        return _correlate_strips(x, kernel, pieces)
    channels = x.shape[0]
    weight = kernel[None, None].expand(channels, 1, *kernel.shape)  # (B, 1, L_1, ..., L_d)
    return conv(x.unsqueeze(0), weight, groups=channels)[0]  # (B, o_1, ..., o_d)


def _use_groups(x: torch.Tensor, kernel: torch.Tensor) -> bool:
    """Whether one grouped convolution (a channel per signal) beats a batch of 1-channel ones."""
    if x.device.type != "cpu":
        return False
    if x.dtype in _ONEDNN_DTYPES:
        return True
    outputs = math.prod(n - k + 1 for n, k in zip(x.shape[1:], kernel.shape, strict=True))
    return outputs * kernel.numel() >= _GROUPED_MIN_WORK


def _strip_count(x: torch.Tensor, kernel: torch.Tensor) -> int:
    """How many strips to cut each signal into along its first axis to fill ``_LANES``."""
    batch = x.shape[0]
    if batch >= _LANES or x.dtype not in _ONEDNN_DTYPES:
        return 1
    steps = x.shape[1] - kernel.shape[0] + 1
    # Strips of at least max(L - 1, 8) outputs: no more than half of a strip is overlap.
    most = steps // max(kernel.shape[0] - 1, 8)
    return max(1, min(-(-_LANES // batch), most))


def _correlate_strips(x: torch.Tensor, kernel: torch.Tensor, pieces: int) -> torch.Tensor:
    """Valid correlation with each signal cut into ``pieces`` overlapping strips."""
    batch, length = x.shape[0], kernel.shape[0]
    steps = x.shape[1] - length + 1
    height = -(-steps // pieces)
    pieces = -(-steps // height)
    extra = pieces * height + length - 1 - x.shape[1]
    if extra:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, extra])  # zeros at the end of axis 1
    strips = x.unfold(1, height + length - 1, height)  # (B, S, n_2, ..., n_d, h + L - 1)
    strips = strips.movedim(-1, 2).reshape(batch * pieces, height + length - 1, *x.shape[2:])
    channels = batch * pieces
    weight = kernel[None, None].expand(channels, 1, *kernel.shape)  # (B*S, 1, L_1, ..., L_d)
    out = _CONV[kernel.dim()](strips.unsqueeze(0), weight, groups=channels)[0]  # (B*S, h, ..)
    return out.reshape(batch, pieces * height, *out.shape[2:])[:, :steps]  # (B, o_1, ...)


def _as_tensors(x: Any, kernel: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Check and convert both operands to tensors of one floating dtype on one device.

    Returns ``(x, kernel, to_numpy)``; ``to_numpy`` is True when neither was a tensor.
    """
    x_arr, x_float = _numeric_kind("x", x)
    k_arr, k_float = _numeric_kind("kernel", kernel)
    floats = [dt for dt in (x_float, k_float) if dt is not None]
    dtype = torch.float64 if not floats else floats[0]
    for other in floats[1:]:
        dtype = torch.promote_types(dtype, other)

    x_shape, k_shape = tuple(x_arr.shape), tuple(k_arr.shape)
    if len(k_shape) == 0:
        raise ValueError(
            "kernel must have at least one dimension (its rank sets the number of signal "
            f"axes), got a scalar of shape {k_shape}"
        )
    if len(k_shape) > len(x_shape):
        raise ValueError(
            f"kernel has {len(k_shape)} dimensions but x has {len(x_shape)}: the kernel's rank "
            f"sets the number of signal axes and must not exceed the rank of x (x shape "
            f"{x_shape}, kernel shape {k_shape})"
        )
    for name, shape in (("x", x_shape), ("kernel", k_shape)):
        if math.prod(shape) == 0:
            raise ValueError(f"{name} must not be empty, got shape {shape}")

    devices = {t.device for t in (x_arr, k_arr) if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(
            f"x and kernel must be on the same device, got x on {x_arr.device} and kernel "
            f"on {k_arr.device}"
        )
    device = devices.pop() if devices else torch.device("cpu")
    to_numpy = not isinstance(x_arr, torch.Tensor) and not isinstance(k_arr, torch.Tensor)
    return _to_tensor(x_arr, dtype, device), _to_tensor(k_arr, dtype, device), to_numpy


def _numeric_kind(name: str, value: Any) -> tuple[Any, torch.dtype | None]:
    """Return ``(array, floating dtype or None for integers)``; refuse other dtypes."""
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        if value.is_complex():
            raise TypeError(_complex_message(name, dtype))
        if dtype == torch.bool or value.is_quantized:
            raise TypeError(_dtype_message(name, dtype))
        return value, dtype if value.is_floating_point() else None
    array = np.asarray(value)
    kind = array.dtype.kind
    if kind == "c":
        raise TypeError(_complex_message(name, array.dtype))
    if kind in "iu":
        return array, None
    if kind == "f":
        return array, _NUMPY_FLOATS.get(array.dtype.itemsize, torch.float64)
    raise TypeError(_dtype_message(name, array.dtype))


def _dtype_message(name: str, dtype: Any) -> str:
    return f"{name} must have a real numeric dtype (integer or floating point), got {dtype}"


def _complex_message(name: str, dtype: Any) -> str:
    return (
        f"{name} must have a real dtype, got complex {dtype}; convolve the real and imaginary "
        "parts separately"
    )


def _to_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype=dtype)
    # A contiguous native-order array: torch.from_numpy takes neither negative strides nor
    # byte-swapped data. NumPy has no bfloat16, so that one is cast from float32.
    numpy_dtype = {torch.float16: np.float16, torch.float64: np.float64}.get(dtype, np.float32)
    array = np.ascontiguousarray(value, dtype=numpy_dtype)
    return torch.from_numpy(array).to(device=device, dtype=dtype)
