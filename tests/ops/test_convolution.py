"""cnnkit.ops.convolution against scipy.signal, the float64 reference, and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit import reference
from cnnkit.ops.convolution import convolve, correlate

MODES = ("valid", "same", "full")
OPS = {
    "convolve": (convolve, scipy.signal.convolve),
    "correlate": (correlate, scipy.signal.correlate),
}


def _scipy_batched(op: str, x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """scipy on each signal of a batch (scipy has no batch axes), in float64."""
    fn = OPS[op][1]
    signals = x.reshape(-1, *x.shape[x.ndim - kernel.ndim :]).astype(np.float64)
    outs = [fn(s, kernel.astype(np.float64), mode=mode, method="direct") for s in signals]
    return np.stack(outs).reshape(*x.shape[: x.ndim - kernel.ndim], *outs[0].shape)


# --- property tests against scipy.signal ------------------------------------------------


@st.composite
def problems(draw):
    dims = draw(st.integers(1, 3))
    max_side = {1: 24, 2: 9, 3: 5}[dims]
    mode = draw(st.sampled_from(MODES))
    kernel_shape = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    if mode == "valid":
        shape = tuple(draw(st.integers(k, max(k, max_side))) for k in kernel_shape)
    else:  # same/full accept kernels longer than the signal
        shape = tuple(draw(st.integers(1, max_side)) for _ in kernel_shape)
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    return {
        "op": draw(st.sampled_from(sorted(OPS))),
        "mode": mode,
        "x_shape": batch + shape,
        "kernel_shape": kernel_shape,
        "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=80, deadline=None)
@given(problems())
def test_matches_scipy(p):
    rng = np.random.default_rng(p["seed"])
    x = rng.standard_normal(p["x_shape"]).astype(p["dtype"])
    kernel = rng.standard_normal(p["kernel_shape"]).astype(p["dtype"])
    got = OPS[p["op"]][0](x, kernel, p["mode"])
    expected = _scipy_batched(p["op"], x, kernel, p["mode"])
    assert isinstance(got, np.ndarray)
    assert got.dtype == p["dtype"]
    assert got.shape == expected.shape
    tol = 1e-12 if p["dtype"] == np.float64 else 1e-5
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("x_shape", "kernel_shape"),
    [
        ((1, 2000), (9,)),  # one long signal: cut into strips
        ((3, 200, 40), (4, 5)),  # a few images, even and odd lengths: strips
        ((2, 60, 9, 8), (7, 3, 2)),  # volumes: strips
        ((40, 30, 30), (5, 5)),  # enough images to fill the lanes: no strips
        ((1, 300), (300,)),  # kernel as long as the signal
    ],
)
def test_grouped_float32_paths_match_scipy(op, mode, x_shape, kernel_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal(kernel_shape).astype(np.float32)
    expected = _scipy_batched(op, x, kernel, mode)
    got = OPS[op][0](x, kernel, mode)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("mode", MODES)
def test_four_and_five_dimensional_signals(op, mode):
    rng = np.random.default_rng(1)
    for x_shape, kernel_shape in [
        ((2, 5, 4, 6, 5), (3, 2, 3, 2)),
        ((4, 3, 4, 3, 4), (2, 3, 2, 1, 3)),
    ]:
        x = rng.standard_normal(x_shape)
        kernel = rng.standard_normal(kernel_shape)
        expected = _scipy_batched(op, x, kernel, mode)
        np.testing.assert_allclose(OPS[op][0](x, kernel, mode), expected, rtol=1e-12, atol=1e-12)


def test_lecun_first_layer_shape():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(64, 83, 83)).astype(np.float32)
    kernel = rng.standard_normal((9, 9)).astype(np.float32)
    out = correlate(torch.from_numpy(images), torch.from_numpy(kernel))
    assert out.shape == (64, 75, 75)
    for i in (0, 37, 63):
        expected = scipy.signal.correlate(images[i].astype(np.float64), kernel, mode="valid")
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-5, atol=1e-5 * 255 * 9)


def test_float64_large_signals_take_the_grouped_path_exactly():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 40, 41))
    kernel = rng.standard_normal((5, 4))
    for mode in MODES:
        np.testing.assert_allclose(
            convolve(x, kernel, mode), _scipy_batched("convolve", x, kernel, mode), atol=1e-12
        )


# --- equal to the float64 reference to 1e-12 -----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("x_shape", "kernel_shape"),
    [
        ((12,), (4,)),
        ((11,), (5,)),
        ((6, 7), (3, 2)),
        ((5, 4, 6), (2, 3, 3)),
        ((3, 3, 2, 3), (2, 1, 2, 2)),
    ],
)
def test_equals_reference(mode, x_shape, kernel_shape):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(x_shape)
    kernel = rng.standard_normal(kernel_shape)
    np.testing.assert_allclose(
        convolve(x, kernel, mode), reference.convolve(x, kernel, mode), rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        correlate(x, kernel, mode), reference.correlate(x, kernel, mode), rtol=0, atol=1e-12
    )


def test_equals_the_lectures_centred_formulas():
    rng = np.random.default_rng(5)
    x1, k1 = rng.standard_normal(15), rng.standard_normal(5)
    np.testing.assert_allclose(convolve(x1, k1), reference.convolve_1d_centred(x1, k1), atol=1e-12)
    x2, k2 = rng.standard_normal((9, 8)), rng.standard_normal((3, 5))
    np.testing.assert_allclose(convolve(x2, k2), reference.convolve_2d_centred(x2, k2), atol=1e-12)
    x3, k3 = rng.standard_normal((6, 7, 5)), rng.standard_normal((3, 5, 3))
    np.testing.assert_allclose(convolve(x3, k3), reference.convolve_3d_centred(x3, k3), atol=1e-12)


# --- small cases by hand -------------------------------------------------------------------


def test_by_hand_one_dimensional():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    kernel = np.array([1.0, 0.0, -1.0])
    np.testing.assert_array_equal(convolve(x, kernel), [3.0, 5.0])  # x(i+1) - x(i-1)
    np.testing.assert_array_equal(correlate(x, kernel), [-3.0, -5.0])
    np.testing.assert_array_equal(convolve(x, kernel, "same"), [2.0, 3.0, 5.0, -4.0])
    np.testing.assert_array_equal(convolve(x, kernel, "full"), [1.0, 2.0, 3.0, 5.0, -4.0, -7.0])


def test_even_kernel_same_mode_convention():
    # convolve: kernel index (L-1)//2 = 1 sits on the output sample; correlate: L//2 = 2.
    x = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    kernel = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(convolve(x, kernel, "same"), [0.0, 1.0, 2.0, 3.0, 4.0, 0.0])
    np.testing.assert_array_equal(correlate(x, kernel, "same"), [0.0, 4.0, 3.0, 2.0, 1.0, 0.0])


def test_correlate_is_convolve_with_the_kernel_reversed_on_every_axis():
    rng = np.random.default_rng(6)
    x, kernel = rng.standard_normal((2, 7, 6, 5)), rng.standard_normal((3, 2, 4))
    for mode in MODES:
        np.testing.assert_allclose(
            correlate(x, kernel, mode), convolve(x, kernel[::-1, ::-1, ::-1], mode), atol=1e-12
        )


# --- kinds, dtypes, layouts ----------------------------------------------------------------


def test_return_kind_follows_the_inputs():
    x, kernel = np.arange(6.0), np.array([1.0, -1.0])
    assert isinstance(convolve(x, kernel), np.ndarray)
    assert isinstance(convolve(torch.from_numpy(x), kernel), torch.Tensor)
    assert isinstance(convolve(x, torch.from_numpy(kernel)), torch.Tensor)
    assert isinstance(convolve([0.0, 1.0, 2.0], [1.0]), np.ndarray)


@pytest.mark.parametrize(
    ("x_dtype", "kernel_dtype", "expected"),
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.float32, torch.float64, torch.float64),
        (torch.uint8, torch.float32, torch.float32),
        (torch.int64, torch.int32, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_promotion_tensors(x_dtype, kernel_dtype, expected):
    x = torch.arange(12).reshape(3, 4).to(x_dtype)
    kernel = torch.tensor([[1, 2], [3, 4]]).to(kernel_dtype)
    out = correlate(x, kernel)
    assert out.dtype == expected
    exact = scipy.signal.correlate(x.double().numpy(), kernel.double().numpy(), mode="valid")
    np.testing.assert_allclose(out.double().numpy(), exact, rtol=1e-2)


@pytest.mark.parametrize(
    ("x_dtype", "kernel_dtype", "expected"),
    [
        (np.float32, np.float32, np.float32),
        (np.float32, np.float64, np.float64),
        (np.uint8, np.float32, np.float32),
        (np.int64, np.int16, np.float64),
        (np.float16, np.float16, np.float16),
    ],
)
def test_dtype_promotion_numpy(x_dtype, kernel_dtype, expected):
    x = np.arange(10).astype(x_dtype)
    kernel = np.array([1, 2, 3]).astype(kernel_dtype)
    out = convolve(x, kernel)
    assert out.dtype == expected
    np.testing.assert_allclose(out, np.convolve(np.arange(10), [1, 2, 3], mode="valid"))


def test_non_contiguous_and_byte_swapped_inputs():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 8))
    kernel = rng.standard_normal((3, 2))
    expected = scipy.signal.convolve(x.T[::-1], kernel, mode="full")
    np.testing.assert_allclose(convolve(x.T[::-1], kernel, "full"), expected, atol=1e-12)
    t = torch.from_numpy(x).t()  # non-contiguous tensor
    np.testing.assert_allclose(
        convolve(t, kernel, "full").numpy(), scipy.signal.convolve(x.T, kernel), atol=1e-12
    )
    swapped = x.astype(x.dtype.newbyteorder(">"))
    np.testing.assert_allclose(
        convolve(swapped, kernel), scipy.signal.convolve(x, kernel, "valid"), atol=1e-12
    )


def test_batch_axes_are_filtered_independently():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 10))
    kernel = rng.standard_normal(4)
    out = correlate(x, kernel, "same")
    assert out.shape == (2, 3, 10)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(out[i, j], np.correlate(x[i, j], kernel, "same"), atol=1e-12)


# --- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [convolve, correlate])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("x_shape", "kernel_shape"),
    [((2, 7), (3,)), ((5, 4), (2, 3)), ((4, 3, 4), (2, 2, 3)), ((3, 3, 2, 3), (2, 2, 1, 2))],
)
def test_gradcheck(fn, mode, x_shape, kernel_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    kernel = torch.randn(kernel_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mode), (x, kernel))


def test_gradcheck_grouped_float64_path():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 20, 21, dtype=torch.float64, generator=gen, requires_grad=True)
    kernel = torch.randn(9, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: convolve(a, b, "same"), (x, kernel), fast_mode=True
    )


@pytest.mark.parametrize(
    ("x_shape", "kernel_shape"), [((1, 500), (7,)), ((2, 90, 12), (4, 3)), ((64, 12, 12), (5, 5))]
)
def test_float32_gradients_match_float64(x_shape, kernel_shape):
    # The strip and grouped paths run only for float32/bfloat16; compare with float64.
    gen = torch.Generator().manual_seed(2)
    x64 = torch.randn(x_shape, dtype=torch.float64, generator=gen)
    k64 = torch.randn(kernel_shape, dtype=torch.float64, generator=gen)
    weights = torch.randn(correlate(x64, k64, "full").shape, dtype=torch.float64, generator=gen)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype).requires_grad_()
        k = k64.to(dtype).requires_grad_()
        (correlate(x, k, "full") * weights.to(dtype)).sum().backward()
        grads[dtype] = (x.grad.double(), k.grad.double())
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64], strict=True):
        torch.testing.assert_close(g32, g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())


# --- errors ----------------------------------------------------------------------------------


def test_unknown_mode():
    with pytest.raises(
        ValueError, match=r"mode must be one of 'valid', 'same', 'full', got 'wrap'"
    ):
        convolve(np.ones(5), np.ones(2), mode="wrap")


def test_kernel_longer_than_signal_in_valid_mode():
    with pytest.raises(
        ValueError,
        match=r"kernel of shape \(3, 6\) is longer than the signal axes \(5, 5\) of x in "
        r"mode 'valid'",
    ):
        correlate(np.ones((2, 5, 5)), np.ones((3, 6)))
    assert correlate(np.ones((5, 5)), np.ones((3, 6)), "same").shape == (5, 5)
    assert correlate(np.ones((5, 5)), np.ones((3, 6)), "full").shape == (7, 10)


def test_kernel_of_higher_rank_than_signal():
    with pytest.raises(
        ValueError,
        match=r"kernel has 3 dimensions but x has 2.*x shape \(4, 4\), kernel shape \(2, 2, 2\)",
    ):
        convolve(np.ones((4, 4)), np.ones((2, 2, 2)))


def test_scalar_kernel():
    with pytest.raises(ValueError, match=r"kernel must have at least one dimension.*got a scalar"):
        convolve(np.ones(4), 2.0)


@pytest.mark.parametrize(
    ("x", "kernel", "name", "shape"),
    [
        (np.ones((3, 0)), np.ones(1), "x", r"\(3, 0\)"),
        (np.ones(4), np.ones(0), "kernel", r"\(0,\)"),
        (torch.ones(0, 4), torch.ones(2), "x", r"\(0, 4\)"),
    ],
)
def test_empty(x, kernel, name, shape):
    with pytest.raises(ValueError, match=rf"{name} must not be empty, got shape {shape}"):
        correlate(x, kernel, "full")


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (np.array([True, False, True]), "bool"),
        (np.array(["a", "b", "c"]), "<U1"),
        (np.array([1.0, None, 2.0], dtype=object), "object"),
        (torch.tensor([True, False, True]), "torch.bool"),
    ],
)
@pytest.mark.parametrize("name", ["x", "kernel"])
def test_non_numeric_dtypes(value, dtype, name):
    args = {"x": np.ones(3), "kernel": np.ones(2)}
    args[name] = value
    with pytest.raises(
        TypeError,
        match=rf"{name} must have a real numeric dtype \(integer or floating point\), got {dtype}",
    ):
        convolve(args["x"], args["kernel"])


@pytest.mark.parametrize(
    "value", [np.ones(3, dtype=np.complex128), torch.ones(3, dtype=torch.complex64)]
)
@pytest.mark.parametrize("name", ["x", "kernel"])
def test_complex_is_refused(value, name):
    args = {"x": np.ones(4), "kernel": np.ones(3)}
    args[name] = value
    with pytest.raises(TypeError, match=rf"{name} must have a real dtype, got complex"):
        correlate(args["x"], args["kernel"])


def test_devices_must_match():
    with pytest.raises(
        ValueError,
        match=r"x and kernel must be on the same device, got x on meta and kernel on cpu",
    ):
        convolve(torch.ones(5, device="meta"), torch.ones(2))
