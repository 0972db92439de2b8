"""Property tests: random shapes, ranks, dtypes, layouts and path mixes against the float64 reference.

Both backends of ``ops.lora_linear``: the torch path, and the Triton kernels through the
interpreter (conftest.py). Outputs and every gradient must match the float64 reference within the
dtype's tolerance. Example counts are bounded for CI time.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharelora_kernels import ops, reference
from sharelora_kernels.reference import LoRAPath

TOL = {torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float16: 8e-3}
D = 4  # Kronecker block: K and N are drawn as multiples of it


def build_path(kind: str, k: int, n: int, r: int, dtype, g: torch.Generator) -> LoRAPath:
    def t(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype).requires_grad_()

    if kind == "plain":
        return LoRAPath("plain", (t(r, k), t(n, r)), 0.5)
    if kind == "slice":
        ek, en = int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(0, 5, (1,), generator=g))
        return LoRAPath("slice", (t(r, k + ek), t(n + en, r)), 0.3, ek // 2, en)
    if kind == "gate":
        return LoRAPath("gate", (t(r, 6), t(5, r), t(2, k), t(6, 2), t(2, 5), t(n, 2)), 0.7)
    return LoRAPath("kron", (t(r, D), t(D, r), t(1, k // D), t(n // D, 1)), 0.4)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


cases = st.fixed_dictionaries({
    "m": st.sampled_from([0, 1, 2, 5, 17]),
    "k": st.integers(1, 9).map(lambda i: D * i),
    "n": st.integers(1, 9).map(lambda i: D * i),
    "kinds": st.lists(st.sampled_from(["plain", "slice", "gate", "kron"]), min_size=1, max_size=3),
    "ranks": st.lists(st.integers(1, 9), min_size=3, max_size=3),
    "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    "bias": st.booleans(),
    "transposed_x": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def check(case, backend: str, monkeypatch) -> None:
    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    g = torch.Generator(torch.get_default_device()).manual_seed(case["seed"])
    m, k, n, dtype = case["m"], case["k"], case["n"], case["dtype"]
    x = torch.randn(k, m, generator=g).t() if case["transposed_x"] else torch.randn(m, k, generator=g)
    x = x.to(dtype).requires_grad_()
    weight = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if case["bias"] else None
    paths = [build_path(kind, k, n, r, dtype, g) for kind, r in zip(case["kinds"], case["ranks"])]
    y = ops.lora_linear(x, weight, bias, paths)
    leaves = [x] + [t for p in paths for t in p.tensors]
    dy = torch.randn(y.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)

    d = lambda t: t.detach().double().requires_grad_()
    x64, p64 = d(x), [p._replace(tensors=tuple(d(t) for t in p.tensors)) for p in paths]
    y64 = reference.lora_linear(x64, weight.double(), None if bias is None else bias.double(), p64)
    leaves64 = [x64] + [t for p in p64 for t in p.tensors]
    grads64 = torch.autograd.grad(y64, leaves64, dy.double(), allow_unused=True)
    assert y.shape == (m, n) and y.dtype == dtype
    if m == 0:
        return
    assert rel_err(y, y64) < TOL[dtype]
    # A small gradient tensor can be a sum that cancels (e.g. a Kronecker kernel's): its error is
    # judged against the case's largest gradient too, not only its own magnitude.
    scale = max(g.abs().max().item() for g in grads64)
    for i, (gr, g64) in enumerate(zip(grads, grads64)):
        assert gr is not None and gr.dtype == leaves[i].dtype, f"gradient {i}"
        err = (gr.double() - g64).abs().max().item() / max(g64.abs().max().item(), 0.1 * scale, 1e-6)
        assert err < TOL[dtype] * 2, f"gradient {i} of {case['kinds']}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_torch_path_matches_float64_reference(case, monkeypatch):
    check(case, "torch", monkeypatch)


@pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_triton_kernels_match_float64_reference(case, monkeypatch):
    check(case, "triton", monkeypatch)
