"""A steady-state call on the triton backend does a fixed, small amount of host work.

Every Triton launch is counted by kernel name and skipped (as ``bench --host`` stubs them), so
what a call does on the host is all that runs: the launches it issues, the tensors it allocates,
and none of the per-plan work (plans, factor tables, launch geometry, gradient routes, tensors
made from host data). A change that puts per-call rebuilding back, or an allocation or launch
a call does not need, fails here. The same calls with the kernels running match float64.
"""
from __future__ import annotations

import collections
import contextlib
import importlib

import pytest
import torch
import torch.nn as nn
from test_call_plan import K, N, bishare_layer, check_against_float64
from torch.utils._python_dispatch import TorchDispatchMode

from sharelora_kernels import grouping, ops
from sharelora_kernels.layer import SharedLoRALinear
from sharelora_kernels.ops import (autotune, call_plan, dy_lowrank, fused_lora_linear, grad_routes, lowrank_grad,
                                   lowrank_input, lowrank_only_triton, tables)

grouped_lora_linear = importlib.import_module("sharelora_kernels.ops.grouped_lora_linear")  # ops.grouped_lora_linear: the router

ALLOCATIONS = ("empty", "empty_strided", "zeros", "zeros_like", "empty_like", "new_empty", "new_zeros", "clone", "full",
               "constant_pad_nd", "cat")


GEMMS = {"_fused_linear_kernel": "gemm", "_tma_linear_kernel": "gemm"}  # one GEMM, the kernel TMA's alignment picks


@contextlib.contextmanager
def counted_launches():
    """Inside: every Triton launch skipped and counted by kernel name (the Counter yielded; the
    fused GEMM as "gemm", whichever of its two kernels runs)."""
    import triton.runtime.jit as jit

    counts: collections.Counter = collections.Counter()

    def launcher(name):
        name = GEMMS.get(name, name)
        return lambda *args, **kwargs: counts.update([name])

    saved = jit.KernelInterface.__getitem__, autotune.TunedKernel.__getitem__
    jit.KernelInterface.__getitem__ = lambda self, grid: launcher(self.fn.__name__)
    autotune.TunedKernel.__getitem__ = lambda self, grid: launcher(self.fn.fn.__name__)
    try:
        yield counts
    finally:
        jit.KernelInterface.__getitem__, autotune.TunedKernel.__getitem__ = saved


class CountAllocations(TorchDispatchMode):
    """The aten ops of a region that allocate a new tensor (by name)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ALLOCATIONS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


PER_PLAN = ((fused_lora_linear.FusedPlan, "__init__"), (grouped_lora_linear.GroupedPlan, "__init__"),
            (lowrank_only_triton.LowRankPlan, "__init__"),
            (grad_routes.GradRoutes, "__init__"), (tables, "build_tables"), (tables, "cached"), (tables, "index_tensor"),
            (dy_lowrank, "geometry"), (lowrank_grad, "geometry"), (lowrank_input, "geometry"), (call_plan, "CallPlan"),
            (torch, "tensor"))


@pytest.fixture
def per_plan(monkeypatch):
    """Counts of the per-plan work (plans, tables, launch geometry, gradient routes, host tensors)."""
    counts: collections.Counter = collections.Counter()
    for owner, name in PER_PLAN:
        real = getattr(owner, name)

        def counting(*args, _real=real, _key=f"{getattr(owner, '__name__', owner)}.{name}", **kwargs):
            counts[_key] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counting)
    return counts


def steady_call(run, x, dys, per_plan: collections.Counter) -> tuple[dict, list[str]]:
    """``run(x)`` forward and backward twice (plans built), then once counted: (launches by kernel,
    allocating aten ops); the counted call does none of the per-plan work."""
    with counted_launches() as launches:
        for _ in range(2):
            torch.autograd.backward(run(x), dys)
        launches.clear()
        before = dict(per_plan)
        with CountAllocations() as mode:
            torch.autograd.backward(run(x), dys)
    assert dict(per_plan) == before, f"per-plan work in a steady-state call: {before} -> {dict(per_plan)}"
    return dict(launches), mode.ops


@pytest.mark.parametrize("kinds,pads,copies", [(("plain",), 0, 0), (("plain", "slice", "slice"), 4, 1),
                                               (("gate", "kron"), 0, 0)])
def test_steady_state_triton_layer_call(kinds, pads, copies, per_plan):
    ops.set_backend("triton")
    layer = bishare_layer(kinds=kinds)
    x = torch.randn(2, 4, K, requires_grad=True)
    launches, allocations = steady_call(lambda x: layer(x), x, torch.randn(2, 4, N), per_plan)
    assert layer._plan.backend == "triton" and per_plan["FusedPlan.__init__"] == 1
    # forward: the x A^T projection and the fused GEMM; backward: the dy pass, dx (the same GEMM
    # kernel), dA (at these sizes one split each: no second-stage reduction)
    assert launches == {"_lowrank_project_kernel": 1, "gemm": 2, "_dy_lowrank_kernel": 1,
                        "_lowrank_grad_kernel": 1}
    # h, the (empty) dropout mask, y; dh, dB, dx, dA; a padded gradient per window of a wider tensor;
    # a copy of the plain path's rows of dA (as its .grad, a view would keep the whole buffer)
    assert sorted(allocations) == sorted(["empty"] * 7 + ["constant_pad_nd"] * pads + ["clone"] * copies), allocations
    check_against_float64(layer, x)  # the kernels, run: the plan's call is right


def test_steady_state_triton_call_with_frozen_a_launches_no_da(per_plan):
    ops.set_backend("triton")
    layer = bishare_layer(kinds=("plain",))
    for name, t in layer.store.named_parameters():
        t.requires_grad_(name.endswith("B"))
    x = torch.randn(8, K, requires_grad=True)
    launches, allocations = steady_call(lambda x: layer(x), x, torch.randn(8, N), per_plan)
    assert launches == {"_lowrank_project_kernel": 1, "gemm": 2, "_dy_lowrank_kernel": 1}
    assert allocations == ["empty"] * 6  # no dA buffer
    b = layer.store.get_parameter("p0/B")
    results = []
    for backend in ("triton", "torch"):  # the kernels, run, vs the torch reference
        ops.set_backend(backend)
        y = layer(x)
        results.append((y, *torch.autograd.grad(y, [x, b], torch.ones_like(y))))
    for got, ref in zip(*results):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen_a", [False, True])
def test_steady_state_triton_call_on_a_4bit_base(frozen_a, per_plan):
    """The low-rank-only kernels of a quantized base: h and the add into the base's output forward;
    the dy pass, dx and dA (none with frozen A factors) backward; the plan's tables and routes reused."""
    bnb = pytest.importorskip("bitsandbytes")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    ops.set_backend("triton")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(K, N, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(nn.Linear(K, N).state_dict())
    layer = SharedLoRALinear(base.to("cpu"), r=4, alpha=8).train()
    nn.init.normal_(layer.lora_paths[0].B, std=0.3)
    layer.lora_paths[0].A.requires_grad_(not frozen_a)
    x = torch.randn(2, 5, K, requires_grad=True)
    launches, allocations = steady_call(lambda x: layer(x), x, torch.randn(2, 5, N), per_plan)
    assert layer._plan.backend == "triton" and per_plan["LowRankPlan.__init__"] == 1
    expected = {"_lowrank_project_kernel": 1, "_lowrank_add_kernel": 2, "_dy_lowrank_kernel": 1}
    assert launches == (expected if frozen_a else {**expected, "_lowrank_grad_kernel": 1}), launches
    assert "cat" not in allocations and "constant_pad_nd" not in allocations, allocations
    results = []
    for backend in ("triton", "torch"):  # the kernels, run, vs the torch path
        ops.set_backend(backend)
        y = layer(x)
        params = [t for t in layer.parameters() if t.requires_grad]
        results.append((y, *torch.autograd.grad(y, [x, *params], torch.ones_like(y))))
    for got, ref in zip(*results):
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def grouped_layers() -> list[SharedLoRALinear]:
    torch.manual_seed(0)
    layers = [SharedLoRALinear(nn.Linear(K, n), r=r, alpha=8) for n, r in ((N, 4), (N, 3), (12, 5))]
    for layer in layers:
        nn.init.normal_(layer.lora_paths[0].B, std=0.3)
    return layers


def test_steady_state_grouped_call(per_plan):
    ops.set_backend("triton")
    layers = grouped_layers()
    group = grouping.InputGroup(layers)
    x = torch.randn(6, K, requires_grad=True)
    own = [layer(x) for layer in layers]  # each its own fused op (no group yet)
    for layer in layers:
        layer.input_group = group
    dys = [torch.randn(6, layer.out_features) for layer in layers]
    launches, allocations = steady_call(lambda x: [layer(x) for layer in layers], x, dys, per_plan)
    assert group._plan.backend == "triton" and per_plan["GroupedPlan.__init__"] == 1
    # forward: one projection for the group and one grouped GEMM; backward: a dy pass per module,
    # one grouped dx GEMM, one dA over the group's distinct A-views
    assert launches == {"_lowrank_project_kernel": 1, "_grouped_linear_kernel": 2, "_dy_lowrank_kernel": 3,
                        "_lowrank_grad_kernel": 1}
    # h, the mask, three y; dh and dB per module, the modules' dh side by side; dx, dA; a copy of each
    # module's rows of the group's dA (as its .grad, a view would keep the whole buffer)
    assert sorted(allocations) == sorted(["empty"] * 13 + ["cat"] + ["clone"] * 3), allocations
    for y, ref in zip([layer(x) for layer in layers], own):  # the kernels, run
        assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_grouped_call_training_b_alone_launches_no_dx_and_no_da(per_plan):
    ops.set_backend("triton")
    layers = grouped_layers()
    group = grouping.InputGroup(layers)
    for layer in layers:
        layer.lora_paths[0].A.requires_grad_(False)
        layer.input_group = group
    x = torch.randn(6, K)
    dys = [torch.randn(6, layer.out_features) for layer in layers]
    launches, allocations = steady_call(lambda x: [layer(x) for layer in layers], x, dys, per_plan)
    assert launches == {"_lowrank_project_kernel": 1, "_grouped_linear_kernel": 1, "_dy_lowrank_kernel": 3}
    assert allocations == ["empty"] * 11, allocations  # h, mask, three y; dh and dB per module
    grads = []
    for grouped in (True, False):  # the kernels, run: grouped vs each module's own op
        for layer in layers:
            layer.input_group = group if grouped else None
        ys = [layer(x) for layer in layers]
        grads.append(torch.autograd.grad(ys, [layer.lora_paths[0].B for layer in layers], dys))
    for got, ref in zip(*grads):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_steady_state_call_without_grad(per_plan):
    ops.set_backend("triton")
    layer = bishare_layer(kinds=("plain", "slice"))
    x = torch.randn(8, K)
    with torch.no_grad(), counted_launches() as launches:
        for _ in range(2):
            layer(x)
        launches.clear()
        before = dict(per_plan)
        with CountAllocations() as mode:
            layer(x)
    assert dict(per_plan) == before
    assert dict(launches) == {"_lowrank_project_kernel": 1, "gemm": 1} and mode.ops == ["empty"] * 3  # h, mask, y
    with torch.no_grad():
        y = layer(x)  # the kernels, run
        ops.set_backend("torch")
        assert torch.allclose(y, layer(x), atol=1e-5, rtol=1e-5)
