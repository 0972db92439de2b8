"""The low-rank-only op (``ops.lowrank_add``: y += paths of dropout(x), in place) vs the float64 reference.

Both backends: the torch path, and the Triton kernels through TRITON_INTERPRET=1 (conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from sharelora_kernels import ops, reference
from sharelora_kernels.ops import lowrank_only
from sharelora_kernels.ops.encoding import encode
from sharelora_kernels.ops.lowrank_only import _LowRankAdd, lowrank_add
from sharelora_kernels.reference import LoRAPath
from test_ops_fused_lora_linear import TOL, make_path, rel_err

BACKENDS = [False, pytest.param(True, marks=pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable"))]
IDS = ["torch", "triton"]


def float64_lowrank(x, y0, paths, dy, keep=None):
    """y0 + the paths of x (times ``keep / (1 - p)`` when given) in float64, and the gradients of
    <dy, y> for x and every path tensor (y0 gets dy itself)."""
    d = lambda t: t.detach().double().requires_grad_()
    x64 = d(x)
    p64 = [p._replace(tensors=tuple(d(t) for t in p.tensors)) for p in paths]
    zero = torch.zeros(y0.shape[-1], x.shape[-1], dtype=torch.float64)
    y = y0.double() + reference.lora_linear(x64, zero, None, p64, x_dropped=None if keep is None else x64 * keep)
    leaves = [x64] + [t for p in p64 for t in p.tensors]
    return y.detach(), torch.autograd.grad(y, leaves, dy.double())


def run(x, y0, paths, dy, use_triton, compute_dtype=None, **kw):
    """Output of lowrank_add on a copy of y0, and the gradients of x and every path tensor."""
    y = lowrank_add(y0.clone(), x, paths, compute_dtype=compute_dtype, use_triton=use_triton, **kw)
    leaves = [x] + [t for p in paths for t in p.tensors]
    return y, torch.autograd.grad(y, leaves, dy)


def check(kinds, ranks, m, k, n, use_triton, dtype=torch.float32, adapter_dtype=None, y_dtype=None):
    torch.manual_seed(0)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    y0 = torch.randn(m, n, dtype=y_dtype or dtype)
    paths = [make_path(kind, k, n, r, adapter_dtype or dtype) for kind, r in zip(kinds, ranks)]
    dy = torch.randn(m, n, dtype=y0.dtype)
    y, grads = run(x, y0, paths, dy, use_triton)
    y_ref, grads_ref = float64_lowrank(x, y0, paths, dy)
    assert y.dtype == y0.dtype and y.shape == (m, n)
    assert rel_err(y, y_ref) < TOL[dtype]
    leaves = [x] + [t for p in paths for t in p.tensors]
    for i, (g, g_ref, leaf) in enumerate(zip(grads, grads_ref, leaves)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert rel_err(g, g_ref) < TOL[dtype], f"gradient {i} of {kinds}"


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@pytest.mark.parametrize("kind", ["plain", "slice", "gate", "kron"])
def test_each_kind_fp32_gqa_shape(kind, use_triton):
    check([kind], [3], m=7, k=48, n=16, use_triton=use_triton)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@pytest.mark.parametrize("m", [1, 33])
def test_all_kinds_summed(m, use_triton):
    check(["slice", "gate", "plain", "kron", "slice"], [5, 2, 4, 3, 1], m=m, k=40, n=56, use_triton=use_triton)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_compute_with_float32_adapters(dtype, use_triton):
    """The default on a bf16/fp16-compute base: fp32 adapters rounded to the compute dtype, fp32 sums."""
    check(["plain", "slice", "gate", "kron"], [2, 3, 2, 5], m=9, k=48, n=40, use_triton=use_triton, dtype=dtype,
          adapter_dtype=torch.float32)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_compute_dtype_casts_x_and_keeps_y_dtype(use_triton):
    """An fp32 x and y with a bf16 compute dtype (autocast over a 4-bit base): the operands are
    rounded to bf16, y stays fp32, dx comes back in x's dtype."""
    torch.manual_seed(1)
    m, k, n = 6, 32, 24
    x = torch.randn(m, k, requires_grad=True)
    y0 = torch.randn(m, n)
    paths = [make_path("plain", k, n, 3), make_path("kron", k, n, 2)]
    dy = torch.randn(m, n)
    y, grads = run(x, y0, paths, dy, use_triton, compute_dtype=torch.bfloat16)
    y_ref, grads_ref = float64_lowrank(x, y0, paths, dy)
    assert y.dtype == torch.float32 and grads[0].dtype == torch.float32
    assert rel_err(y - y0, y_ref - y0.double()) < TOL[torch.bfloat16]
    assert rel_err(y - y0, y_ref - y0.double()) > 1e-6  # really rounded to bf16, not run in fp32
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_adds_into_y_in_place(use_triton):
    torch.manual_seed(2)
    x, y = torch.randn(5, 24), torch.randn(5, 16)
    before, address = y.clone(), y.data_ptr()
    out = lowrank_add(y, x, [make_path("gate", 24, 16, 2)], use_triton=use_triton)
    assert out is y and y.data_ptr() == address and not torch.equal(y, before)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_leading_dims_and_empty_batch(use_triton):
    torch.manual_seed(3)
    paths = [make_path("kron", 24, 16, 2), make_path("plain", 24, 16, 2)]
    x = torch.randn(2, 3, 24, requires_grad=True)
    y0 = torch.randn(2, 3, 16)
    dy = torch.randn(2, 3, 16)
    y, grads = run(x, y0, paths, dy, use_triton)
    y_ref, grads_ref = float64_lowrank(x.reshape(6, 24), y0.reshape(6, 16), paths, dy.reshape(6, 16))
    assert y.shape == (2, 3, 16) and rel_err(y.reshape(6, 16), y_ref) < 1e-4
    assert grads[0].shape == x.shape and rel_err(grads[0].reshape(6, 24), grads_ref[0]) < 1e-4
    x0 = torch.randn(0, 24, requires_grad=True)
    y, grads = run(x0, torch.randn(0, 16), paths, torch.randn(0, 16), use_triton)
    assert y.shape == (0, 16) and grads[0].shape == (0, 24) and all(g.abs().sum() == 0 for g in grads[1:])


# ---------------------------------------------------------------------------------- dropout
def op_mask(m, k, p, seed, use_triton):
    """The op's dropout mask for seed: an identity path on an all-ones x adds mask / (1 - p) to zeros."""
    y = torch.zeros(m, k)
    tensors, layout, scales = encode([LoRAPath("plain", (torch.eye(k), torch.eye(k)), 1.0)])
    torch.ops.sharelora.lowrank_add_(y, torch.ones(m, k), tensors, layout, scales, p, seed, use_triton)
    return y * (1 - p)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_dropout_same_mask_forward_and_backward(use_triton):
    torch.manual_seed(4)
    m, k, n, p = 9, 40, 24, 0.3
    x = torch.randn(m, k, requires_grad=True)
    y0 = torch.randn(m, n)
    paths = [make_path("plain", k, n, 3), make_path("kron", k, n, 2), make_path("gate", k, n, 3)]
    tensors, layout, scales = encode(paths)
    seed = torch.tensor([1234])
    y = _LowRankAdd.apply(y0.clone(), x, seed, layout, scales, p, use_triton, *tensors)
    dy = torch.randn(m, n)
    grads = torch.autograd.grad(y, [x] + tensors, dy)
    mask = op_mask(m, k, p, seed, use_triton)
    assert set(mask.round().unique().tolist()) == {0.0, 1.0} and abs(mask.mean().item() - (1 - p)) < 0.15
    y_ref, grads_ref = float64_lowrank(x, y0, paths, dy, keep=mask.round().double() / (1 - p))
    assert rel_err(y, y_ref) < 1e-4
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_dropout_only_in_training_and_fresh_per_call(use_triton):
    torch.manual_seed(5)
    x, y0 = torch.randn(8, 16), torch.randn(8, 8)
    paths = [make_path("plain", 16, 8, 2)]
    run_ = lambda training: lowrank_add(y0.clone(), x, paths, 0.5, training, use_triton=use_triton)
    ref, _ = float64_lowrank(x, y0, paths, torch.zeros(8, 8))
    assert rel_err(run_(False), ref) < 1e-4
    first, second = run_(True), run_(True)
    assert rel_err(first, ref) > 1e-3 and not torch.equal(first, second)


# ---------------------------------------------------------------------------------- integration
@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_opcheck_custom_ops(use_triton):
    """Schema (y declared mutated), fake impls and AOT tracing of the forward and backward ops."""
    torch.manual_seed(6)
    m, k, n = 5, 24, 16
    paths = [make_path("slice", k, n, 3), make_path("kron", k, n, 2)]
    tensors, layout, scales = encode([p._replace(tensors=tuple(t.detach() for t in p.tensors)) for p in paths])
    x, seed = torch.randn(k, m).t(), torch.tensor([11])  # a transposed (non-contiguous) x
    torch.library.opcheck(torch.ops.sharelora.lowrank_add_.default,
                          (torch.randn(m, n), x, tensors, layout, scales, 0.2, seed, use_triton))
    _, mask = torch.ops.sharelora.lowrank_add_(torch.randn(m, n), x, tensors, layout, scales, 0.2, seed, use_triton)
    torch.library.opcheck(torch.ops.sharelora.lowrank_add_backward.default,
                          (torch.randn(n, m).t(), x, torch.randn(m, 5), mask, tensors, layout, scales, 0.2, seed, True,
                           use_triton))


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_compile_fullgraph_no_graph_break(use_triton):
    torch.manual_seed(7)
    w = torch.randn(16, 24)
    paths = [make_path("plain", 24, 16, 3), make_path("gate", 24, 16, 2)]
    leaves = [t for p in paths for t in p.tensors]

    def f(x):
        return lowrank_add(x @ w.t(), x, paths, use_triton=use_triton).relu()

    x = torch.randn(2, 5, 24, requires_grad=True)
    eager = f(x)
    eager_grads = torch.autograd.grad(eager.sum(), [x] + leaves)
    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), [x] + leaves)
    assert torch.allclose(out, eager, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-5)


def test_dispatch_picks_triton_only_when_asked_on_cpu(monkeypatch):
    calls = []
    real = lowrank_only.lowrank_add
    monkeypatch.setattr(ops, "_lowrank_add", lambda *a: calls.append(a[-1]) or real(*a))
    x, y = torch.randn(3, 16), torch.randn(3, 8)
    paths = [make_path("plain", 16, 8, 2)]
    monkeypatch.delenv("SHARELORA_BACKEND", raising=False)
    ops.lowrank_add(y, x, paths)
    if ops.HAS_TRITON:
        monkeypatch.setenv("SHARELORA_BACKEND", "triton")
        ops.lowrank_add(y, x, paths)
        ops.lowrank_add(y, x.double(), [make_path("plain", 16, 8, 2, torch.float64)])  # float64: torch path
        assert calls == [False, True, False]


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kind", ["gate", "kron"])
def test_float64_gradients_of_every_kind_and_of_a_shared_tensor(kind):
    """Everything in float64: the chain rules run in float64 (they cast to float32 before), and a
    tensor read by two paths gets its gradient summed in float64."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    y0, dy = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    shared = make_path("plain", 16, 8, 2, torch.float64)
    paths = [make_path(kind, 16, 8, 2, torch.float64), shared, shared._replace(scale=0.5)]
    leaves = list(dict.fromkeys(t.requires_grad_() for p in paths for t in p.tensors))  # the shared ones once
    out = lowrank_add(y0.clone(), x, paths)
    ref = y0 + reference.lora_linear(x, torch.zeros(8, 16, dtype=torch.float64), None, paths)  # autograd, float64
    assert rel_err(out, ref) < 1e-12
    for g, r in zip(torch.autograd.grad(out, [x, *leaves], dy), torch.autograd.grad(ref, [x, *leaves], dy)):
        assert g.dtype == torch.float64 and rel_err(g, r) < 1e-12


def test_bad_inputs_raise_clear_errors():
    x, y = torch.randn(3, 16), torch.randn(3, 8)
    with pytest.raises(ValueError, match="y and x share memory"):
        lowrank_add(x[:, :8], x, [make_path("plain", 16, 8, 2)])
    plain = make_path("plain", 16, 8, 2)
    with pytest.raises(ValueError, match="share their leading dims"):
        lowrank_add(torch.randn(4, 8), x, [plain])
    with pytest.raises(ValueError, match=r"B has shape \(9, 2\), expected \(8, 2\)"):
        lowrank_add(y, x, [LoRAPath("plain", (torch.randn(2, 16), torch.randn(9, 2)), 1.0)])
    with pytest.raises(ValueError, match="d=8 must divide K=12"):
        lowrank_add(y, torch.randn(3, 12), [make_path("kron", 16, 8, 2)])
    with pytest.raises(ValueError, match="dropout_p must be in"):
        lowrank_add(y, x, [plain], dropout_p=1.0)
    with pytest.raises(ValueError, match="floating point"):
        lowrank_add(y, x.long(), [plain])
    with pytest.raises(ValueError, match="x is on cpu but y is on meta"):
        lowrank_add(y.to("meta"), x, [plain])
    with pytest.raises(ValueError, match="x is on cpu but path 0 .plain.'s A is on meta"):
        lowrank_add(y, x, [plain._replace(tensors=(plain.tensors[0].to("meta"), plain.tensors[1]))])


def test_bad_compute_dtype_and_kernels_off_the_gpu_are_refused(monkeypatch):
    """An integer compute dtype would truncate x before the products; the kernels on a CPU tensor
    (no interpreter) would fail inside Triton: both are refused by name."""
    from sharelora_kernels.ops import utils

    x, y = torch.randn(3, 24), torch.randn(3, 16)
    paths = [make_path("plain", 24, 16, 2)]
    for dtype in (torch.int32, torch.bool, "float32"):
        with pytest.raises(ValueError, match="compute_dtype must be a floating-point torch.dtype or None"):
            lowrank_add(y.clone(), x, paths, compute_dtype=dtype)
    monkeypatch.setattr(utils, "INTERPRET", False)  # as on a machine without the interpreter
    with pytest.raises(ValueError, match="the triton backend needs CUDA tensors"):
        lowrank_add(y.clone(), x, paths, use_triton=True)
