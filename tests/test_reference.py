"""The lecture's worked facts of Section 5, each checked on the referee and on the fast ops."""

from __future__ import annotations

import numpy as np
import pytest

from cnnkit import reference
from cnnkit.ops.convolution import convolve, correlate

RNG = np.random.default_rng(2024)


@pytest.mark.parametrize(("n", "m"), [(5, 0), (5, 1), (10, 2), (17, 4), (9, 4)])
def test_kernel_of_length_2m_plus_1_leaves_n_minus_2m_values(n, m):
    x, kernel = RNG.standard_normal(n), RNG.standard_normal(2 * m + 1)
    slow = reference.convolve_1d_centred(x, kernel)
    fast = convolve(x, kernel)
    assert slow.shape == fast.shape == (n - 2 * m,)
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_three_tap_example():
    # K = [K(-1), K(0), K(1)] stored at indices 0, 1, 2; x = [x(1), ..., x(n)].
    n = 8
    x = RNG.standard_normal(n)
    kernel = RNG.standard_normal(3)

    def x_at(i):  # x(i), 1-based
        return x[i - 1]

    def k_at(j):  # K(j), j in -1..1
        return kernel[j + 1]

    by_hand = [
        x_at(i - 1) * k_at(1) + x_at(i) * k_at(0) + x_at(i + 1) * k_at(-1) for i in range(2, n)
    ]  # defined for i = 2, ..., n-1 only
    assert len(by_hand) == n - 2
    np.testing.assert_allclose(reference.convolve_1d_centred(x, kernel), by_hand, atol=1e-12)
    np.testing.assert_allclose(convolve(x, kernel), by_hand, atol=1e-12)


@pytest.mark.parametrize(("n", "m"), [(9, 1), (12, 3)])
def test_indexing_the_kernel_1_to_2m_plus_1_shifts_the_result_only(n, m):
    x, kernel = RNG.standard_normal(n), RNG.standard_normal(2 * m + 1)
    indices, values = reference.convolve_1d_one_based(x, kernel)
    np.testing.assert_array_equal(indices, np.arange(2 * m + 2, n + 2))  # i = 2m+2, ..., n+1
    centred = reference.convolve_1d_centred(x, kernel)  # i = m+1, ..., n-m
    assert len(values) == len(centred) == n - 2 * m
    np.testing.assert_allclose(values, centred, atol=1e-12)  # same values, indices moved by m+1
    np.testing.assert_allclose(convolve(x, kernel), values, atol=1e-12)


@pytest.mark.parametrize(("rows", "cols", "a", "b"), [(7, 9, 1, 2), (10, 6, 3, 0), (5, 5, 2, 2)])
def test_two_dimensional_size_is_m_minus_2a_by_n_minus_2b(rows, cols, a, b):
    x = RNG.standard_normal((rows, cols))
    kernel = RNG.standard_normal((2 * a + 1, 2 * b + 1))
    slow = reference.convolve_2d_centred(x, kernel)
    fast = convolve(x, kernel)
    assert slow.shape == fast.shape == (rows - 2 * a, cols - 2 * b)
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_zero_padding_keeps_the_length():
    n = 10
    x, kernel = RNG.standard_normal(n), RNG.standard_normal(3)
    padded = np.concatenate([[0.0], x, [0.0]])  # declare x(0) = x(n+1) = 0
    by_padding = reference.convolve_1d_centred(padded, kernel)
    assert by_padding.shape == (n,)
    np.testing.assert_allclose(convolve(x, kernel, "same"), by_padding, atol=1e-12)
    np.testing.assert_allclose(reference.convolve(x, kernel, "same"), by_padding, atol=1e-12)
    # ... and it distorts the boundary: the end values differ from the unpadded formula's.
    x_ramp = 5.0 + np.arange(n)
    slopes = convolve(x_ramp, np.array([0.5, 0.0, -0.5]), "same")
    np.testing.assert_allclose(slopes[1:-1], 1.0)
    np.testing.assert_allclose(
        [slopes[0], slopes[-1]], [3.0, -6.5]
    )  # 0.5 * (6 - 0), 0.5 * (0 - 13)


SOBEL_GX = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def test_sobel_gx_behaves_as_d_by_dx():
    rows, cols = np.mgrid[0:12, 0:15].astype(np.float64)
    slope = 0.7
    ramp_in_x = 3.0 + slope * cols  # x runs along the columns
    response = convolve(ramp_in_x, SOBEL_GX)
    assert response.shape == (10, 13)
    # Constant response: the central difference f(x+1) - f(x-1) = 2*slope, weighted 1+2+1.
    np.testing.assert_allclose(response, 8 * slope, atol=1e-12)
    np.testing.assert_allclose(reference.convolve_2d_centred(ramp_in_x, SOBEL_GX), 8 * slope)
    np.testing.assert_allclose(convolve(np.full((6, 6), 5.0), SOBEL_GX), 0.0, atol=1e-12)
    np.testing.assert_allclose(convolve(3.0 + slope * rows, SOBEL_GX), 0.0, atol=1e-12)
    # Correlation does not flip the kernel, so it measures -d/dx with the same filter.
    np.testing.assert_allclose(correlate(ramp_in_x, SOBEL_GX), -8 * slope, atol=1e-12)


def test_layer_three_volume_is_a_sum_of_two_dimensional_convolutions():
    volume = RNG.standard_normal((16, 14, 14))  # 16 maps of Layer 2, 14x14 each
    kernel = RNG.standard_normal((16, 9, 9))  # one 3-D kernel = 16 2-D kernels
    out = convolve(volume, kernel)
    assert out.shape == (1, 6, 6)
    # A true convolution flips every axis, the map axis included: map i meets kernel 15 - i.
    by_maps = sum(reference.convolve_2d_centred(volume[i], kernel[15 - i]) for i in range(16))
    np.testing.assert_allclose(out[0], by_maps, atol=1e-12)
    # A correlation (what a layer computes) pairs map i with kernel i.
    by_maps_corr = sum(correlate(volume[i], kernel[i]) for i in range(16))
    np.testing.assert_allclose(correlate(volume, kernel)[0], by_maps_corr, atol=1e-12)
