"""The reference math against the dense definitions of the README's "The methods", in float64."""
import pytest
import torch
import torch.nn.functional as F

from sharelora_kernels.reference import LoRAPath, delta_weight, lora_linear, path_factors

M, K, N = 7, 24, 40


def rnd(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def make_path(kind):
    if kind == "plain":
        return LoRAPath("plain", (rnd(3, K), rnd(N, 3)), 0.7)
    if kind == "slice":  # shared tensors larger than the module, read at an offset
        return LoRAPath("slice", (rnd(5, K + 9), rnd(N + 4, 5)), 1.3, k_offset=4, n_offset=3)
    if kind == "gate":
        r, g, m, n = 3, 2, 6, 5
        return LoRAPath("gate", (rnd(r, m), rnd(n, r), rnd(g, K), rnd(m, g), rnd(g, n), rnd(N, g)), 0.5)
    if kind == "kron":
        r, d = 3, 8
        return LoRAPath("kron", (rnd(r, d), rnd(d, r), rnd(1, K // d), rnd(N // d, 1)), 2.0)
    raise AssertionError(kind)


def dense_factors(p):
    """A (r, K) and B (N, r) built literally from the formulas of the README's "The methods"."""
    t = p.tensors
    if p.kind == "plain":
        return t[0], t[1]
    if p.kind == "slice":
        return t[0][:, p.k_offset:p.k_offset + K], t[1][p.n_offset:p.n_offset + N]
    if p.kind == "gate":  # dW = G_ou G_od B A G_iu G_id
        a, b, g_id, g_iu, g_od, g_ou = t
        return g_od @ b @ a @ g_iu @ g_id, g_ou
    a, b, k_a, k_b = t
    d = a.shape[1]
    big_a = torch.zeros(a.shape[0], K, dtype=a.dtype)
    for j in range(K // d):
        big_a[:, j * d:(j + 1) * d] = k_a[0, j] * a
    big_b = torch.zeros(N, b.shape[1], dtype=b.dtype)
    for i in range(N // d):
        big_b[i * d:(i + 1) * d] = k_b[i, 0] * b
    return big_a, big_b


KINDS = ["plain", "slice", "gate", "kron"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_path_matches_dense_formula(kind):
    p = make_path(kind)
    x, w, bias = rnd(M, K), rnd(N, K), rnd(N)
    a, b = dense_factors(p)
    expected = x @ w.T + bias + p.scale * (x @ a.T) @ b.T
    torch.testing.assert_close(lora_linear(x, w, bias, [p]), expected, rtol=1e-12, atol=1e-12)
    fa, fb = path_factors(p, K, N)
    torch.testing.assert_close(fb @ fa, b @ a, rtol=1e-12, atol=1e-12)


def test_sum_of_paths_and_leading_dims():
    paths = [make_path(k) for k in KINDS]
    x, w = rnd(2, 3, M, K), rnd(N, K)
    expected = x @ w.T + x @ delta_weight(paths, K, N).T
    out = lora_linear(x, w, None, paths)
    assert out.shape == (2, 3, M, N)
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_dense_formula(kind):
    p = make_path(kind)
    leaves = [t.clone().requires_grad_() for t in p.tensors]
    x = rnd(M, K).requires_grad_()
    w = rnd(N, K)
    dy = rnd(M, N)
    out = lora_linear(x, w, None, [p._replace(tensors=tuple(leaves))])
    grads = torch.autograd.grad(out, [x, *leaves], dy)
    leaves2 = [t.clone().requires_grad_() for t in p.tensors]
    x2 = x.detach().clone().requires_grad_()
    a, b = dense_factors(p._replace(tensors=tuple(leaves2)))
    out2 = x2 @ w.T + p.scale * (x2 @ a.T) @ b.T
    grads2 = torch.autograd.grad(out2, [x2, *leaves2], dy)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-10)


def test_stacked_plain_and_slice_paths_gradients():
    """Plain + two slice windows of one shared pair + a Kronecker path: the plain/slice paths run as
    one stacked LoRA; every gradient (x and each shared tensor, summed over its windows) still
    matches the per-path dense formula."""
    a_s, b_s = rnd(5, K + 9), rnd(N + 4, 5)
    paths = [make_path("plain"), LoRAPath("slice", (a_s, b_s), 1.3, 4, 3), LoRAPath("slice", (a_s, b_s), -0.4, 9, 0),
             make_path("kron")]
    x0, w, dy = rnd(M, K), rnd(N, K), rnd(M, N)
    leaves = {id(t): t.clone().requires_grad_() for q in paths for t in q.tensors}
    results = []
    for stacked in (True, False):
        x = x0.clone().requires_grad_()
        ps = [q._replace(tensors=tuple(leaves[id(t)] for t in q.tensors)) for q in paths]
        if stacked:
            out = lora_linear(x, w, None, ps)
        else:
            out = x @ w.T + sum(q.scale * (x @ dense_factors(q)[0].T) @ dense_factors(q)[1].T for q in ps)
        results.append(torch.autograd.grad(out, [x, *leaves.values()], dy))
    for g, g2 in zip(*results):
        torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-10)


def test_dropout_applies_to_adapter_input_only():
    p = make_path("plain")
    x, w = rnd(M, K), rnd(N, K)
    torch.manual_seed(3)
    out = lora_linear(x, w, None, [p], dropout_p=0.5, training=True)
    torch.manual_seed(3)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    a, b = dense_factors(p)
    torch.testing.assert_close(out, x @ w.T + p.scale * (xd @ a.T) @ b.T)
    assert not torch.allclose(out, lora_linear(x, w, None, [p]))
    torch.testing.assert_close(lora_linear(x, w, None, [p], dropout_p=0.5, training=False), lora_linear(x, w, None, [p]))


@pytest.mark.parametrize("case", ["dropped_input", "trainable_base", "half_base"])
def test_hand_written_backward_matches_autograd(case):
    """The plain/slice part's own backward (lora_linear) against autograd over the plain formula:
    with a separate adapter input (dropout), with W and bias requiring grad, and with a bfloat16
    base under float32 adapters (dx comes back in bfloat16, adapter grads in float32)."""
    base_dtype = torch.bfloat16 if case == "half_base" else torch.float64
    adapter_dtype = torch.float32 if case == "half_base" else torch.float64
    x = torch.randn(M, K, dtype=base_dtype, requires_grad=True)
    w = torch.randn(N, K, dtype=base_dtype, requires_grad=case == "trainable_base")
    bias = torch.randn(N, dtype=base_dtype, requires_grad=case == "trainable_base")
    a, b = torch.randn(3, K, dtype=adapter_dtype), torch.randn(N, 3, dtype=adapter_dtype)
    a.requires_grad_(), b.requires_grad_()
    mask = (torch.rand(M, K) > 0.3).to(base_dtype) / 0.7 if case == "dropped_input" else None
    dy = torch.randn(M, N, dtype=base_dtype)
    leaves = [t for t in (x, w, bias, a, b) if t.requires_grad]

    xd = x * mask if mask is not None else None
    out = lora_linear(x, w, bias, [LoRAPath("plain", (a, b), 0.7)], x_dropped=xd)
    grads = torch.autograd.grad(out, leaves, dy)
    xd = x * mask if mask is not None else x
    expected = F.linear(x, w, bias) + (0.7 * (xd.to(adapter_dtype) @ a.T) @ b.T).to(base_dtype)
    grads2 = torch.autograd.grad(expected, leaves, dy)
    assert out.dtype == base_dtype
    tol = 2e-2 if case == "half_base" else 1e-10
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    for g, g2, leaf in zip(grads, grads2, leaves):
        assert g.dtype == leaf.dtype
        torch.testing.assert_close(g, g2, rtol=tol, atol=tol * g2.abs().max().item())
