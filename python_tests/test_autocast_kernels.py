"""Autocast reaches the fused kernels and compose: under torch.autocast("cpu", torch.bfloat16) the custom
ops run (seen by torch.profiler) on autocast's operands and match the float64 reference within bf16
tolerance, outputs and every gradient; a whole tiny LLaMA trains under autocast on both backends."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

triton = pytest.importorskip("triton")

import sharelora_kernels as sk  # noqa: E402
from sharelora_kernels import ops  # noqa: E402
from test_ops_fused_lora_linear import float64_reference, make_path, rel_err  # noqa: E402
from test_ops_grouped import QKV, float64_group, leaves_of, make_group, mix_paths  # noqa: E402
from test_properties import TOL as GRAD_TOL  # noqa: E402

BF16 = 3e-2
KINDS = ["plain", "slice", "gate", "kron"]


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def ops_run(fn):
    """fn()'s result and the names of the ops torch.profiler saw while it ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


def grad_errors(grads, grads_ref):
    """Each gradient's error, judged against 0.1 x the largest gradient too (test_properties' rule)."""
    scale = max(g.abs().max().item() for g in grads_ref)
    return [(g.double() - r).abs().max().item() / max(r.abs().max().item(), 0.1 * scale)
            for g, r in zip(grads, grads_ref)]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fused_op_runs_under_autocast_and_matches_float64(x_dtype, monkeypatch):
    """An fp32 layer (W, b, adapters) under bf16 autocast, x fp32 or already bf16."""
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    torch.manual_seed(0)
    m, k, n = 33, 48, 40
    x = torch.randn(m, k).to(x_dtype).requires_grad_()
    weight, bias = torch.randn(n, k), torch.randn(n)
    paths = [make_path(kind, k, n, r) for kind, r in zip(KINDS, [3, 2, 2, 4])]
    with autocast():
        y, seen = ops_run(lambda: ops.lora_linear(x, weight, bias, paths))
    assert "FusedLinear" in seen and y.dtype == torch.bfloat16  # the kernels' eager Function (the custom op compiled)
    dy = torch.randn_like(y)
    leaves = [x] + [t for p in paths for t in p.tensors]
    (grads, seen) = ops_run(lambda: torch.autograd.grad(y, leaves, dy))
    assert any("FusedLinearBackward" in name for name in seen), sorted(seen)
    y_ref, grads_ref = float64_reference(x, weight, bias, paths, dy)
    assert rel_err(y, y_ref) < BF16
    assert [g.dtype for g in grads] == [x_dtype] + [torch.float32] * (len(leaves) - 1)
    assert max(grad_errors(grads, grads_ref)) < GRAD_TOL[torch.bfloat16]


def test_grouped_op_runs_under_autocast_and_matches_float64(monkeypatch):
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    x, weights, biases, _ = make_group(QKV, "plain")
    paths = mix_paths(QKV)
    with autocast():
        ys, seen = ops_run(lambda: ops.grouped_lora_linear(x, weights, biases, paths))
    assert "GroupedEager" in seen and all(y.dtype == torch.bfloat16 for y in ys)
    dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, leaves_of(x, paths), dys)
    ys_ref, grads_ref = float64_group(x, weights, biases, paths, dys)
    assert all(rel_err(y, r) < BF16 for y, r in zip(ys, ys_ref))
    assert all(g.dtype == torch.float32 for g in grads) and max(grad_errors(grads, grads_ref)) < GRAD_TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", ["compose", "triton"])
def test_no_float32_copy_of_x_is_saved_under_autocast(backend, monkeypatch):
    """bf16 activations into an fp32 layer under autocast: the (M, K)-sized tensors saved for
    backward are x itself (no converted copy); the torch backend's reference keeps an fp32 copy."""
    torch.manual_seed(1)
    m, k, n = 32, 48, 40
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    weight, paths = torch.randn(n, k), [make_path("plain", k, n, 3), make_path("kron", k, n, 2)]

    def saved_big(name):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), autocast():
            ops.lora_linear(x, weight, None, paths, backend=name)
        return [t for t in saved if t.numel() == m * k]

    assert [t.dtype for t in saved_big("torch")].count(torch.float32) >= 1
    big = saved_big(backend)
    assert big and all(t.dtype == torch.bfloat16 and t.data_ptr() == x.data_ptr() for t in big)


@pytest.mark.parametrize("backend", ["compose", "triton"])
def test_tiny_llama_trains_under_autocast(backend, monkeypatch):
    """A model-level step under CPU autocast: loss as the fp32 run's, fp32 adapter grads pointing the
    same way; the backend's op runs for every target module."""
    from tiny_models import METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_model, token_batch

    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    config = sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_kron"])
    model = sk.apply(tiny_model("llama", layers=2), config)
    randomize_adapters(model, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = token_batch()
    loss32 = model(input_ids=ids, labels=ids).loss
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss32, params)])
    calls = []
    owner, attr = (ops, "_fused_lora_linear") if backend == "triton" else (ops.compose, "lora_linear")
    real = getattr(owner, attr)
    monkeypatch.setattr(owner, attr, lambda *a: calls.append(1) or real(*a))
    with autocast():
        loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    assert len(calls) == 2 * len(TARGETS)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert abs(loss.item() - loss32.item()) < 1e-2
    assert torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]), ref, dim=0) > 0.95
