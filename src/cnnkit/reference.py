"""The lecture's formulas, transcribed literally in float64 NumPy.

This module is the referee: slow on purpose, written to be read beside the lecture, and
importing nothing else from cnnkit. The fast code in :mod:`cnnkit.ops` is tested against it.

Indices follow the lecture where a formula names them (1-based signals, kernels centred
at 0); arrays are NumPy's 0-based underneath, and each function says how it maps one to
the other.
"""

from __future__ import annotations

import itertools

import numpy as np

# ---------------------------------------------------------------------------------------
# Section 5: convolution
# ---------------------------------------------------------------------------------------


def convolve_1d_centred(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Eq. (1) with a kernel of length 2m+1 indexed -m..m: ``(x*K)(i) = sum_j x(i-j) K(j)``.

    ``x`` holds x(1..n) and ``kernel[j + m]`` holds K(j). The result holds (x*K)(i) for
    i = m+1, ..., n-m, the only indices where every x(i-j) exists: n - 2m values.
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    n, length = len(x), len(kernel)
    if length % 2 != 1:
        raise ValueError(f"kernel must have odd length 2m+1, got {length}")
    m = length // 2

    def x_at(i: int) -> float:  # x(i), 1-based
        return x[i - 1]

    def k_at(j: int) -> float:  # K(j), j in -m..m
        return kernel[j + m]

    out = []
    for i in range(m + 1, n - m + 1):
        out.append(sum(x_at(i - j) * k_at(j) for j in range(-m, m + 1)))
    return np.array(out, dtype=np.float64)


def convolve_1d_one_based(x: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (2): a kernel indexed 1..2m+1, ``(x*K)(i) = sum_{j=1}^{2m+1} x(i-j) K(j)``.

    Returns ``(indices, values)``: the result is defined for i = 2m+2, ..., n+1 -- the same
    n - 2m values as eq. (1), at indices shifted by m+1.
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    n, length = len(x), len(kernel)
    indices = np.arange(length + 1, n + 2)
    values = np.array(
        [sum(x[i - j - 1] * kernel[j - 1] for j in range(1, length + 1)) for i in indices],
        dtype=np.float64,
    )
    return indices, values


def convolve_2d_centred(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The 2-D form: ``(x*K)(i, j) = sum_{k=-a}^{a} sum_{l=-b}^{b} x(i-k, j-l) K(k, l)``.

    ``x`` is (m, n), ``kernel`` is (2a+1, 2b+1) with ``kernel[k + a, l + b]`` = K(k, l).
    Defined for i = a+1..m-a, j = b+1..n-b: an (m-2a, n-2b) array.
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    rows, cols = x.shape
    a, b = kernel.shape[0] // 2, kernel.shape[1] // 2
    out = np.zeros((rows - 2 * a, cols - 2 * b))
    for i in range(a + 1, rows - a + 1):
        for j in range(b + 1, cols - b + 1):
            total = 0.0
            for k in range(-a, a + 1):
                for l in range(-b, b + 1):
                    total += x[i - k - 1, j - l - 1] * kernel[k + a, l + b]
            out[i - a - 1, j - b - 1] = total
    return out


def convolve_3d_centred(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The 3-D form on volumes: ``(x*K)(i,j,k) = sum_{p,q,r} x(i-p, j-q, k-r) K(p, q, r)``.

    Kernel indices are centred at 0 on every axis; the result is valid-only, of size
    (d-2a, m-2b, n-2c).
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    half = [s // 2 for s in kernel.shape]
    out_shape = [xs - 2 * h for xs, h in zip(x.shape, half, strict=True)]
    out = np.zeros(out_shape)
    for i, j, k in itertools.product(*(range(s) for s in out_shape)):
        centre = (i + half[0], j + half[1], k + half[2])  # 0-based centre in x
        total = 0.0
        for p, q, r in itertools.product(*(range(-h, h + 1) for h in half)):
            total += (
                x[centre[0] - p, centre[1] - q, centre[2] - r]
                * kernel[p + half[0], q + half[1], r + half[2]]
            )
        out[i, j, k] = total
    return out


def convolve(x: np.ndarray, kernel: np.ndarray, mode: str = "valid") -> np.ndarray:
    """N-d discrete convolution ``sum_j x(i-j) K(j)`` of one signal, any kernel lengths.

    ``"full"`` keeps every index where some product is defined (x taken as zero outside
    its support), length n+L-1 per axis; ``"valid"`` keeps the n-L+1 indices needing no
    zeros; ``"same"`` keeps n values centred in the full result, starting at index
    (L-1)//2 of it (scipy.signal's convention, which for even L puts the extra value on
    the left).
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    full_shape = tuple(n + k - 1 for n, k in zip(x.shape, kernel.shape, strict=True))
    full = np.zeros(full_shape)
    for i in np.ndindex(*full_shape):
        total = 0.0
        for j in np.ndindex(*kernel.shape):
            src = tuple(ii - jj for ii, jj in zip(i, j, strict=True))
            if all(0 <= s < n for s, n in zip(src, x.shape, strict=True)):
                total += x[src] * kernel[j]
        full[i] = total
    return _crop(full, x.shape, kernel.shape, mode)


def correlate(x: np.ndarray, kernel: np.ndarray, mode: str = "valid") -> np.ndarray:
    """N-d correlation ``sum_j x(i+j) K(j)``: convolution with the kernel flipped on every axis."""
    kernel = np.asarray(kernel, dtype=np.float64)
    return convolve(x, kernel[tuple(slice(None, None, -1) for _ in kernel.shape)], mode)


def _crop(full: np.ndarray, x_shape, k_shape, mode: str) -> np.ndarray:
    if mode == "full":
        return full
    if mode == "valid":
        return full[tuple(slice(k - 1, n) for n, k in zip(x_shape, k_shape, strict=True))]
    if mode == "same":
        return full[
            tuple(
                slice((k - 1) // 2, (k - 1) // 2 + n) for n, k in zip(x_shape, k_shape, strict=True)
            )
        ]
    raise ValueError(f"mode must be 'valid', 'same' or 'full', got {mode!r}")


# ---------------------------------------------------------------------------------------
# Section 2: the layers of LeCun's example
# ---------------------------------------------------------------------------------------


def table_correlate_2d(
    x: np.ndarray, table: np.ndarray, kernels: np.ndarray, bias: np.ndarray | None = None
) -> np.ndarray:
    """A connection-table filter bank, one 2-D kernel at a time.

    ``x`` is (C_in, H, W); ``table`` is (K, 2) rows of (input map, output map);
    ``kernels`` is (K, kh, kw). Output map o is ``bias[o] + sum over rows r with
    table[r, 1] == o of correlate(x[table[r, 0]], kernels[r])`` (valid).
    """
    x = np.asarray(x, dtype=np.float64)
    table = np.asarray(table)
    n_out = int(table[:, 1].max()) + 1
    kh, kw = kernels.shape[1:]
    out = np.zeros((n_out, x.shape[1] - kh + 1, x.shape[2] - kw + 1))
    for r, (i, o) in enumerate(table):
        out[o] += correlate(x[i], kernels[r], "valid")
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)[:, None, None]
    return out


def relu(x: np.ndarray) -> np.ndarray:
    """ReLU: ``x_ijk -> max(0, x_ijk)``."""
    return np.array([max(0.0, v) for v in np.ravel(x)]).reshape(np.shape(x))


def rectify(x: np.ndarray) -> np.ndarray:
    """Rectification: ``x_ijk -> |x_ijk|``."""
    return np.array([abs(v) for v in np.ravel(x)]).reshape(np.shape(x))


def gaussian_window(size: int, sigma: float, maps: int) -> np.ndarray:
    """Weights ``w[i, p, q]`` over (maps, size, size), Gaussian in (p, q), summing to 1.

    ``w[i, p, q] = exp(-(p^2 + q^2) / (2 sigma^2)) / Z`` with p, q measured from the centre
    and Z making the sum over i, p and q equal to 1 (the lecture's ``sum w_pq = 1``).
    """
    half = (size - 1) / 2
    w = np.zeros((maps, size, size))
    for i in range(maps):
        for p in range(size):
            for q in range(size):
                w[i, p, q] = np.exp(-((p - half) ** 2 + (q - half) ** 2) / (2 * sigma**2))
    return w / w.sum()


def _window_sum(x: np.ndarray, w: np.ndarray, j: int, k: int, border: str) -> tuple[float, float]:
    """``sum_{i,p,q} w[i,p,q] x[i, j+p, k+q]`` with p, q centred, and the weight used.

    Returns ``(total, mass)``: ``mass`` is the sum of the weights whose pixel exists
    ("zero", "renormalize") or 1 ("reflect", which mirrors indices into the image).
    """
    maps, size_h, size_w = w.shape
    _, height, width = x.shape
    total, mass = 0.0, 0.0
    for i in range(maps):
        for p in range(size_h):
            for q in range(size_w):
                row, col = j + p - (size_h - 1) // 2, k + q - (size_w - 1) // 2
                if border == "reflect":
                    row, col = _reflect(row, height), _reflect(col, width)
                elif not (0 <= row < height and 0 <= col < width):
                    continue
                total += w[i, p, q] * x[i, row, col]
                mass += w[i, p, q]
    return total, mass


def _reflect(index: int, n: int) -> int:
    # Mirror without repeating the edge: -1 -> 1, n -> n-2 (numpy's "reflect").
    if index < 0:
        return -index
    if index >= n:
        return 2 * (n - 1) - index
    return index


def subtractive_norm(x: np.ndarray, w: np.ndarray, border: str = "renormalize") -> np.ndarray:
    """``v_ijk = x_ijk - sum_{i,p,q} w_pq x_{i, j+p, k+q}`` for one (maps, H, W) image.

    Borders: ``"zero"`` treats pixels outside the image as 0; ``"renormalize"`` divides
    the sum by the mass of the weights that fall inside the image (so it is a weighted
    mean of the pixels that exist); ``"reflect"`` mirrors indices into the image.
    """
    x = np.asarray(x, dtype=np.float64)
    v = np.zeros_like(x)
    _, height, width = x.shape
    for j in range(height):
        for k in range(width):
            total, mass = _window_sum(x, w, j, k, border)
            mean = total / mass if border == "renormalize" else total
            v[:, j, k] = x[:, j, k] - mean
    return v


def divisive_norm(
    v: np.ndarray,
    w: np.ndarray,
    threshold: float | str = "mean",
    border: str = "renormalize",
    floor: float = 1e-4,
) -> np.ndarray:
    """``y_ijk = v_ijk / max(c, sigma_jk)``, ``sigma_jk = (sum_ipq w_pq v^2_{i,j+p,k+q})^(1/2)``.

    ``threshold`` is c: a number, or ``"mean"`` for the mean of sigma over the image.
    c is raised to at least ``floor`` so a flat image never divides by zero. Borders as
    in :func:`subtractive_norm` (renormalize divides the sum of squares by the inside mass).
    """
    v = np.asarray(v, dtype=np.float64)
    _, height, width = v.shape
    sigma = np.zeros((height, width))
    for j in range(height):
        for k in range(width):
            total, mass = _window_sum(v**2, w, j, k, border)
            sigma[j, k] = np.sqrt(total / mass if border == "renormalize" else total)
    c = sigma.mean() if threshold == "mean" else float(threshold)
    c = max(c, floor)
    y = np.zeros_like(v)
    for j in range(height):
        for k in range(width):
            y[:, j, k] = v[:, j, k] / max(c, sigma[j, k])
    return y


def pool_2d(x: np.ndarray, kind: str, window: int, stride: int = 1, p: float = 2.0) -> np.ndarray:
    """Pooling of one (H, W) map over ``window`` x ``window`` blocks at ``stride`` (valid).

    max: the largest value of the block; avg: its mean; lp: ``(sum |x|^p)^(1/p)``, the
    block's ``L_p`` norm.
    """
    x = np.asarray(x, dtype=np.float64)
    height, width = x.shape
    rows = range(0, height - window + 1, stride)
    cols = range(0, width - window + 1, stride)
    out = np.zeros((len(rows), len(cols)))
    for a, r in enumerate(rows):
        for b, c in enumerate(cols):
            block = [x[r + u, c + v] for u in range(window) for v in range(window)]
            if kind == "max":
                out[a, b] = max(block)
            elif kind == "avg":
                out[a, b] = sum(block) / len(block)
            elif kind == "lp":
                out[a, b] = sum(abs(value) ** p for value in block) ** (1.0 / p)
            else:
                raise ValueError(f"kind must be 'max', 'avg' or 'lp', got {kind!r}")
    return out


def subsample_2d(x: np.ndarray, stride: int) -> np.ndarray:
    """Keep the points (1, 1), (1, 1+s), ..., in the lecture's 1-based coordinates."""
    x = np.asarray(x, dtype=np.float64)
    height, width = x.shape
    rows = list(range(1, height + 1, stride))  # 1-based, as in the lecture
    cols = list(range(1, width + 1, stride))
    return np.array([[x[r - 1, c - 1] for c in cols] for r in rows])


# ---------------------------------------------------------------------------------------
# Section 3: training with tied weights
# ---------------------------------------------------------------------------------------


def max_identity(x1: float, x2: float) -> float:
    """``max(x1, x2) = 1/2 (|x1 - x2| + x1 + x2)``."""
    return 0.5 * (abs(x1 - x2) + x1 + x2)


def max_derivative(xs: np.ndarray, index: int) -> float:
    """``d max(x_1, ..., x_n) / d x_index``: 1 if that entry exceeds every other, else 0."""
    others = [v for i, v in enumerate(xs) if i != index]
    return 1.0 if all(xs[index] > v for v in others) else 0.0


def tie_average(new_values: np.ndarray) -> np.ndarray:
    """``w_i(new) = (1/N) sum_j w~_j(new)`` for every i in one tied group."""
    new_values = np.asarray(new_values, dtype=np.float64)
    return np.full_like(new_values, sum(new_values) / len(new_values))
