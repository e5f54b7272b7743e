import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnkit import reference, tables
from cnnkit.kernels.table_conv import _choose
from cnnkit.ops.table_conv import plan_table, table_conv2d

METHODS = ["auto", "dense", "fourier", "unfold"]
F64 = torch.float64


def reference_batch(x, table, weight, bias=None, stride=(1, 1)):
    """The float64 one-kernel-at-a-time referee, applied sample by sample, then strided."""
    out = np.stack(
        [
            reference.table_correlate_2d(
                sample.numpy(),
                table.numpy(),
                weight.detach().numpy(),
                None if bias is None else bias.detach().numpy(),
            )
            for sample in x.detach().to(F64)
        ]
    )
    return torch.from_numpy(out[:, :, :: stride[0], :: stride[1]].copy())


def make(table, size=(7, 8), kernel=(3, 2), batch=2, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = tables.n_inputs(table), tables.n_outputs(table)
    x = torch.randn(batch, c_in, *size, generator=gen, dtype=dtype)
    weight = torch.randn(len(table), *kernel, generator=gen, dtype=dtype)
    bias = torch.randn(c_out, generator=gen, dtype=dtype)
    return x, weight, bias


# ---------------------------------------------------------------------------------------
# identities and the referee
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_full_table_equals_conv2d(method):
    table = tables.full(3, 4)
    x, weight, bias = make(table, size=(9, 7), kernel=(3, 4))
    dense = weight.view(4, 3, 3, 4)  # full() rows run over inputs within each output
    expected = F.conv2d(x, dense, bias)
    torch.testing.assert_close(
        table_conv2d(x, table, weight, bias, method=method), expected, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("method", METHODS + ["depthwise"])
def test_one_to_one_equals_grouped_conv(method):
    table = tables.one_to_one(5)
    x, weight, bias = make(table, kernel=(3, 3))
    expected = F.conv2d(x, weight.unsqueeze(1), bias, groups=5)
    torch.testing.assert_close(
        table_conv2d(x, table, weight, bias, method=method), expected, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "table",
    [tables.random(6, 5, 3, seed=2), tables.lenet5_c3(), torch.tensor([[2, 1], [0, 0], [1, 1]])],
    ids=["random", "lenet5_c3", "unsorted"],
)
def test_random_tables_equal_the_per_kernel_sum(method, table):
    x, weight, bias = make(table, size=(10, 9), kernel=(5, 4))
    expected = reference_batch(x, table, weight, bias)
    got = table_conv2d(x, table, weight, bias, method=method)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stride", [2, (3, 1), (1, 2)])
def test_stride_keeps_every_stride_th_position(method, stride):
    table = tables.random(4, 3, 2, seed=5)
    x, weight, bias = make(table, size=(11, 10), kernel=(3, 4))
    pair = (stride, stride) if isinstance(stride, int) else stride
    expected = reference_batch(x, table, weight, bias, pair)
    got = table_conv2d(x, table, weight, bias, stride, method=method)
    assert got.shape[-2:] == ((11 - 3) // pair[0] + 1, (10 - 4) // pair[1] + 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    n_in=st.integers(1, 4),
    n_out=st.integers(1, 4),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    data=st.data(),
)
def test_every_method_matches_the_referee(n_in, n_out, height, width, data):
    fan = data.draw(st.integers(1, n_in))
    kh, kw = data.draw(st.integers(1, height)), data.draw(st.integers(1, width))
    stride = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    table = tables.random(n_in, n_out, fan, seed=data.draw(st.integers(0, 99)))
    x, weight, bias = make(table, size=(height, width), kernel=(kh, kw), batch=1)
    expected = reference_batch(x, table, weight, bias, stride)
    for method in METHODS + (["depthwise"] if fan == 1 else []):
        got = table_conv2d(x, table, weight, bias, stride, method=method)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)


def test_no_bias_means_zero_bias():
    table = tables.random(3, 2, 2)
    x, weight, bias = make(table)
    for method in METHODS:
        torch.testing.assert_close(
            table_conv2d(x, table, weight, None, method=method),
            table_conv2d(x, table, weight, torch.zeros_like(bias), method=method),
        )


# ---------------------------------------------------------------------------------------
# the lecture's shapes, layouts and dtypes
# ---------------------------------------------------------------------------------------


def test_lecture_layer3_shapes():
    table = tables.random(64, 256, 16)
    x, weight, bias = make(table, size=(14, 14), kernel=(9, 9), batch=2, dtype=torch.float32)
    weight = weight / 36  # outputs of unit scale: 16 * 81 = 36**2 terms each
    y = table_conv2d(x, table, weight, bias)
    assert y.shape == (2, 256, 6, 6)
    assert weight.numel() == 4096 * 81
    # The float64 dense method stands in for the (slow) referee, checked against it above.
    # float32 rounding: both methods stay within a few 1e-6 of it (about 1e-6 per unit).
    expected = table_conv2d(x.to(F64), table, weight.to(F64), bias.to(F64), method="dense")
    for method in METHODS:
        got = table_conv2d(x, table, weight, bias, method=method).to(F64)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_auto_choices_at_the_lecture_shapes():
    # pinned to the measurements in docs/performance.md (connection-table filter bank)
    f32, one = torch.float32, (1, 1)
    assert _choose((64, 64, 14, 14), (4096, 9, 9), 256, one, f32) == "fourier"  # layer 3
    assert _choose((1, 64, 14, 14), (4096, 9, 9), 256, one, f32) == "unfold"  # one image
    assert _choose((8, 64, 14, 14), (4096, 9, 9), 256, one, f32) == "unfold"  # 8 images
    assert _choose((16, 64, 14, 14), (4096, 9, 9), 256, one, f32) == "dense"
    assert _choose((64, 1, 83, 83), (64, 9, 9), 64, one, f32) == "dense"  # layer 1, full
    assert _choose((64, 64, 14, 14), (64, 9, 9), 64, one, f32) == "depthwise"  # one-to-one
    assert _choose((64, 64, 14, 14), (4096, 9, 9), 256, one, torch.bfloat16) == "dense"


@pytest.mark.parametrize("method", METHODS)
def test_unbatched_input(method):
    table = tables.lenet5_c3()
    x, weight, bias = make(table, batch=1)
    y = table_conv2d(x[0], table, weight, bias, method=method)
    assert y.shape == (16, 7 - 3 + 1, 8 - 2 + 1)
    torch.testing.assert_close(y, table_conv2d(x, table, weight, bias, method=method)[0])


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_input(method):
    table = tables.random(4, 6, 2, seed=1)
    x, weight, bias = make(table, size=(8, 9))
    strided = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    sliced = torch.cat([x, x], dim=3)[..., ::2]  # every other column of a wider map
    expected = reference_batch(x, table, weight, bias)
    for view in (strided, torch.cat([x, x], dim=3)[..., :9]):
        assert not view.is_contiguous()
        got = table_conv2d(view, table, weight, bias, method=method)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert not sliced.is_contiguous()
    expected = reference_batch(sliced, table, weight, bias)
    torch.testing.assert_close(
        table_conv2d(sliced, table, weight, bias, method=method), expected, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(method, dtype):
    table = tables.random(5, 4, 3, seed=3)
    x, weight, bias = make(table, size=(9, 9), kernel=(4, 4), dtype=dtype)
    y = table_conv2d(x, table, weight, bias, method=method)
    assert y.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        y.to(F64), reference_batch(x, table, weight, bias), rtol=tolerance, atol=tolerance
    )


def test_table_of_another_integer_dtype():
    table = tables.random(3, 3, 2)
    x, weight, bias = make(table)
    torch.testing.assert_close(
        table_conv2d(x, table.to(torch.int32), weight, bias), table_conv2d(x, table, weight, bias)
    )


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, table, stride",
    [
        ("dense", tables.random(3, 4, 2, seed=1), 1),
        ("dense", tables.random(3, 4, 2, seed=1), (2, 1)),
        ("fourier", tables.random(3, 4, 2, seed=1), 1),
        ("fourier", tables.random(3, 4, 2, seed=1), (2, 1)),
        ("fourier", tables.lenet5_c3(), 1),
        ("depthwise", tables.one_to_one(3), (1, 2)),
        ("unfold", tables.random(3, 4, 2, seed=1), 1),
        ("unfold", tables.lenet5_c3(), (2, 1)),
    ],
)
def test_gradcheck(method, table, stride, one_thread):
    x, weight, bias = make(table, size=(5, 6), kernel=(2, 3), batch=1 + (len(table) < 10))
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, w, b: table_conv2d(x, table, w, b, stride, method=method), inputs
    )


def test_fourier_and_dense_gradients_agree():
    table = tables.random(6, 8, 3, seed=4)
    grads = []
    for method in ("dense", "fourier"):
        x, weight, bias = (t.requires_grad_() for t in make(table, size=(9, 9), kernel=(5, 5)))
        table_conv2d(x, table, weight, bias, method=method).square().sum().backward()
        grads.append((x.grad, weight.grad, bias.grad))
    for dense, fourier in zip(*grads, strict=True):
        torch.testing.assert_close(fourier, dense, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def call_with(**changes):
    table = tables.random(4, 3, 2)
    x, weight, bias = make(table, size=(6, 6), kernel=(3, 3))
    args = {"x": x, "table": table, "weight": weight, "bias": bias, "stride": 1} | changes
    return table_conv2d(**args)


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"x": torch.zeros(6, 6, dtype=F64)}, ValueError, r"x must have shape \(C, H, W\)"),
        ({"x": torch.zeros(1, 4, 6, 6, dtype=torch.int64)}, TypeError, "x must have a real"),
        (
            {"x": torch.zeros(1, 3, 6, 6, dtype=F64)},
            ValueError,
            r"table row \d+ names input map 3, but only 3 input maps exist \(0..2\)",
        ),
        ({"table": torch.zeros(4, 2)}, TypeError, "table must have an integer dtype"),
        (
            {"table": torch.tensor([[0, 0], [0, 0]])},
            ValueError,
            "table rows 0 and 1 both connect input map 0 to output map 0",
        ),
        (
            {"weight": torch.zeros(5, 3, 3, dtype=F64)},
            ValueError,
            r"weight must have shape \(K, kh, kw\) with K = 6 \(one kernel per table row\), "
            r"got shape \(5, 3, 3\)",
        ),
        ({"weight": torch.zeros(6, 9, dtype=F64)}, ValueError, "weight must have shape"),
        ({"weight": torch.zeros(6, 3, 3)}, TypeError, r"weight must have the dtype of x"),
        (
            {"weight": torch.zeros(6, 7, 3, dtype=F64)},
            ValueError,
            "weight kernels of 7x3 do not fit in x maps of 6x6",
        ),
        (
            {"bias": torch.zeros(4, dtype=F64)},
            ValueError,
            r"bias must have shape \(3,\), one value per output map of the table, got shape \(4,\)",
        ),
        ({"bias": torch.zeros(3)}, TypeError, "bias must have the dtype of x"),
        ({"stride": 0}, ValueError, "stride must be a positive integer, got 0"),
        ({"stride": (1, 2, 3)}, TypeError, "stride must be a positive integer or a pair"),
        ({"method": "fft"}, ValueError, "method must be one of 'auto', 'dense', 'depthwise', "),
        (
            {"method": "depthwise"},
            ValueError,
            'method="depthwise" needs exactly one input map per output map, but the table has 6 '
            "rows for 3 output maps",
        ),
    ],
)
def test_errors(changes, error, message):
    with pytest.raises(error, match=message):
        call_with(**changes)


def test_error_names_input_map_70_of_64():
    table = torch.tensor([[70, 0]])
    x = torch.zeros(1, 64, 5, 5)
    with pytest.raises(ValueError, match="table row 0 names input map 70, but only 64 input maps"):
        table_conv2d(x, table, torch.zeros(1, 3, 3))


def test_cached_fourier_basis_survives_inference_mode():
    from cnnkit.kernels.table_conv import _inverse_basis

    _inverse_basis.cache_clear()
    table = tables.random(8, 16, 4, seed=0)
    weight = torch.randn(len(table), 9, 9, requires_grad=True)
    x = torch.randn(2, 8, 14, 14)
    with torch.inference_mode():
        table_conv2d(x, table, weight.detach(), method="fourier")
    table_conv2d(x, table, weight, method="fourier").sum().backward()
    assert weight.grad is not None


def test_a_plan_stands_for_its_table_and_pads_uneven_inputs():
    # random(5, 4, 3): 12 rows over 5 input maps, so some maps feed more outputs than others
    table = tables.random(5, 4, 3, seed=3)
    plan = plan_table(table)
    counts = torch.bincount(table[:, 0], minlength=5)
    assert plan.slot_rows.shape == (5, int(counts.max()))
    for i in range(5):  # each input map lists its rows, then padding
        listed = plan.slot_rows[i][plan.slot_rows[i] < len(table)]
        assert sorted(listed.tolist()) == torch.nonzero(table[:, 0] == i).flatten().tolist()
        assert plan.slot_outputs[i][: len(listed)].tolist() == table[listed, 1].tolist()
        assert (plan.slot_outputs[i][len(listed) :] == plan.out_maps).all()
    x, weight, bias = make(table, size=(9, 9), kernel=(4, 4))
    for method in METHODS:
        torch.testing.assert_close(
            table_conv2d(x, plan, weight, bias, method=method),
            table_conv2d(x, table, weight, bias, method=method),
            rtol=0,
            atol=1e-12,
        )
    with pytest.raises(ValueError, match="at least the 5 input maps the table was planned"):
        table_conv2d(x[:, :4], plan, weight, bias)
    with pytest.raises(ValueError, match="row 2 names input map 4, but only 4 input maps exist"):
        plan_table(table, in_maps=4)


@pytest.mark.parametrize("method", ["dense", "fourier", "unfold"])
def test_an_edited_weight_is_always_seen(method):
    table = tables.random(6, 8, 3, seed=2)
    plan = plan_table(table)
    x, weight, bias = make(table, size=(10, 10), kernel=(5, 5))
    with torch.no_grad():
        first = table_conv2d(x, plan, weight, bias, method=method)
        torch.testing.assert_close(table_conv2d(x, plan, weight, bias, method=method), first)
        weight[0].mul_(-3.0)  # an in-place edit
        edited = table_conv2d(x, plan, weight, bias, method=method)
    reference = table_conv2d(x, plan, weight.clone(), bias, method="dense")
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-12)
    assert not torch.allclose(edited, first)
    weight.data[1].mul_(2.0)  # an edit behind autograd's back
    torch.testing.assert_close(
        table_conv2d(x, plan, weight, bias, method=method),
        table_conv2d(x, plan, weight.clone(), bias, method="dense"),
        rtol=0,
        atol=1e-12,
    )
    leaf = weight.clone().requires_grad_()
    out = table_conv2d(x, plan, leaf, bias, method=method)
    assert out.is_contiguous()
    out.square().sum().backward()
    expected = torch.autograd.grad(
        table_conv2d(x, plan, leaf, bias, method="dense").square().sum(), leaf
    )[0]
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-12)


def test_dense_output_is_channels_last_without_a_gradient_for_one_float32_map():
    torch.manual_seed(0)
    table = tables.full(1, 8)
    x32, w32, b32 = (t.float() for t in make(table, size=(20, 20), kernel=(5, 5), batch=3))
    reference = table_conv2d(x32.double(), table, w32.double(), b32.double(), method="dense")
    with torch.no_grad():
        fast = table_conv2d(x32, table, w32, b32, method="dense")
        unbatched = table_conv2d(x32[0], table, w32, b32, method="dense")
    assert fast.is_contiguous(memory_format=torch.channels_last) and not fast.is_contiguous()
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unbatched, fast[0], rtol=1e-6, atol=1e-6)
    recorded = table_conv2d(x32, table, w32.clone().requires_grad_(), b32, method="dense")
    assert recorded.is_contiguous()  # a backward to run: the contiguous kernel
    assert table_conv2d(x32.double(), table, w32.double(), method="dense").is_contiguous()
    several = tables.full(3, 4)  # channels-last input keeps its layout, else contiguous
    x, weight, bias = (t.float() for t in make(several, size=(9, 9), kernel=(3, 3)))
    with torch.no_grad():
        assert table_conv2d(x, several, weight, bias, method="dense").is_contiguous()
        last = x.contiguous(memory_format=torch.channels_last)
        out = table_conv2d(last, several, weight, bias, method="dense")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, table_conv2d(x, several, weight, bias, method="dense"))


def test_one_map_input_with_channels_last_strides_trains_in_the_standard_layout():
    # One map: contiguous whatever the map's stride, so a (N, H, W, 1) tensor permuted to
    # (N, 1, H, W) is contiguous with channels-last strides (as shifted images are).
    x = torch.randn(3, 12, 12, 1).permute(0, 3, 1, 2)
    assert x.is_contiguous() and x.stride()[1] == 1
    standard = x.clone(memory_format=torch.contiguous_format)
    table = tables.full(1, 8)
    weight = torch.randn(8, 3, 3, requires_grad=True)
    y = table_conv2d(x, table, weight, method="dense")
    assert y.is_contiguous()  # the contiguous kernel, as for standard strides
    assert torch.equal(y, table_conv2d(standard, table, weight, method="dense"))
