"""The compose backend (torch GEMMs, hand-written backward) against the float64 reference: outputs and
every gradient, every path kind, base and adapter dtypes, dropout, layouts, groups and torch.compile."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from sharelora_kernels import ops
from sharelora_kernels.layer import SharedLoRALinear
from sharelora_kernels.ops import compose
from sharelora_kernels.reference import LoRAPath
from test_ops_fused_lora_linear import TOL, float64_reference, make_path, rel_err
from test_ops_grouped import GATE_UP, QKV, float64_group, leaves_of, make_group, mix_paths
from test_properties import TOL as GRAD_TOL
from test_properties import cases, check

KINDS = ["plain", "slice", "gate", "kron"]


def run_and_compare(x, weight, bias, paths, dropped=None, p=0.0, tol=None):
    """Compose's output and gradients (x and every adapter tensor) vs the float64 reference.

    Gradients use test_properties' tolerances and rule: a gate core's gradient is a cancelling sum
    of bf16-rounded terms (dh, h, as under autocast), so it reaches ~3e-2 at some seeds in every
    backend (the fused kernels too); it is also judged against 0.1 x the case's largest gradient.
    """
    y = compose.lora_linear(x, weight, bias, paths, p, p > 0, dropped)
    dy = torch.randn_like(y)
    leaves = [x] + [t for q in paths for t in q.tensors]
    grads = torch.autograd.grad(y, leaves, dy)
    keep = None if dropped is None else dropped[1].reshape(x.shape) / (1 - p)
    y_ref, grads_ref = float64_reference(x, weight, bias, paths, dy, xd=keep)
    low = max((x.dtype, paths[0].tensors[0].dtype), key=TOL.get)
    assert y.dtype == x.dtype and y.shape == y_ref.shape and rel_err(y, y_ref) < (tol or TOL[low])
    tol = tol or GRAD_TOL[low]
    scale = max(g.abs().max().item() for g in grads_ref)
    for i, (g, g_ref, leaf) in enumerate(zip(grads, grads_ref, leaves)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"gradient {i}"
        err = (g.double() - g_ref).abs().max().item() / max(g_ref.abs().max().item(), 0.1 * scale, 1e-12)
        assert err < tol, f"gradient {i} of {[q.kind for q in paths]}: {err:.2e}"


def inputs(m, k, n, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(m, k, dtype=dtype).requires_grad_()
    return x, torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype) if bias else None


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_fp32_gqa_shape(kind):
    x, w, b = inputs(7, 48, 16, torch.float32)
    run_and_compare(x, w, b, [make_path(kind, 48, 16, 3)])


@pytest.mark.parametrize("m", [1, 7, 33])
def test_all_kinds_summed_fp32(m):
    x, w, b = inputs(m, 40, 56, torch.float32, bias=m != 7)
    run_and_compare(x, w, b, [make_path(kind, 40, 56, r) for kind, r in zip(KINDS, [5, 3, 4, 7])])


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
def test_half_bases_and_adapter_dtypes(dtype, adapter_dtype):
    """Low-rank GEMMs in the base dtype (float32 under float16), adapter grads in each adapter's dtype."""
    x, w, b = inputs(33, 48, 40, dtype)
    run_and_compare(x, w, b, [make_path(kind, 48, 40, r, adapter_dtype) for kind, r in zip(KINDS, [1, 5, 3, 9])])


def test_kron_alone_and_two_kron_paths_without_bias():
    """Kronecker-only modules start from the base GEMM (no dense term to write first)."""
    x, w, _ = inputs(9, 48, 40, torch.float32)
    run_and_compare(x, w, None, [make_path("kron", 48, 40, 2), make_path("kron", 48, 40, 3)])


def test_rank_above_one_tile_and_mixed_adapter_dtypes():
    x, w, b = inputs(7, 40, 24, torch.float32)
    paths = [make_path("plain", 40, 24, 67), make_path("kron", 40, 24, 5, torch.bfloat16),
             make_path("gate", 40, 24, 3, torch.float16)]
    run_and_compare(x, w, b, paths, tol=TOL[torch.bfloat16])


def test_transposed_input_and_weight_leading_dims_and_empty_batch():
    torch.manual_seed(1)
    x = torch.randn(48, 9).t().requires_grad_()  # (9, 48), strides (1, 9)
    weight = torch.randn(48, 24).t()
    run_and_compare(x, weight, None, [make_path("slice", 48, 24, 3), make_path("kron", 48, 24, 2)])
    paths = [make_path("kron", 24, 16, 2), make_path("plain", 24, 16, 2)]
    x3 = torch.randn(2, 3, 24, requires_grad=True)
    y = compose.lora_linear(x3, torch.randn(16, 24), None, paths)
    assert y.shape == (2, 3, 16)
    x0 = torch.randn(0, 24, requires_grad=True)
    y0 = compose.lora_linear(x0, torch.randn(16, 24), None, paths)
    grads = torch.autograd.grad(y0.sum(), [x0, *paths[0].tensors])
    assert y0.shape == (0, 16) and grads[0].shape == (0, 24) and all(g.abs().sum() == 0 for g in grads[1:])


def test_a_tensor_read_by_two_paths_gets_both_gradients():
    x, w, b = inputs(5, 24, 16, torch.float32)
    a = torch.randn(3, 24, requires_grad=True)
    paths = [LoRAPath("plain", (a, torch.randn(16, 3, requires_grad=True)), 0.5),
             LoRAPath("slice", (a, torch.randn(20, 3, requires_grad=True)), 0.25, 0, 2)]
    y = compose.lora_linear(x, w, b, paths)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves_of(x, [paths]), dy)
    (y_ref,), grads_ref = float64_group(x, [w], [b], [paths], [dy])  # a is one float64 leaf there too
    assert len(grads) == 4 and rel_err(y, y_ref) < 1e-4 and all(rel_err(g, r) < 1e-4 for g, r in zip(grads, grads_ref))


def test_frozen_adapters_and_an_input_without_grad():
    torch.manual_seed(2)
    x, w = torch.randn(6, 24), torch.randn(16, 24)
    frozen = LoRAPath("plain", (torch.randn(2, 24), torch.randn(16, 2)), 1.0)
    trained = make_path("kron", 24, 16, 2)
    y = compose.lora_linear(x, w, None, [frozen, trained])
    grads = torch.autograd.grad(y.sum(), trained.tensors)
    y_ref, grads_ref = float64_reference(x, w, None, [frozen, trained], torch.ones(6, 16))
    assert rel_err(y, y_ref) < 1e-4 and all(rel_err(g, r) < 1e-4 for g, r in zip(grads, grads_ref[-4:]))
    x.requires_grad_()
    (dx,) = torch.autograd.grad(compose.lora_linear(x, w, None, [frozen]).sum(), [x])
    assert rel_err(dx, float64_reference(x, w, None, [frozen], torch.ones(6, 16))[1][0]) < 1e-4


# ---------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_one_mask_for_forward_and_backward(dtype):
    """The mask compose draws (torch.native_dropout, first use of the generator) is the one forward
    and backward both apply: same seed, same mask, and the float64 reference with it agrees."""
    x, w, b = inputs(9, 40, 24, dtype, seed=3)
    paths = [make_path(kind, 40, 24, r, torch.float32) for kind, r in zip(KINDS, [3, 2, 2, 2])]
    torch.manual_seed(11)
    _, mask = compose.draw_dropout(x.detach(), 0.3)
    assert 0.5 < mask.float().mean() < 0.9
    torch.manual_seed(11)
    y_own = compose.lora_linear(x, w, b, paths, 0.3, True)
    torch.manual_seed(11)
    dropped = compose.draw_dropout(x.detach(), 0.3)
    assert torch.equal(dropped[1], mask)
    assert torch.equal(compose.lora_linear(x, w, b, paths, 0.3, True, dropped), y_own)
    run_and_compare(x, w, b, paths, dropped, p=0.3)


def test_dropout_only_in_training():
    x, w, _ = inputs(16, 16, 8, torch.float32, seed=4)
    paths = [make_path("plain", 16, 8, 2)]
    eval_y = compose.lora_linear(x, w, None, paths, 0.5, training=False)
    train_y = compose.lora_linear(x, w, None, paths, 0.5, training=True)
    ref, _ = float64_reference(x, w, None, paths, torch.zeros(16, 8))
    assert rel_err(eval_y, ref) < 1e-4 and rel_err(train_y, ref) > 1e-3


# ---------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saves_no_converted_copy_of_x(dtype):
    """fp32 adapters on a half base, dropout on: of the (M, K)-sized tensors saved for backward, one
    is x itself and one the bool mask; nothing else (no fp32 or dropped-out copy of x)."""
    m, k, n = 32, 48, 40
    x, w, b = inputs(m, k, n, dtype, seed=5)
    paths = [make_path(kind, k, n, 3, torch.float32) for kind in KINDS]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compose.lora_linear(x, w, b, paths, 0.2, True)
    big = [t for t in saved if t.numel() == m * k]
    assert sorted(str(t.dtype) for t in big) == sorted([str(dtype), "torch.bool"])
    assert any(t.data_ptr() == x.data_ptr() for t in big)


# ---------------------------------------------------------------------------------- groups
def test_group_shares_one_mask_and_matches_per_module_reference():
    x, weights, biases, _ = make_group(QKV, "plain")
    paths = mix_paths(QKV)
    ys = ops.grouped_lora_linear(x, weights, biases, paths, backend="compose")
    dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, leaves_of(x, paths), dys)
    ys_ref, grads_ref = float64_group(x, weights, biases, paths, dys)
    assert all(rel_err(y, r) < 1e-4 for y, r in zip(ys, ys_ref))
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, grads_ref))
    x, weights, biases, _ = make_group(GATE_UP, "plain")
    k = x.shape[1]
    eye = [[LoRAPath("plain", (torch.eye(k), torch.eye(n, k)), 1.0)] for n in GATE_UP]  # low-rank term = dropout(x)
    ys = ops.grouped_lora_linear(x, weights, biases, eye, 0.5, True, backend="compose")
    lows = [y - torch.nn.functional.linear(x, w, b) for y, w, b in zip(ys, weights, biases)]
    assert torch.allclose(lows[0], lows[1], atol=1e-5) and 0.3 < (lows[0].abs() < 1e-6).float().mean() < 0.7


# ---------------------------------------------------------------------------------- integration
def test_router_sends_compose_and_compile_fullgraph_has_no_graph_break(monkeypatch):
    monkeypatch.setenv("SHARELORA_BACKEND", "compose")
    torch.manual_seed(5)
    layer = SharedLoRALinear(torch.nn.Linear(24, 16), r=3, alpha=6.0)
    torch.nn.init.normal_(layer.lora_paths[0].B)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(module, seq):
        x = torch.randn(2, seq, 24, generator=torch.Generator().manual_seed(seq), requires_grad=True)
        y = module(x)
        return y.detach(), torch.autograd.grad(y.pow(2).sum(), [x, *params])

    eager = [run(layer, s) for s in (5, 7)]
    assert layer._plan.backend == "compose"  # the eager call's plan runs compose
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for (y_e, g_e), s in zip(eager, (5, 7)):
        y_c, g_c = run(compiled, s)
        assert torch.allclose(y_c, y_e, atol=1e-5) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_c, g_e))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_compose_matches_float64_reference_on_drawn_cases(case, monkeypatch):
    check(case, "compose", monkeypatch)


def test_bad_inputs_raise_clear_errors():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    path = [make_path("plain", 16, 8, 2)]
    with pytest.raises(ValueError, match="K=12 features but weight has shape \\(8, 16\\)"):
        compose.lora_linear(torch.randn(3, 12), w, None, path)
    with pytest.raises(ValueError, match="bias has shape"):
        compose.lora_linear(x, w, torch.randn(7), path)
    with pytest.raises(ValueError, match="frozen"):
        compose.lora_linear(x, w.requires_grad_(), None, path)
    with pytest.raises(ValueError, match="dropout_p"):
        compose.lora_linear(x, w.detach(), None, path, 1.0, True)


@pytest.mark.parametrize("backend", ["torch", "compose", "auto"])
def test_dtypes_that_do_not_fit_are_named(backend):
    """Outside autocast x, W and b share a dtype, and adapters are floating point (a complex one would
    silently lose its imaginary part)."""
    x, w, path = torch.randn(3, 16), torch.randn(8, 16), make_path("plain", 16, 8, 2)
    with pytest.raises(ValueError, match="x is torch.float32 but the weight is torch.bfloat16"):
        ops.lora_linear(x, w.bfloat16(), None, [path], backend=backend)
    with pytest.raises(ValueError, match="x is torch.float32 but the bias is torch.float64"):
        ops.lora_linear(x, w, torch.randn(8, dtype=torch.float64), [path], backend=backend)
    for bad in (torch.int64, torch.complex64):
        odd = path._replace(tensors=(path.tensors[0].to(bad), path.tensors[1]))
        with pytest.raises(ValueError, match=r"path 0 \(plain\): adapter tensors must be floating point"):
            ops.lora_linear(x, w, None, [odd], backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts them: accepted
        assert ops.lora_linear(x, w.bfloat16(), None, [path], backend=backend).dtype == torch.bfloat16


def _overflowing_path(kind: str, k: int, n: int, s: float) -> LoRAPath:
    """A path whose unscaled product h B^T exceeds float16's range (65504) while s h B^T does not:
    kron 640, gate 3072 at every output of x = 4."""
    if kind == "kron":
        return LoRAPath("kron", (torch.full((2, 4), 100.), torch.full((4, 2), 100.), torch.ones(1, k // 4),
                                 torch.ones(n // 4, 1)), s)
    return LoRAPath("gate", (torch.ones(2, 4), torch.ones(3, 2), torch.full((2, k), 10.), torch.ones(4, 2),
                             torch.ones(2, 3), torch.full((n, 2), 100.)), s)


@pytest.mark.parametrize("kind, want", [("kron", 640.0), ("gate", 3072.0)])
def test_a_float16_base_scales_before_it_rounds(kind, want):
    """Every route that adds a path into a float16 output forms s h B^T before rounding to float16."""
    import torch.nn as nn

    from sharelora_kernels.benchmarks.host import layer_with_paths

    k = n = 8
    x, w = torch.full((2, k), 4.0, dtype=torch.float16), torch.zeros(n, k, dtype=torch.float16)
    path = _overflowing_path(kind, k, n, 1e-3)
    outs = {b: ops.lora_linear(x, w, None, [path], backend=b) for b in ("torch", "compose")}
    outs["lowrank_add"] = ops.lowrank_add(torch.zeros(2, n, dtype=torch.float16), x, [path])
    with torch.no_grad():
        outs["multi_adapter_add"] = ops.multi_adapter_add(torch.zeros(2, n, dtype=torch.float16), x,
                                                          ops.adapter_batch([0, 0], 1), ops.adapter_tables([[path]], k, n))
    base = nn.Linear(k, n, bias=False).half().requires_grad_(False)
    base.weight.zero_()
    layer = layer_with_paths(base, [path])
    ops.set_backend("compose")
    try:
        outs["layer"] = layer(x)  # its call plan's program
    finally:
        ops.set_backend(None)
    for name, y in outs.items():
        assert torch.all(y == want), (name, y)


@pytest.mark.parametrize("kind", ["plain", "slice", "gate", "kron"])
def test_a_nan_adapter_at_scale_zero_gives_nan_on_every_backend(kind):
    """0 * NaN is NaN, as PEFT's lora_B(lora_A(x)) * scaling gives: no backend hides it."""
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    path = make_path(kind, 16, 8, 2)
    path = path._replace(scale=0.0, tensors=(path.tensors[0].clone().fill_(float("nan")), *path.tensors[1:]))
    for backend in ("torch", "compose"):
        assert ops.lora_linear(x, w, None, [path], backend=backend).isnan().all(), backend


@pytest.mark.parametrize("kind", ["plain", "slice", "gate", "kron"])
def test_second_derivatives_exact_on_torch_and_refused_by_hand_written_backwards(kind):
    """create_graph=True: the torch backend's gradients are themselves differentiable (gradgradcheck
    in float64, dropout-free); compose and triton, whose backward is first-order only, raise a clear
    error rather than return gradients without their own graph."""
    torch.manual_seed(0)
    k, n = 2 * 8, 3 * 8
    path = make_path(kind, k, n, 3, torch.float64)
    weight, bias = torch.randn(n, k, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    x = torch.randn(5, k, dtype=torch.float64, requires_grad=True)
    tensors = [t.requires_grad_() for t in path.tensors]
    ops.set_backend("torch")
    call = lambda x, *ts: ops.lora_linear(x, weight, bias, [path._replace(tensors=ts)])  # noqa: E731
    assert torch.autograd.gradgradcheck(call, (x, *tensors))
    for backend in ("compose", "triton"):
        ops.set_backend(backend)
        x32, ts32 = x.detach().float().requires_grad_(), [t.detach().float().requires_grad_() for t in tensors]
        y = ops.lora_linear(x32, weight.float(), bias.float(), [path._replace(tensors=ts32)])
        with pytest.raises(RuntimeError, match=f"second derivative .create_graph=True. through a sharelora_kernels "
                                               f"layer: the {backend} backend computes first derivatives only; "
                                               "the torch backend's second derivatives are exact"):
            torch.autograd.grad(y.square().sum(), [x32, *ts32], create_graph=True)
        gx = torch.autograd.grad(ops.lora_linear(x32, weight.float(), bias.float(), [path._replace(tensors=ts32)])
                                 .square().sum(), x32)[0]  # first order: as before
        assert gx.abs().max() > 0


def bad_calls():
    """(what the error names, x, weight, paths, dropout_p) of calls every backend must refuse."""
    k, n, r = 16, 8, 2
    x, w = torch.randn(3, k), torch.randn(n, k)
    a, b = torch.randn(r, k), torch.randn(n, r)
    return [("unknown kind 'Plain'", x, w, [LoRAPath("Plain", (a, b), 1.0)], 0.0),
            (r"A has shape \(2, 18\), expected \(2, 16\)", x, w, [LoRAPath("plain", (torch.randn(r, k + 2), b), 1.0)], 0.0),
            (r"B has shape \(10, 2\), expected \(8, 2\)", x, w, [LoRAPath("plain", (a, torch.randn(n + 2, r)), 1.0)], 0.0),
            (r"B has shape \(8, 3\), expected \(8, 2\)", x, w, [LoRAPath("plain", (a, torch.randn(n, r + 1)), 1.0)], 0.0),
            ("k_offset=5 \\+ K=16 exceeds A's K_max=18", x, w,
             [LoRAPath("slice", (torch.randn(r, k + 2), torch.randn(n, r)), 1.0, 5, 0)], 0.0),
            ("n_offset=-1 is negative", x, w, [LoRAPath("slice", (torch.randn(r, k), torch.randn(n + 2, r)), 1.0, 0, -1)], 0.0),
            ("d=3 must divide K=16 and N=8", x, w,
             [LoRAPath("kron", (torch.randn(r, 3), torch.randn(3, r), torch.randn(1, 5), torch.randn(2, 1)), 1.0)], 0.0),
            ("d=0 must divide K=16 and N=8", x, w,
             [LoRAPath("kron", (torch.randn(r, 0), torch.randn(0, r), torch.randn(1, 5), torch.randn(2, 1)), 1.0)], 0.0),
            (r"needs tensors \('A', 'B'\), got 1", x, w, [LoRAPath("plain", (a,), 1.0)], 0.0),
            (r"path 0 \(plain\): scale must be a finite real number, got '0.5'", x, w,
             [LoRAPath("plain", (a, b), "0.5")], 0.0),
            (r"path 0 \(plain\): scale must be a finite real number, got nan", x, w,
             [LoRAPath("plain", (a, b), float("nan"))], 0.0),
            (r"path 0 \(plain\): scale must be a finite real number, got -inf", x, w,
             [LoRAPath("plain", (a, b), -float("inf"))], 0.0),
            # the kernels read a plain path at its offsets, past its tensors' ends
            (r"path 0 \(plain\): n_offset=2, but only a slice path is read at an offset", x, w,
             [LoRAPath("plain", (a, b), 1.0, 0, 2)], 0.0),
            (r"path 0 \(slice\): k_offset must be an int, got 1.5", x, w,
             [LoRAPath("slice", (torch.randn(r, k + 2), b), 1.0, 1.5, 0)], 0.0),
            (r"path 0 \(slice\): k_offset must be an int, got True", x, w,
             [LoRAPath("slice", (torch.randn(r, k + 2), b), 1.0, True, 0)], 0.0),
            (r"x has K=0 features \(shape \(3, 0\)\)", x[:, :0], w[:, :0], [LoRAPath("plain", (a[:, :0], b), 1.0)], 0.0),
            ("x must be floating point, got torch.int64", x.long(), w, [LoRAPath("plain", (a, b), 1.0)], 0.0),
            (r"dropout_p must be in \[0, 1\), got 1.0", x, w, [LoRAPath("plain", (a, b), 1.0)], 1.0),
            (r"dropout_p must be in \[0, 1\), got -0.1", x, w, [LoRAPath("plain", (a, b), 1.0)], -0.1),
            ("x is on meta but weight is on cpu", x.to("meta"), w, [LoRAPath("plain", (a, b), 1.0)], 0.0),
            ("x is on cpu but path 0 .plain.'s B is on meta", x, w, [LoRAPath("plain", (a, b.to("meta")), 1.0)], 0.0)]


@pytest.mark.parametrize("backend", ["torch", "compose", "triton", "auto"])
def test_every_backend_names_bad_paths_and_options(backend):
    for message, x, w, paths, p in bad_calls():
        with pytest.raises(ValueError, match=message):
            ops.lora_linear(x, w, None, paths, p, True, backend=backend)
        with pytest.raises(ValueError, match="module [01] of the group: .*" + message):
            ops.grouped_lora_linear(x, [w, w], [None, None], [[make_path("plain", 16, 8, 2)], paths], p, True,
                                    backend=backend)


@pytest.mark.parametrize("backend", ["torch", "compose", "triton", "auto"])
def test_grouped_op_refuses_lists_of_different_lengths(backend):
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    path = [make_path("plain", 16, 8, 2)]
    for weights, biases, paths in (([w, w], [b, b], [path]), ([w, w], [b], [path, path]), ([w], [b, b], [path, path])):
        with pytest.raises(ValueError, match="one weight, bias and path list per module"):
            ops.grouped_lora_linear(x, weights, biases, paths, backend=backend)
