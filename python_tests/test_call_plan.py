"""The layer's call plan (ops.call_plan): rebuilt exactly when something it was built from changes,
each next call right against float64 (outputs and every gradient); and a steady-state call lean."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import sharelora_kernels as sk
from sharelora_kernels import ops, reference
from sharelora_kernels.layer import AdapterStore, LoRAPathModule, SharedLoRALinear
from sharelora_kernels.ops import call_plan
from sharelora_kernels.plan import PathSpec, TensorSpec

K, N = 24, 20


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def bishare_layer(dtype=torch.float32, kinds=("plain", "slice", "slice"), dropout=0.0, bias=True) -> SharedLoRALinear:
    """A layer with a plain path and slice paths of wider shared tensors (a 3-path Bi-Share module),
    or gate / Kronecker paths, every tensor random."""
    torch.manual_seed(0)
    specs, params, paths = {}, {}, []
    for i, kind in enumerate(kinds):
        r = 2 + i
        if kind == "plain":
            shapes = {"A": (r, K), "B": (N, r)}
        elif kind == "slice":
            shapes = {"A": (r, K + 6), "B": (N + 4, r)}
        elif kind == "gate":
            shapes = {"A": (r, 8), "B": (6, r), "G_id": (2, K), "G_iu": (8, 2), "G_od": (2, 6), "G_ou": (N, 2)}
        else:  # kron, d = 4
            shapes = {"A": (r, 4), "B": (4, r), "K_A": (1, K // 4), "K_B": (N // 4, 1)}
        names = {}
        for role, shape in shapes.items():
            name = f"p{i}.{role}"
            specs[name] = TensorSpec(name, shape, "gaussian", "lora", init_std=0.3)
            params[name] = nn.Parameter(torch.randn(shape, dtype=dtype) * 0.3)
            names[role] = name
        rank = 2 if kind == "gate" else r
        paths.append((PathSpec(kind, "lora", names, 0.5 + i, rank, 3 if kind == "slice" else 0,
                               2 if kind == "slice" else 0)))
    store = AdapterStore(params, specs)
    layer = SharedLoRALinear(nn.Linear(K, N, bias=bias).to(dtype), [LoRAPathModule(s, store) for s in paths],
                             dropout=dropout)
    layer.store = store
    return layer


def float64_call(layer, x, dy):
    """(y, the gradients of x and every adapter tensor) of the layer's math in float64, for dy."""
    x64 = x.detach().double().requires_grad_()
    p64 = [t.detach().double().requires_grad_() for p in layer.paths() for t in p.tensors]
    paths64, i = [], 0
    for p in layer.paths():
        paths64.append(p._replace(tensors=tuple(p64[i:i + len(p.tensors)])))
        i += len(p.tensors)
    weight = layer.base_weight().detach().double()
    bias = None if layer.bias is None else layer.bias.detach().double()
    y64 = reference.lora_linear(x64, weight, bias, paths64)
    return y64, torch.autograd.grad(y64, [x64, *p64], dy.double())


def check_against_float64(layer, x, tol=1e-5):
    """The layer's output and the gradients of x and every adapter tensor vs float64 math."""
    x = x.detach().requires_grad_()
    params = [t for p in layer.paths() for t in p.tensors]
    y = layer(x)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(y, [x, *params], dy.to(y.dtype))
    y64, grads64 = float64_call(layer, x, dy)
    assert rel_err(y, y64) < tol
    for g, g64 in zip(grads, grads64):
        assert rel_err(g, g64) < tol * 10


@pytest.mark.parametrize("kinds", [("plain",), ("plain", "slice", "slice"), ("gate", "kron")])
def test_plan_is_rebuilt_exactly_when_it_must_be(kinds):
    layer = bishare_layer(kinds=kinds)
    x = torch.randn(3, 5, K, requires_grad=True)  # as check_against_float64's (x.requires_grad is part of a plan)
    check_against_float64(layer, x)
    plan = layer._plan
    check_against_float64(layer, x)
    assert layer._plan is plan  # nothing changed: the same plan

    # an optimizer step updates the parameters in place: the plan stays, and sees the new values
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).pow(2).sum().backward()
    opt.step()
    check_against_float64(layer, x)
    assert layer._plan is plan

    # a parameter replaced by a new tensor object
    name = next(iter(layer.store.specs)).replace(".", "/")
    layer.store._parameters[name] = nn.Parameter(torch.randn_like(layer.store._parameters[name]))
    check_against_float64(layer, x)
    assert layer._plan is not plan
    plan = layer._plan

    # an assign-load (new objects for every tensor)
    state = {k: v.clone() + 0.1 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)
    check_against_float64(layer, x)
    assert layer._plan is not plan
    plan = layer._plan

    # .to(dtype): the same Parameter objects, new data
    layer.double()
    check_against_float64(layer, x.detach().double(), tol=1e-12)
    assert layer._plan is not plan
    layer.float()

    # the backend setting
    for backend in ("torch", "compose"):
        ops.set_backend(backend)
        check_against_float64(layer, x)
        assert layer._plan.backend == backend
    ops.set_backend(None)

    # the input's dtype: checked when the plan is built, with the message a call always gave
    with pytest.raises(ValueError, match="input dtype torch.float64 does not match the weight dtype torch.float32"):
        layer(x.detach().double())
    check_against_float64(layer, x)


def test_a_tensor_re_viewed_on_its_own_storage_rebuilds_the_plan():
    """``p.data = p.data.t()`` keeps the data pointer: the layout tells the plan's views stale."""
    layer = SharedLoRALinear(nn.Linear(8, 8), r=8)
    nn.init.normal_(layer.lora_paths[0].B)
    x = torch.randn(3, 8)
    check_against_float64(layer, x)
    for t in (layer.weight, layer.lora_paths[0].A):
        plan = layer._plan
        t.data = t.data.t()
        check_against_float64(layer, x)
        assert layer._plan is not plan


@pytest.mark.parametrize("backend", ["torch", "compose", "triton"])
def test_a_tensor_cut_on_its_own_storage_or_a_bias_set_later_rebuilds_the_plan(backend):
    """``p.data = p.data[:2]`` keeps the data pointer and strides (the shape tells); a bias given to a
    layer whose base had none is a new parameter where None was."""
    ops.set_backend(backend)
    try:
        layer = SharedLoRALinear(nn.Linear(8, 6, bias=False), r=3)
        nn.init.normal_(layer.lora_paths[0].B)
        x = torch.randn(3, 8)
        check_against_float64(layer, x)
        a, b = layer.lora_paths[0].A, layer.lora_paths[0].B
        a.data, b.data = a.data[:2], b.data[:, :2]  # rank 3 -> 2, each on its own storage
        check_against_float64(layer, x)
        layer.bias = nn.Parameter(torch.full((6,), 5.0))
        check_against_float64(layer, x)
    finally:
        ops.set_backend(None)


@pytest.mark.parametrize("backend", ["torch", "compose", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_calls_outside_inference_mode_after_one_inside(backend, dropout, monkeypatch):
    """What a call under torch.inference_mode() builds and keeps (plans, the kernels' factor tables and
    a gate path's A_eff buffer, grouped launches) is made of normal tensors: later calls outside it,
    under no_grad and in training, run (right against float64 without dropout), every path kind, a
    layer alone and in an input group."""
    from sharelora_kernels import grouping

    if backend == "triton":
        pytest.importorskip("triton")
        from sharelora_kernels.ops import tables

        tables.clear_cache()  # every table made by this test's first call
    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    kinds = ("plain", "slice", "gate", "kron")
    layer, other = bishare_layer(kinds=kinds, dropout=dropout).train(), bishare_layer(kinds=kinds, dropout=dropout)
    group = grouping.InputGroup([layer, other.train()])
    x = torch.randn(5, K)
    for grouped in (False, True):
        layer.input_group = other.input_group = group if grouped else None
        with torch.inference_mode():
            inside = [layer(x), other(x)]
        with torch.no_grad():
            outside = [layer(x), other(x)]
        if dropout == 0:
            assert all(torch.equal(a, b) for a, b in zip(inside, outside))
            check_against_float64(layer, x)
        else:
            xg = x.clone().requires_grad_()
            (layer(xg).sum() + other(xg).sum()).backward()
            assert xg.grad is not None and all(t.grad is not None for t in layer.store.parameters())


@pytest.mark.parametrize("backend", ["compose", "triton"])
@pytest.mark.parametrize("grouped", [False, True])
def test_an_adapter_changed_in_place_before_backward_raises(backend, grouped, monkeypatch):
    """An adapter tensor changed in place between a call and its backward (an optimizer step taken
    in between): autograd's error, as nn.Linear gives, never a gradient of other values than the
    forward's; every path kind, a layer alone and in an input group (the kernels read the adapters
    through their tables in backward)."""
    from sharelora_kernels import grouping

    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    kinds = ("plain", "slice", "gate", "kron")
    layer, other = bishare_layer(kinds=kinds, dropout=0.25).train(), bishare_layer(kinds=kinds, dropout=0.25).train()
    if grouped:
        layer.input_group = other.input_group = grouping.InputGroup([layer, other])
    for name in ("p0.A", "p1.B", "p2.G_ou", "p3.K_A"):
        x = torch.randn(5, K, requires_grad=True)
        loss = layer(x).pow(2).sum() + other(x).pow(2).sum()
        with torch.no_grad():
            layer.store._parameters[name.replace(".", "/")].mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("backend", ["torch", "compose", "triton"])
@pytest.mark.parametrize("kinds", [("plain",), ("plain", "slice"), ("gate", "kron")])
@pytest.mark.parametrize("grouped", [False, True])
def test_a_base_weight_changed_in_place_before_backward_raises(backend, kinds, grouped, monkeypatch):
    """The frozen weight changed in place between a call and its backward (a merge, a tied weight
    updated elsewhere): dx would read the new weight; autograd's error on every backend, as the
    torch backend and nn.Linear give."""
    from sharelora_kernels import grouping

    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    layer, other = bishare_layer(kinds=kinds), bishare_layer(kinds=kinds)
    if grouped:
        layer.input_group = other.input_group = grouping.InputGroup([layer, other])
    x = torch.randn(5, K, requires_grad=True)
    loss = layer(x).pow(2).sum() + other(x).pow(2).sum()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def check_base_grads(layer, x):
    """The gradients of the base's weight and bias (those that require it) against float64 math."""
    base = [t for t in (layer.weight, layer.bias) if t.requires_grad]
    grads = torch.autograd.grad(layer(x).pow(2).sum(), base)
    base64 = {id(t): t.detach().double().requires_grad_() for t in base}
    weight, bias = (base64.get(id(t), t.detach().double()) for t in (layer.weight, layer.bias))
    paths64 = [p._replace(tensors=tuple(t.detach().double() for t in p.tensors)) for p in layer.paths()]
    y64 = reference.lora_linear(x.double(), weight, bias, paths64)
    for g, g64 in zip(grads, torch.autograd.grad(y64.pow(2).sum(), list(base64.values()))):
        assert rel_err(g, g64) < 1e-5


@pytest.mark.parametrize("kinds", [("plain", "slice", "slice"), ("gate", "kron")])
@pytest.mark.parametrize("what", ["weight", "bias"])
def test_a_base_that_trains_runs_the_torch_path_before_and_after_the_first_call(kinds, what):
    x = torch.randn(3, K)
    fresh = bishare_layer(kinds=kinds)
    getattr(fresh, what).requires_grad_(True)  # before the first call
    check_base_grads(fresh, x)
    assert fresh._plan.backend == "torch"
    layer = bishare_layer(kinds=kinds)
    layer(x)
    assert layer._plan.backend == "compose"
    getattr(layer, what).requires_grad_(True)  # after it: the plan notices
    check_base_grads(layer, x)
    assert layer._plan.backend == "torch"
    getattr(layer, what).requires_grad_(False)
    check_against_float64(layer, x)
    assert layer._plan.backend == "compose"


def path_module(shapes: dict, kind="plain", k_offset=0, rank=2) -> LoRAPathModule:
    """One path module over a store of random tensors of ``shapes`` (role -> shape)."""
    specs = {role: TensorSpec(role, shape, "gaussian", "lora", init_std=0.1) for role, shape in shapes.items()}
    store = AdapterStore({role: nn.Parameter(torch.randn(shape)) for role, shape in shapes.items()}, specs)
    return LoRAPathModule(PathSpec(kind, "lora", {role: role for role in shapes}, 1.0, rank, k_offset), store)


@pytest.mark.parametrize("backend", ["torch", "compose"])
def test_paths_that_do_not_fit_the_base_are_named_when_the_plan_is_built(backend):
    ops.set_backend(backend)
    for message, module in (("A has shape \\(2, 9\\), expected \\(2, 8\\)", path_module({"A": (2, 9), "B": (6, 2)})),
                            ("B has shape \\(6, 3\\), expected \\(6, 2\\)", path_module({"A": (2, 8), "B": (6, 3)})),
                            ("k_offset=4 \\+ K=8 exceeds A's K_max=10",
                             path_module({"A": (2, 10), "B": (6, 2)}, "slice", 4)),
                            ("k_offset=-2 is negative", path_module({"A": (2, 10), "B": (6, 2)}, "slice", -2))):
        layer = SharedLoRALinear(nn.Linear(8, 6), [module])
        with pytest.raises(ValueError, match="path 0 \\((plain|slice)\\): " + message):
            layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="unknown path kind 'Plain'"):
        path_module({"A": (2, 8), "B": (6, 2)}, "Plain")
    with pytest.raises(ValueError, match="a plain path names the tensors of roles"):
        path_module({"A": (2, 8)})


def test_autocast_and_train_eval_rebuild_the_plan():
    layer = bishare_layer(dropout=0.5)
    x = torch.randn(4, K)
    layer.eval()
    check_against_float64(layer, x)
    eval_plan = layer._plan
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16 and layer._plan is not eval_plan
    layer_copy_out = layer(x)
    assert layer_copy_out.dtype == torch.float32
    check_against_float64(layer, x)  # autocast left: float32 again
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)  # dropout drawn in training
    layer.eval()
    check_against_float64(layer, x)
    assert layer._plan is eval_plan  # the eval plan was kept, and still fits


@pytest.mark.parametrize("base_dtype,x_dtype,dropout,bias", [(torch.bfloat16, torch.float32, 0.0, True),
                                                             (torch.bfloat16, torch.bfloat16, 0.0, True),
                                                             (torch.float32, torch.float32, 0.0, True),
                                                             (torch.float32, torch.float32, 0.3, True),
                                                             (torch.float32, torch.float32, 0.0, False)])
def test_autocast_runs_the_plan(base_dtype, x_dtype, dropout, bias, monkeypatch):
    """fp32 adapters under bf16 autocast (Trainer's bf16=True) on a bf16 base (the plan casts x) or
    a float32 base (the plan casts x, W and b every call, as autocast does): compose runs with
    autocast off, the router is not called again. Output and every gradient equal the router's
    call on the same dropout mask, and are within bf16 tolerance of float64 without dropout; the
    forward alone too; autocast is on again after a call."""
    layer = bishare_layer(dropout=dropout, bias=bias).train()
    layer.weight.data = layer.weight.data.to(base_dtype)
    if bias:
        layer.bias.data = layer.bias.data.to(base_dtype)
    x = torch.randn(3, 5, K, dtype=x_dtype, requires_grad=True)
    params = [t for p in layer.paths() for t in p.tensors]
    dy = torch.randn(3, 5, N, dtype=torch.bfloat16)
    routed = []
    real = ops.lora_linear
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **kw: routed.append(1) or real(*a, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        torch.manual_seed(7)
        y = layer(x)
        assert torch.is_autocast_enabled("cpu")
        grads = torch.autograd.grad(y, [x, *params], dy)
        with torch.no_grad():
            torch.manual_seed(7)
            y_alone = layer(x)
        torch.manual_seed(7)
        y_router = real(x, layer.base_weight(), layer.bias, layer.paths(), dropout, True)
        grads_router = torch.autograd.grad(y_router, [x, *params], dy)
    assert not routed and layer._plan.backend == "compose"
    assert y.dtype == torch.bfloat16 and [g.dtype for g in grads] == [x_dtype] + [torch.float32] * len(params)
    for ours, router in zip([y, y_alone, *grads], [y_router, y_router, *grads_router]):
        assert rel_err(ours, router) < 2e-2  # bf16 roundings in another order; another mask errs by O(1)
    if dropout == 0:
        y64, grads64 = float64_call(layer, x, dy)
        for ours, router, exact in zip([y, *grads], [y_router, *grads_router], [y64, *grads64]):
            assert rel_err(ours, exact) < 2e-2 and rel_err(router, exact) < 2e-2


def test_merge_and_paths_version_rebuild_the_plan():
    layer = bishare_layer()
    x = torch.randn(4, K)
    before = layer(x)
    version = layer._paths_version
    layer.merge()
    assert layer._paths_version != version
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    assert layer._plan.backend == "base"
    layer.unmerge()
    check_against_float64(layer, x)


# ----------------------------------------------------------------------------- a steady-state call stays lean
class CountOps(TorchDispatchMode):
    """The aten ops one region runs (views and detach excluded)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func._schema.name.startswith("aten::") or func.overloadpacket in (
                torch.ops.aten.t, torch.ops.aten.view, torch.ops.aten.detach, torch.ops.aten.alias, torch.ops.aten.transpose,
                torch.ops.aten.slice, torch.ops.aten.narrow, torch.ops.aten.reshape, torch.ops.aten._unsafe_view,
                torch.ops.aten.split_with_sizes):
            return func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)  # noqa
        return func(*args, **(kwargs or {}))


class CountingEnviron(dict):
    """os.environ's stand-in that counts reads."""

    def __init__(self, real):
        super().__init__(real)
        self.reads = 0

    def get(self, *a):
        self.reads += 1
        return super().get(*a)

    def __getitem__(self, key):
        self.reads += 1
        return super().__getitem__(key)

    def __contains__(self, key):
        self.reads += 1
        return super().__contains__(key)


# The aten ops of one steady-state forward + backward (sums excluded: the loss's, and the Kronecker
# kernel gradients' sum over M of their bmm), the most allowed:
#   plain       forward h, bias + scaled h B^T, the base GEMM; backward dh (scaled), dx (two GEMMs),
#               dA, dB (scaled)                                                                     8
#   slice       the same, and one pad per tensor (the window's gradient in the tensor's shape)     10
#   3 paths     the factors stacked (2), B scaled, h, bias + h B^T, the base GEMM; backward dh,
#               dx (2), dA, dB (GEMM, scaling), two pads per slice, a copy of the plain path's rows
#               of dA and autograd's of its dB (a column window of the stacked one)                19
#   gate        the core (G_od B, A G_iu, their product), A_eff, h, bias + h G_ou^T, the base
#               GEMM; backward dh, dx (2), dA_eff, dG_ou, dC, dP, dQ, and one GEMM per tensor     20
#   kron        the base GEMM, the fold, h, h B_s^T, its Kronecker add; backward the fold of dy,
#               dh, du, dA_s, dB_s, dK_A and dK_B (a batched GEMV each), dx (tile, base GEMM)     14
LEAN = {("plain",): 8, ("slice",): 10, ("plain", "slice", "slice"): 19, ("gate",): 20, ("kron",): 14,
        ("gate", "kron"): 32}


@pytest.mark.parametrize("kinds", list(LEAN))
def test_steady_state_call_is_lean(kinds, monkeypatch):
    layer = bishare_layer(kinds=kinds)
    x = torch.randn(2, 4, K, requires_grad=True)
    for _ in range(2):
        layer(x).sum().backward()  # warm-up: the plan is built
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with CountOps() as mode:  # what one call computes (a first use of a dispatch mode imports modules)
        layer(x).sum().backward()
    plan = layer._plan
    counts = {"tensor": 0, "paths": 0, "builds": 0}
    real_tensor, real_as_path, real_build = torch.tensor, LoRAPathModule.as_path, call_plan.build_linear

    def counting(key, real):
        def wrapper(*a, **kw):
            counts[key] += 1
            return real(*a, **kw)
        return wrapper

    environ = CountingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setattr(torch, "tensor", counting("tensor", real_tensor))
    monkeypatch.setattr(LoRAPathModule, "as_path", counting("paths", real_as_path))
    monkeypatch.setattr(call_plan, "build_linear", counting("builds", real_build))
    layer(x).sum().backward()
    assert environ.reads == 0 and counts == {"tensor": 0, "paths": 0, "builds": 0}
    assert layer._plan is plan
    allowed = LEAN[kinds]
    compute = [op for op in mode.ops if op not in ("sum", "ones_like", "expand", "fill_", "empty_like")]
    assert len(compute) <= allowed, " ".join(compute)


def test_env_is_read_once_and_set_backend_refresh_settings(monkeypatch):
    layer = bishare_layer()
    x = torch.randn(3, K)
    layer(x)
    assert layer._plan.backend == "compose"
    os.environ["SHARELORA_BACKEND"] = "torch"  # not through monkeypatch: the package does not see it yet
    try:
        layer(x)
        assert layer._plan.backend == "compose"
        ops.refresh_settings()
        layer(x)
        assert layer._plan.backend == "torch"
        ops.set_backend("compose")  # wins over the variable
        layer(x)
        assert layer._plan.backend == "compose"
        with pytest.raises(ValueError, match="backend must be one of"):
            ops.set_backend("fast")
    finally:
        del os.environ["SHARELORA_BACKEND"]
        ops.set_backend(None)
        ops.refresh_settings()


def test_pickled_and_copied_layers_rebuild_their_plan():
    import copy
    import io

    layer = bishare_layer()
    x = torch.randn(3, K)
    y = layer(x)
    clone = copy.deepcopy(layer)
    assert clone._plan is None and clone._plans == {}
    torch.testing.assert_close(clone(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), y)
    assert sk.SharedLoRALinear is SharedLoRALinear


def test_kept_plans_release_a_deleted_adapter_and_converted_tensors():
    """What a layer keeps built from its tensors (plans, the views in them) never keeps storage alive
    that the model let go: a deleted adapter's (with plans kept for it), a conversion's old tensors
    (``.half()``, to meta)."""
    import gc
    import weakref

    from sharelora_kernels.model import shared_layers
    from tiny_models import tiny_model, token_batch

    model = sk.apply(tiny_model(layers=2), sk.ShareLoRAConfig(r=2), adapter_name="a")
    sk.apply(model, sk.ShareLoRAConfig(r=2), adapter_name="b")
    ids = token_batch()
    for name in ("b", "a"):  # a plan kept for each adapter
        sk.set_adapter(model, name)
        model(ids).logits.sum().backward()
    deleted = weakref.ref(model.sharelora_adapters["b"])
    sk.delete_adapter(model, "b")
    model(ids)
    gc.collect()
    assert deleted() is None
    for convert in (lambda m: m.half(), lambda m: m.to("meta")):
        layers = shared_layers(model)
        old = [weakref.ref(t.untyped_storage()) for layer in layers for t in (layer.weight, layer.lora_paths[0].A, layer.lora_paths[0].B)]
        convert(model)
        gc.collect()
        assert not any(r() is not None for r in old)
        model = sk.apply(tiny_model(layers=2), sk.ShareLoRAConfig(r=2))
        model(ids)


def test_swap_based_conversion_works_after_a_call():
    """``nn.Module._apply`` swaps parameters (DTensor, or the future flag): the plan's views of them
    must not hold a second reference then."""
    from tiny_models import tiny_model, token_batch

    model = sk.apply(tiny_model(layers=1), sk.ShareLoRAConfig(r=2))
    model(token_batch())
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert model(token_batch()).logits.dtype == torch.float64


@pytest.mark.parametrize("target", ["base", "adapter"])
@pytest.mark.parametrize("prune", ["l1_unstructured", "weight_norm"])
def test_a_tensor_replaced_by_prune_or_weight_norm_is_refused_by_name(prune, target):
    """(an adapter tensor's gave a bare KeyError from the call plan)"""
    import torch.nn.utils.prune

    layer = SharedLoRALinear(nn.Linear(16, 8), r=4)
    layer(torch.randn(2, 16))
    owner, name = (layer, "weight") if target == "base" else (layer.adapters, "A")
    if prune == "weight_norm":
        torch.nn.utils.weight_norm(owner, name)  # deprecated for parametrizations, still in use
    else:
        torch.nn.utils.prune.l1_unstructured(owner, name, amount=0.5)
    message = ("base weight of a ShareLoRA layer" if target == "base" else "adapter tensor 'A' of a ShareLoRA layer")
    with pytest.raises(NotImplementedError, match=message + " is no longer a registered parameter"):
        layer(torch.randn(2, 16))


def test_a_plan_built_while_another_thread_switched_the_layer_is_not_kept(monkeypatch):
    """Another thread switching adapters (or train / eval) between a call's reading of its
    environment and the build of its plan: the plan may hold the new state, so it is not kept under
    the old environment (it was, and the layer then computed the other adapter for good)."""
    from tiny_models import randomize_adapters, tiny_model

    model = tiny_model(layers=1)
    sk.apply(model, sk.ShareLoRAConfig(r=2, target_modules=["q_proj"]))
    sk.apply(model, sk.ShareLoRAConfig(r=3, target_modules=["q_proj"]), adapter_name="b")
    randomize_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        expected = {name: (sk.set_adapter(model, name), layer(x))[1] for name in ("b", "default")}
        layer._plans.clear()
        layer.__dict__["_plan"] = None
        real = SharedLoRALinear._build_plan

        def racing(self, x, env):  # what another thread did right after this call read its environment
            layer.set_adapter("b")
            return real(self, x, env)
        monkeypatch.setattr(SharedLoRALinear, "_build_plan", racing)
        layer(x)
        monkeypatch.setattr(SharedLoRALinear, "_build_plan", real)
        layer.set_adapter("default")
        assert torch.equal(layer(x), expected["default"])
