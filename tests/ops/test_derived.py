"""Values kept per source tensor: reused while it is unchanged, rebuilt after any change."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from cnnkit import tables
from cnnkit.ops import _derived
from cnnkit.ops._derived import derivative_recorded, derived, kept
from cnnkit.ops.table_conv import plan_table, table_conv2d


def _counting(source: torch.Tensor, params=()):
    """derived(source) of 2 * source, and how many times it was built so far."""
    builds = []

    def value() -> torch.Tensor:
        def build() -> torch.Tensor:
            builds.append(1)
            assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            return source.detach() * 2

        return derived(source, "test double", params, build)

    return value, builds


def test_reused_until_an_in_place_edit_or_new_params():
    source = torch.arange(4.0)
    value, builds = _counting(source)
    first = value()
    assert value() is first and len(builds) == 1 and kept(source, "test double")
    source.add_(1.0)
    assert torch.equal(value(), 2 * source) and len(builds) == 2
    assert derived(source, "test double", ("other",), lambda: source * 0).sum() == 0


def test_a_parameter_converted_or_swapped_is_seen():
    layer = torch.nn.Linear(3, 2)
    weight = layer.weight
    value, builds = _counting(weight)
    value()
    layer.double()  # the same Parameter object, new memory, same version counter
    assert weight.dtype == torch.float64 and value().dtype == torch.float64
    before = weight.detach().clone()
    weight.data = weight.data.half().float()  # may reuse the old address (ABA)
    assert torch.equal(value(), 2 * weight.detach()) and not torch.equal(before, weight)
    other = torch.nn.Parameter(torch.zeros(2, 3))
    torch.utils.swap_tensors(weight, other)  # no Python weak reference stops it
    assert torch.equal(value(), torch.zeros(2, 3)) and len(builds) == 4


def test_swap_on_conversion_after_a_kept_value():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer = torch.nn.Linear(3, 2)
        value, _ = _counting(layer.weight)
        value()
        layer.double()
        layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
        assert torch.equal(value(), 2 * layer.weight.detach())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_a_kept_value_does_not_keep_its_source_alive():
    source = torch.randn(5)
    value, _ = _counting(source)
    value()
    alive = torch.utils.weak.WeakIdRef(source)
    entries = len(_derived._ENTRIES)
    del source, value
    assert alive() is None  # freed although its value is kept...
    _derived._drop_expired()  # ...until the next insertion drops it
    assert len(_derived._ENTRIES) == entries - 1


def test_an_inference_tensor_is_built_every_time():
    with torch.inference_mode():
        source = torch.ones(3)
    value, builds = _counting(source)
    value()
    value()
    assert len(builds) == 2 and not kept(source, "test double")
    assert not value().is_inference()


# make_dual goes through torch.jit, which warns that it is deprecated
FORWARD_AD_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(FORWARD_AD_WARNING)
def test_derivative_recorded_in_reverse_and_forward_mode():
    leaf = torch.ones(2, requires_grad=True)
    assert derivative_recorded(leaf) and not derivative_recorded(torch.ones(2))
    with torch.no_grad():
        assert not derivative_recorded(leaf)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(torch.ones(2), torch.ones(2))
        assert derivative_recorded(dual)


@pytest.mark.filterwarnings(FORWARD_AD_WARNING)
def test_forward_mode_derivative_of_a_table_conv_reaches_the_weight():
    table = tables.random(4, 6, 2, seed=0)
    plan = plan_table(table)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=gen)
    weight = torch.randn(len(table), 3, 3, dtype=torch.float64, generator=gen)
    tangent = torch.randn_like(weight)
    for method in ("dense", "unfold", "fourier"):
        with torch.no_grad():
            table_conv2d(x, plan, weight, method=method)  # keeps the transformed weight
            with forward_ad.dual_level():
                dual = forward_ad.make_dual(weight, tangent)
                out = forward_ad.unpack_dual(table_conv2d(x, plan, dual, method=method))
        # linear in the weight: the derivative along the tangent is the output for it
        expected = table_conv2d(x, plan, tangent, method="dense")
        torch.testing.assert_close(out.tangent, expected, rtol=1e-10, atol=1e-12)
