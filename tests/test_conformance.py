"""Every cnnkit.nn module and every preset under PyTorch's transforms, like torch.nn's own.

Each transform's result must equal the eager module's within
``max|a - b| <= 1e-4 (1 + max|b|)`` (autocast: finite, and within ``5e-2 (1 + max|b|)`` of
float32). Shapes are small so that the matrix stays fast.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from cnnkit import tables
from cnnkit.models import build, from_name
from cnnkit.nn import (
    Classifier,
    ContrastNorm,
    DivisiveNorm,
    FilterBank,
    LocallyConnected2d,
    Pool,
    PoolSubsample,
    Rectify,
    ReLU,
    Subsample,
    SubtractiveNorm,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _modules():
    yield "FilterBank-full", lambda: FilterBank(tables.full(3, 4), 3), (2, 3, 9, 9)
    yield "FilterBank-random", lambda: FilterBank(tables.random(4, 6, 2, seed=1), 3), (2, 4, 9, 9)
    yield "FilterBank-one_to_one", lambda: FilterBank(tables.one_to_one(4), 3), (2, 4, 9, 9)
    yield "FilterBank-lenet5_c3", lambda: FilterBank(tables.lenet5_c3(), 5), (2, 6, 10, 10)
    yield "Rectify", Rectify, (2, 3, 5, 5)
    yield "ReLU", ReLU, (2, 3, 5, 5)
    for border in ("renormalize", "zero", "reflect"):
        yield f"SubtractiveNorm-{border}", lambda b=border: SubtractiveNorm(4, 5, border=b), (
            2, 4, 9, 9,
        )  # fmt: skip
        for threshold in ("mean", 0.2):
            yield (
                f"DivisiveNorm-{border}-{threshold}",
                lambda b=border, t=threshold: DivisiveNorm(4, 5, border=b, threshold=t),
                (2, 4, 9, 9),
            )
            yield (
                f"ContrastNorm-{border}-{threshold}",
                lambda b=border, t=threshold: ContrastNorm(4, 5, border=b, threshold=t),
                (2, 4, 9, 9),
            )
    for kind in ("max", "avg", "lp"):
        yield f"Pool-{kind}", lambda k=kind: Pool(k, 3, p=3.0), (2, 4, 9, 9)
        yield f"PoolSubsample-{kind}", lambda k=kind: PoolSubsample(k, 4, 2, p=3.0), (2, 4, 9, 9)
    yield "Pool-max-large", lambda: Pool("max", 3), (2, 4, 40, 40)  # the channels-last path
    yield "PoolSubsample-max-blocks", lambda: PoolSubsample("max", 10, 5), (2, 4, 75, 75)
    yield "PoolSubsample-trainable", lambda: PoolSubsample("avg", 2, 2, maps=4, trainable=True), (
        2, 4, 8, 8,
    )  # fmt: skip
    yield "Subsample", lambda: Subsample(2), (2, 3, 7, 7)
    yield (
        "LocallyConnected2d",
        lambda: LocallyConnected2d(4, 6, 3, (7, 7), table=tables.random(4, 6, 2, seed=2)),
        (2, 4, 7, 7),
    )
    yield "Classifier", lambda: Classifier(12, 5, hidden=7), (2, 3, 2, 2)


def _presets():
    yield "lecun83", lambda: build(from_name("lecun83", classes=5)), (2, 1, 83, 83)
    yield "lecun83-lp", lambda: build(from_name("lecun83", classes=5, pooling="lp", p=3.0)), (
        2, 1, 83, 83,
    )  # fmt: skip
    yield "lenet5", lambda: build(from_name("lenet5")), (2, 1, 32, 32)
    yield "digits28", lambda: build(from_name("digits28")), (2, 1, 28, 28)


CASES = list(_modules()) + list(_presets())
IDS = [name for name, _, _ in CASES]


def _case(make, shape, seed=0):
    torch.manual_seed(seed)
    module = make().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    if isinstance(module, (Pool, PoolSubsample)) and module.kind == "lp":
        x = x.abs()  # keep the Lp comparison about the transform, not about cancellation
    return module, x


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> None:
    difference = (actual.detach().float() - expected.detach().float()).abs().max().item()
    bound = tolerance * (1 + expected.detach().abs().max().item())
    assert difference <= bound, f"max difference {difference:.3g} > {bound:.3g}"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' and tracer's advice
        yield


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_torch_export(name, make, shape):
    module, x = _case(make, shape)
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    _close(program.module()(x), module(x))
    wider = torch.cat([x, x.flip(0), x])
    _close(program.module()(wider), module(wider))


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_onnx_in_onnxruntime(name, make, shape, tmp_path):
    module, x = _case(make, shape)
    path = tmp_path / "model.onnx"
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.onnx.export(
        module, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
    )
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name_in = session.get_inputs()[0].name
    for batch_of in (x, torch.cat([x, x.flip(0), x])):
        (out,) = session.run(None, {name_in: batch_of.numpy()})
        _close(torch.from_numpy(out), module(batch_of))


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_compile_fullgraph_forward_and_training_step(name, make, shape):
    module, x = _case(make, shape)
    module.train()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = module(x_eager)
    out = compiled(x_compiled)
    _close(out, eager)
    params = [p for p in module.parameters() if p.requires_grad]
    probe = torch.randn(eager.shape, generator=torch.Generator().manual_seed(9))
    grads_eager = torch.autograd.grad((eager * probe).sum(), [x_eager, *params])
    grads_compiled = torch.autograd.grad((out * probe).sum(), [x_compiled, *params])
    for a, b in zip(grads_compiled, grads_eager, strict=True):
        _close(a, b)


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_func_grad_and_vmap(name, make, shape):
    module, x = _case(make, shape)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(module(leaf).square().sum(), leaf)
    _close(torch.func.grad(lambda t: module(t).square().sum())(x), expected)
    per_image = torch.func.vmap(lambda t: module(t.unsqueeze(0)).squeeze(0))(x)
    _close(per_image, module(x))


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_fake_and_meta_shapes(name, make, shape):
    from torch._subclasses.fake_tensor import FakeTensorMode

    module, x = _case(make, shape)
    expected = module(x).shape
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert module(mode.from_tensor(x)).shape == expected
    assert copy.deepcopy(module).to("meta")(x.to("meta")).shape == expected


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_autocast_bfloat16(name, make, shape):
    module, x = _case(make, shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(x)
    assert torch.isfinite(low).all()
    _close(low, module(x), 5e-2)


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=IDS)
def test_deepcopy_and_jit_trace(name, make, shape):
    module, x = _case(make, shape)
    expected = module(x)
    assert torch.equal(copy.deepcopy(module)(x), expected)
    traced = torch.jit.trace(module, (x,), check_trace=False)
    _close(traced(x), expected)


@pytest.mark.usefixtures("fast_paths")  # the operators are the fast paths' nodes
def test_a_compiled_lecun83_shows_cnnkit_operators_as_nodes():
    torch.manual_seed(0)
    model = build(from_name("lecun83", classes=5))
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=capture)(torch.randn(2, 1, 83, 83))
    (graph,) = graphs
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert targets.count("cnnkit.contrast_norm") == 2  # one node per stage


def test_the_operators_check_under_opcheck():
    from cnnkit.ops import gaussian_window

    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    window = gaussian_window(3, 1.0, 3, dtype=torch.float64)
    for options in (("renormalize", True, True, 0.0, 1e-4), ("zero", False, False, 0.3, 1e-4)):
        torch.library.opcheck(
            torch.ops.cnnkit.contrast_norm.default,
            (x, window, *options),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )
