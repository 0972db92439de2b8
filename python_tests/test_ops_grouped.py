"""Grouped LoRA linear (q/k/v, gate/up sharing x), shared-gradient accumulation and input groups.

Triton kernels run through TRITON_INTERPRET=1 (conftest.py); everything is checked against the
per-module float64 reference with random non-zero adapters.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

import sharelora_kernels as sk  # noqa: E402
from sharelora_kernels import grouping, ops, reference  # noqa: E402
from sharelora_kernels.ops import shared_grad  # noqa: E402
from sharelora_kernels.ops.grouped_lora_linear import decode, encode, grouped_lora_linear  # noqa: E402
from sharelora_kernels.ops.tables import path_rank  # noqa: E402
from sharelora_kernels.reference import LoRAPath  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")
K, QKV, GATE_UP = 48, (48, 16, 16), (40, 40)  # GQA: k, v are 16 wide
D = 8  # Kronecker block


def rand(*shape):
    return (torch.randn(*shape) * 0.5).requires_grad_()


def group_paths(kind: str, ns: tuple[int, ...], k: int = K) -> list[list[LoRAPath]]:
    """Paths of a group of modules (outputs ``ns``) where ``kind`` uses tensors shared by the group."""
    n_max = max(ns)
    if kind == "plain":  # share_a style: one A, own B
        a = rand(3, k)
        return [[LoRAPath("plain", (a, rand(n, 3)), 0.5)] for n in ns]
    if kind == "slice":  # Bi-Share intra: one (A_s, B_s), centred windows of B_s
        a, b = rand(4, k + 6), rand(n_max + 4, 4)
        return [[LoRAPath("slice", (a, b), 0.25, 3, (n_max + 4 - n) // 2)] for n in ns]
    if kind == "gate":  # shared core, own gates
        a, b = rand(3, 12), rand(10, 3)
        return [[LoRAPath("gate", (a, b, rand(2, k), rand(12, 2), rand(2, 10), rand(n, 2)), 0.75)] for n in ns]
    # kron: shared A_s, B_s and K_A (so one h for the group), own K_B
    a, b, k_a = rand(2, D), rand(D, 2), rand(1, k // D)
    return [[LoRAPath("kron", (a, b, k_a, rand(n // D, 1)), 0.4)] for n in ns]


def mix_paths(ns: tuple[int, ...], k: int = K) -> list[list[LoRAPath]]:
    """Every kind in every module, each kind's tensors shared as in ``group_paths``."""
    parts = [group_paths(kind, ns, k) for kind in ("plain", "slice", "gate", "kron")]
    return [[p for part in parts for p in part[g]] for g in range(len(ns))]


def paths_for(kind, ns, k=K):
    return mix_paths(ns, k) if kind == "mix" else group_paths(kind, ns, k)


def leaves_of(x, paths):
    return [x] + list({id(t): t for ps in paths for p in ps for t in p.tensors}.values())


def rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def float64_group(x, weights, biases, paths, dys):
    """Outputs and gradients (x, then every distinct adapter tensor) of the separate reference modules."""
    leaves = leaves_of(x, paths)
    d = {id(t): t.detach().double().requires_grad_() for t in leaves}
    ys = [reference.lora_linear(d[id(x)], w.double(), None if b is None else b.double(),
                                [p._replace(tensors=tuple(d[id(t)] for t in p.tensors)) for p in ps])
          for w, b, ps in zip(weights, biases, paths)]
    grads = torch.autograd.grad(ys, [d[id(t)] for t in leaves], [dy.double() for dy in dys])
    return [y.detach() for y in ys], grads


def make_group(ns, kind, m=9, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    x = (torch.randn(m, K, dtype=dtype)).requires_grad_()
    weights = [torch.randn(n, K, dtype=dtype) for n in ns]
    biases = [torch.randn(n, dtype=dtype) if i != 1 else None for i, n in enumerate(ns)]
    return x, weights, biases, paths_for(kind, ns)


def check_group(ns, kind, dtype=torch.float32, tol=1e-4):
    x, weights, biases, paths = make_group(ns, kind, dtype=dtype)
    ys = grouped_lora_linear(x, weights, biases, paths)
    dys = [torch.randn_like(y) for y in ys]
    leaves = leaves_of(x, paths)
    grads = torch.autograd.grad(ys, leaves, dys)
    ys_ref, grads_ref = float64_group(x, weights, biases, paths, dys)
    for y, r in zip(ys, ys_ref):
        assert y.dtype == dtype and rel_err(y, r) < tol
    for i, (g, r, leaf) in enumerate(zip(grads, grads_ref, leaves)):
        assert g.dtype == leaf.dtype and g.shape == r.shape
        assert rel_err(g, r) < tol, f"gradient {i} ({kind})"


# ---------------------------------------------------------------------------------- grouped op
@pytest.mark.parametrize("kind", ["plain", "slice", "gate", "kron", "mix"])
def test_qkv_gqa_matches_separate_modules(kind):
    check_group(QKV, kind)


def test_gate_up_mix_matches_separate_modules():
    check_group(GATE_UP, "mix")


def test_group_larger_than_one_launch():
    """5 modules > MAX_MODULES pointers per launch: the forward runs two launches, dx two chunks of
    segments (the second adding onto the first)."""
    from sharelora_kernels.ops.grouped_lora_linear import MAX_MODULES

    ns = (16, 24, 16, 8, 16)
    assert len(ns) > MAX_MODULES
    check_group(ns, "mix")


def test_autotuning_a_group_of_five_leaves_no_trial_run_in_the_outputs():
    """Two configs benchmarked on a group of 5 (dx runs two chunks, the second adding onto dx): each
    trial run is undone (restore_value), so only the chosen config's run stays in dx."""
    from sharelora_kernels.ops.autotune import INTERPRETER_GEMM, mode
    from sharelora_kernels.ops.grouped_lora_linear import grouped_kernel

    other = triton.Config({**INTERPRETER_GEMM.kwargs, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    with grouped_kernel.restricted(lambda configs: [INTERPRETER_GEMM, other]):
        check_group((16, 24, 16, 8, 16), "plain")
        timings = grouped_kernel._tuners[mode()].configs_timings
    assert len(timings) == 2  # both configs were benchmarked


def test_forced_int64_weight_offsets(monkeypatch):
    """A W of 2**31+ elements indexes in int64 (too large to allocate here: the choice is forced)."""
    import importlib

    grouped = importlib.import_module("sharelora_kernels.ops.grouped_lora_linear")  # the module, not ops' function
    monkeypatch.setattr(grouped, "needs_int64_index", lambda *tensors: True)
    check_group((16, 24, 16, 8, 16), "mix")


def test_two_paths_of_one_module_reading_one_view():
    """A module whose two paths read the same A (same view, so the same columns of h) gets the sum
    of both paths' dh in dx and dA, not one of them."""
    torch.manual_seed(5)
    x, a = rand(7, K), rand(3, K)
    weights, biases = [torch.randn(n, K) for n in QKV[:2]], [None, torch.randn(QKV[1])]
    paths = [[LoRAPath("plain", (a, rand(QKV[0], 3)), 0.5), LoRAPath("plain", (a, rand(QKV[0], 3)), 0.25)],
             [LoRAPath("plain", (a, rand(QKV[1], 3)), 0.75)]]
    ys = grouped_lora_linear(x, weights, biases, paths)
    dys = [torch.randn_like(y) for y in ys]
    leaves = leaves_of(x, paths)
    ys_ref, grads_ref = float64_group(x, weights, biases, paths, dys)
    assert all(rel_err(y, r) < 1e-5 for y, r in zip(ys, ys_ref))
    for g, r in zip(torch.autograd.grad(ys, leaves, dys), grads_ref):
        assert rel_err(g, r) < 1e-5


def test_half_base_float32_adapters():
    x, weights, biases, paths = make_group(QKV, "mix", dtype=torch.bfloat16)
    ys = grouped_lora_linear(x, weights, biases, paths)
    ys_ref, _ = float64_group(x, weights, biases, paths, [torch.zeros_like(y) for y in ys])
    assert all(y.dtype == torch.bfloat16 and rel_err(y, r) < 3e-2 for y, r in zip(ys, ys_ref))


def test_shared_views_computed_once():
    """q, k, v reading the same shared A through the same view share their columns of h."""
    paths = mix_paths(QKV)
    tensors, layout, scales = encode(paths)
    grp = decode(tensors, layout, scales, 3)
    # per module: plain (shared A) 3 + slice 4 + gate 2 (own G_id) + kron 2; shared views: plain, slice, kron
    assert sum(path_rank(v) for v in grp.views) == 3 + 4 + 3 * 2 + 2
    assert len(tensors) == len({id(t) for ps in paths for p in ps for t in p.tensors})


def test_dropout_gradients_match_the_reference_with_the_ops_mask():
    """Grouped forward and backward with dropout on: every output and gradient equals the separate
    float64 modules run on x times the op's own stored mask (so dx and dA applied those bits)."""
    from test_ops_fused_lora_linear import unpack_mask

    x, weights, biases, paths = make_group(QKV, "mix")
    tensors, layout, scales = encode(paths)
    p = 0.3
    outs = torch.ops.sharelora.grouped_lora_linear(x, weights, biases, tensors, layout, scales, p, torch.tensor([9]))
    ys, words = outs[:-2], outs[-1]
    keep = unpack_mask(words, K)
    assert 0.5 < keep.float().mean() < 0.9
    dys = [torch.randn_like(y) for y in ys]
    leaves = leaves_of(x, paths)
    grads = torch.autograd.grad(ys, leaves, dys)
    d = {id(t): t.detach().double().requires_grad_() for t in leaves}
    x64 = d[id(x)]
    ys_ref = [reference.lora_linear(x64, w.double(), None if b is None else b.double(),
                                    [q._replace(tensors=tuple(d[id(t)] for t in q.tensors)) for q in ps],
                                    x_dropped=x64 * keep / (1 - p)) for w, b, ps in zip(weights, biases, paths)]
    grads_ref = torch.autograd.grad(ys_ref, [d[id(t)] for t in leaves], [dy.double() for dy in dys])
    for y, r in zip(ys, ys_ref):
        assert rel_err(y, r.detach()) < 1e-4
    for i, (g, r) in enumerate(zip(grads, grads_ref)):
        assert rel_err(g, r) < 1e-4, f"gradient {i}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_dropout_mask_for_the_group(backend, monkeypatch):
    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    x, weights, biases, _ = make_group(GATE_UP, "plain")
    eye = torch.eye(K)
    paths = [[LoRAPath("plain", (eye, torch.eye(n, K)), 1.0)] for n in GATE_UP]  # y - base = dropout(x)[:, :n]
    torch.manual_seed(3)
    ys = ops.grouped_lora_linear(x, weights, biases, paths, dropout_p=0.5, training=True)
    lows = [y - torch.nn.functional.linear(x, w, b) for y, w, b in zip(ys, weights, biases)]
    assert torch.allclose(lows[0], lows[1], atol=1e-5)  # one mask for the group
    assert 0.3 < (lows[0].abs() < 1e-5).float().mean() < 0.7
    ys_eval = ops.grouped_lora_linear(x, weights, biases, paths)
    for y, w, b, ps in zip(ys_eval, weights, biases, paths):
        assert torch.allclose(y, reference.lora_linear(x, w, b, ps), atol=1e-5)


@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck_custom_ops(contiguous):
    """Schema, fake impls, autograd registration and AOT tracing of the grouped forward op and of the
    backward op (which adds into its fp32 buffers), with contiguous and transposed x / W / dy."""
    torch.manual_seed(3)
    m, ns = 7, QKV

    def mat(rows, cols, grad=False):
        t = torch.randn(rows, cols) if contiguous else torch.randn(cols, rows).t()
        return t.requires_grad_(grad)

    x, seed = mat(m, K, grad=True), torch.tensor([5])
    weights, biases = [mat(n, K) for n in ns], [torch.randn(n) for n in ns]
    tensors, layout, scales = encode(mix_paths(ns))
    torch.library.opcheck(torch.ops.sharelora.grouped_lora_linear.default,
                          (x, weights, biases, tensors, layout, scales, 0.1, seed))
    r = sum(path_rank(v) for v in decode(tensors, layout, scales, len(ns)).views)
    bufs = [torch.zeros(t.shape) for t in tensors]
    mask = torch.randint(-2**31, 2**31 - 1, (m, 2), dtype=torch.int32)  # bit-packed: ceil(48 / 32) words per row
    torch.library.opcheck(torch.ops.sharelora.grouped_lora_linear_backward.default,
                          ([mat(m, n) for n in ns], x.detach(), weights, torch.randn(m, r), mask,
                           [t.detach() for t in tensors], layout, scales, 0.1, True, bufs, False))


@pytest.mark.parametrize("used", [(0,), (0, 2)])
def test_unused_outputs_leave_what_only_they_read_without_gradient(used):
    """Outputs of the group that take no part in the loss: the tensors only their modules read get
    no gradient (None, as separate modules leave them, not zeros an optimizer would act on); x and
    every other tensor get exactly the used modules' gradients."""
    x, weights, biases, paths = make_group(QKV, "mix")
    ys = grouped_lora_linear(x, weights, biases, paths)
    dys = [torch.randn_like(ys[g]) for g in used]
    torch.autograd.backward([ys[g] for g in used], dys)
    used_paths = [paths[g] for g in used]
    _, grads_ref = float64_group(x, [weights[g] for g in used], [biases[g] for g in used], used_paths, dys)
    ref = {id(t): g for t, g in zip(leaves_of(x, used_paths), grads_ref)}
    unused = [t for t in leaves_of(x, paths) if id(t) not in ref]
    assert unused and all(t.grad is None for t in unused)
    for t in leaves_of(x, used_paths):
        assert rel_err(t.grad, ref[id(t)]) < 1e-4


def test_bad_inputs_raise_clear_errors():
    x, weights, biases, paths = make_group(GATE_UP, "plain")
    with pytest.raises(ValueError, match="one weight, bias and path list per module"):
        grouped_lora_linear(x, weights, biases[:1], paths)
    with pytest.raises(ValueError, match="module 1 of the group: x has K=48 features"):
        grouped_lora_linear(x, [weights[0], torch.randn(40, 32)], biases, paths)
    with pytest.raises(ValueError, match="module 0 of the group has no low-rank path"):
        grouped_lora_linear(x, weights, biases, [[], paths[1]])


# ---------------------------------------------------------------------------------- shared gradients
def layers_sharing(num_layers: int, seed: int = 0):
    """``num_layers`` q/k/v groups, every layer using one shared slice (A_s, B_s) plus its own plain path."""
    torch.manual_seed(seed)
    shared = group_paths("slice", QKV)
    layers = []
    for _ in range(num_layers):
        own = group_paths("plain", QKV)
        layers.append(([torch.randn(n, K) for n in QKV], [s + o for s, o in zip(shared, own)]))
    return shared[0][0].tensors, layers


def run_layers(layers, x, atomic=None):
    """Sum over layers of the grouped outputs' loss; returns the gradients of the shared tensors."""
    loss = 0
    for weights, paths in layers:
        ys = grouped_lora_linear(x, weights, [None] * 3, paths)
        loss = loss + sum((y * torch.linspace(-1, 1, y.shape[1])).sum() for y in ys)
    loss.backward()
    return loss


def test_shared_tensor_gets_exact_sum_over_layers_and_microbatches():
    (a_s, b_s), layers = layers_sharing(3)
    x = torch.randn(5, K)
    run_layers(layers, x)
    ref_grads = [torch.zeros(t.shape, dtype=torch.float64) for t in (a_s, b_s)]
    for weights, paths in layers:
        ys, grads = float64_group(x, weights, [None] * 3, paths,
                                  [torch.linspace(-1, 1, n).expand(5, n) for n in QKV])
        leaves = leaves_of(x, paths)
        for i, t in enumerate((a_s, b_s)):
            ref_grads[i] += grads[next(j for j, leaf in enumerate(leaves) if leaf is t)]
    first = [a_s.grad.clone(), b_s.grad.clone()]
    for g, r in zip(first, ref_grads):
        assert rel_err(g, r) < 1e-4
    run_layers(layers, x)  # a second micro-batch accumulates into .grad
    assert all(torch.allclose(t.grad, 2 * g, rtol=1e-6) for t, g in zip((a_s, b_s), first))
    a_s.grad, b_s.grad = None, None  # zero_grad(set_to_none=True)
    run_layers(layers, x)
    assert all(torch.equal(t.grad, g) for t, g in zip((a_s, b_s), first))


def test_default_mode_is_bitwise_deterministic_and_atomic_mode_agrees(monkeypatch):
    (a_s, b_s), layers = layers_sharing(3, seed=1)
    params = [t for _, paths in layers for ps in paths for p in ps for t in p.tensors]
    x = torch.randn(40, K)
    runs = []
    for atomic in ("0", "0", "1"):
        monkeypatch.setenv(shared_grad.ATOMIC_ENV, atomic)
        for p in params:
            p.grad = None
        run_layers(layers, x)
        runs.append([a_s.grad.clone(), b_s.grad.clone()])
    assert all(torch.equal(g0, g1) for g0, g1 in zip(runs[0], runs[1]))
    assert all(torch.allclose(g0, g2, rtol=1e-5, atol=1e-5) for g0, g2 in zip(runs[0], runs[2]))


class PeakLiveCounter(TorchDispatchMode):
    """Peak number of simultaneously alive tensors of the given shapes made by ops (not in-place results)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.live, self.peak = set(shapes), 0, 0

    def _released(self):
        self.live -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and tuple(o.shape) in self.shapes and not any(o is a for a in args):
                self.live += 1
                self.peak = max(self.peak, self.live)
                weakref.finalize(o, self._released)
        return out


@pytest.mark.parametrize("grouped", [True, False])
def test_shared_gradient_memory_does_not_grow_with_users(grouped, monkeypatch):
    """Peak live full-size tensors of the shared (A_s, B_s)'s shapes during backward: the same for 2 or
    5 layers sharing them (each call's buffer is summed into the gradient and freed as it arrives)."""
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    peaks = []
    for num_layers in (2, 5):
        (a_s, b_s), layers = layers_sharing(num_layers)
        x = torch.randn(4, K)
        loss = 0
        for weights, paths in layers:
            if grouped:
                ys = grouped_lora_linear(x, weights, [None] * 3, paths)
            else:
                ys = [ops.lora_linear(x, w, None, ps) for w, ps in zip(weights, paths)]
            loss = loss + sum(y.sum() for y in ys)
        with PeakLiveCounter({tuple(a_s.shape), tuple(b_s.shape)}) as counter:
            loss.backward()
        peaks.append(counter.peak)
    assert peaks[0] == peaks[1] <= 6


def test_other_uses_of_a_shared_tensor_add_up(monkeypatch):
    """A penalty on the shared tensors computed after the forward: autograd sums it with every call's
    complete buffer (a buffer shared across calls and filled in place would lose contributions)."""
    (a_s, b_s), layers = layers_sharing(3, seed=2)
    x = torch.randn(6, K)
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SHARELORA_BACKEND", backend)
        a_s.grad = b_s.grad = None
        loss = sum(y.pow(2).sum() for w, ps in layers for y in grouped_lora_linear(x, w, [None] * 3, ps))
        (loss + a_s.pow(2).sum() + b_s.pow(2).sum()).backward()
        grads[backend] = (a_s.grad.clone(), b_s.grad.clone())
    for g, r in zip(grads["triton"], grads["torch"]):
        assert rel_err(g, r) < 1e-4


# ---------------------------------------------------------------------------------- model integration
def grouped_model(name="bishare_slice"):
    from tiny_models import METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_model

    targets = TARGETS + ["gate_proj"]
    model = sk.apply(tiny_model("mistral", layers=2), sk.ShareLoRAConfig(target_modules=targets, **METHOD_CONFIGS[name]))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("backend,name", [("torch", "bishare_slice"), ("triton", "bishare_slice"),
                                          ("triton", "bishare_kron")])
def test_input_groups_on_tiny_llama_same_logits_and_gradients(backend, name, monkeypatch):
    from tiny_models import logits_and_grads, token_batch

    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    model = grouped_model(name)
    ids = token_batch()

    def run():
        return logits_and_grads(model, ids)

    ref, ref_grads = run()
    calls = []
    real = grouping.InputGroup._run  # the group's op (its call plan: the grouped kernels or the router)
    monkeypatch.setattr(grouping.InputGroup, "_run", lambda *a: calls.append(1) or real(*a))
    assert grouping.enable_input_groups(model) == 4  # 2 layers x (q/k/v, gate/up)
    out, grads = run()
    assert len(calls) == 4
    plans = {m.input_group._plan.backend for m in sk.model.shared_layers(model) if m.input_group is not None}
    assert plans == {"triton" if backend == "triton" else "router"}
    assert rel_err(out, ref.double()) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r.double()) < 1e-5
    assert all(not m.input_group._pending for m in sk.model.shared_layers(model) if m.input_group is not None)
    grouping.disable_input_groups(model)
    assert torch.equal(model(ids).logits.detach(), ref)


@pytest.mark.parametrize("name", ["bishare_slice", "bishare_gate", "bishare_kron"])
def test_compose_input_groups_with_dropout_run_their_plan(name, monkeypatch):
    """On compose with dropout in training, a group draws one mask and runs each member's planned
    compose call on it: logits and every gradient equal the router's group op on the same draw."""
    from sharelora_kernels.ops import call_plan
    from tiny_models import METHOD_CONFIGS, TARGETS, logits_and_grads, randomize_adapters, tiny_model, token_batch

    monkeypatch.setenv("SHARELORA_BACKEND", "compose")
    config = sk.ShareLoRAConfig(target_modules=TARGETS + ["gate_proj"], dropout=0.25, **METHOD_CONFIGS[name])
    model = sk.apply(tiny_model("mistral", layers=2), config, group_inputs=True).train()
    randomize_adapters(model)
    ids = token_batch()
    groups = {id(m.input_group): m.input_group for m in sk.model.shared_layers(model) if m.input_group is not None}

    def run():
        torch.manual_seed(11)
        return logits_and_grads(model, ids)

    out, grads = run()
    assert len(groups) == 4 and {g._plan.backend for g in groups.values()} == {"compose"}
    monkeypatch.setattr(call_plan, "build_compose_group", lambda *a: None)  # the router's group op
    for group in groups.values():
        group.clear()
    ref, ref_grads = run()
    assert {g._plan.backend for g in groups.values()} == {"router"}
    assert rel_err(out, ref.double()) < 1e-4  # float32 sums in another order; another mask errs by O(1)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r.double()) < 1e-4


@pytest.mark.parametrize("backend", ["compose", "triton"])
def test_group_plans_are_kept_per_environment_and_run_under_autocast(backend, monkeypatch):
    """A group keeps a plan per environment, as a layer does: reentrant checkpointing (a no-grad
    forward, then the recompute with grad) and evaluation between training steps build nothing after
    one round. A bf16 model under bf16 autocast (Trainer's bf16=True) runs the group's plan, not the
    router, and its logits match the router's group op on the same dropout draws; so does a float32
    x (norms kept in float32), cast as autocast casts it."""
    from tiny_models import METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_model, token_batch

    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    config = sk.ShareLoRAConfig(target_modules=TARGETS + ["gate_proj"], dropout=0.25, **METHOD_CONFIGS["bishare_slice"])
    model = sk.apply(tiny_model("llama", layers=1).to(torch.bfloat16), config).train()  # float32 adapters
    randomize_adapters(model)
    ids = token_batch()

    def step():
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                model(ids)
            logits = model(ids).logits
        grads = torch.autograd.grad(logits.float().pow(2).mean(), [p for p in model.parameters() if p.requires_grad])
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids)
        model.train()
        return logits.detach(), grads

    assert grouping.enable_input_groups(model) == 2
    groups = {id(m.input_group): m.input_group for m in sk.model.shared_layers(model) if m.input_group is not None}
    with monkeypatch.context() as m:
        m.setattr(grouping.InputGroup, "_planned", staticmethod(lambda x, args: (None, "router")))
        ref, _ = step()  # the router's group op, on the same draws
    assert {p.backend for g in groups.values() for p in g._plans.values() if p.backend != "alone"} == {"router"}
    for group in groups.values():
        group.clear()
    builds = []
    build = grouping.InputGroup._build
    monkeypatch.setattr(grouping.InputGroup, "_build", lambda *a: builds.append(1) or build(*a))
    step()
    first = len(builds)
    out, grads = step()
    assert first > 0 and len(builds) == first
    assert {p.backend for g in groups.values() for p in g._plans.values() if p.backend != "alone"} == {backend}
    assert rel_err(out, ref.double()) < 5e-2  # bf16 roundings in another order (each ~2e-2 from float32)
    # a bf16 model's gradients differ by up to ~40% between the two orders, as each does from float64
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

    attn = model.model.layers[0].self_attn  # x in float32 (norms kept in float32), the bases in bf16
    x = torch.randn(2, 5, attn.q_proj.in_features)

    def qkv():
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    got = qkv()
    assert attn.q_proj.input_group._plan.backend == backend
    with monkeypatch.context() as m:
        m.setattr(grouping.InputGroup, "_planned", staticmethod(lambda x, args: (None, "router")))
        attn.q_proj.input_group.clear()
        for y, r in zip(got, qkv()):
            assert y.dtype == torch.bfloat16 and rel_err(y, r.double()) < 3e-2


def test_input_group_fallbacks_no_grad_and_changed_input(monkeypatch):
    monkeypatch.setenv("SHARELORA_BACKEND", "torch")
    model = grouped_model()
    attn = model.model.layers[0].self_attn
    x1, x2 = torch.randn(3, 32), torch.randn(3, 32)
    own = [m.forward_alone(x1) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    grouping.enable_input_groups(model)
    group = attn.q_proj.input_group
    with torch.no_grad():
        assert torch.allclose(attn.q_proj(x1), own[0]) and len(group._pending) == 2
        assert torch.allclose(attn.k_proj(x1), own[1]) and len(group._pending) == 1
    assert torch.allclose(attn.q_proj(x1), own[0])
    assert torch.allclose(attn.k_proj(x2), attn.k_proj.forward_alone(x2))  # another x: own op
    assert list(group._pending) == [2]  # k's stale entry dropped, v's still pending
    v = attn.v_proj(x1)
    assert v.requires_grad and torch.allclose(v, own[2]) and not group._pending
    with pytest.raises(ValueError, match="input has 8 features"):
        attn.q_proj(torch.randn(3, 8))
    with pytest.raises(ValueError, match="model types"):
        grouping.enable_input_groups(torch.nn.Sequential())



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pending_outputs_go_stale_on_unfreezing_and_on_a_backward_and_copies_run_alone(backend, monkeypatch):
    """A sibling's pending output is not served after its adapter was unfrozen (it was computed
    without gradient), nor after a backward through the group's one node (the kernels': it freed
    what the output's backward needs); a copy of a member, outside the group, runs alone."""
    import copy

    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    model = grouped_model("lora")
    attn = model.model.layers[0].self_attn
    grouping.enable_input_groups(model)
    x = torch.randn(3, 32)
    k_tensors = list(attn.k_proj.lora_paths[0].as_path().tensors)
    for t in k_tensors:
        t.requires_grad_(False)
    attn.q_proj(x)
    for t in k_tensors:
        t.requires_grad_(True)
    k = attn.k_proj(x)
    grads = torch.autograd.grad(k.pow(2).sum(), k_tensors)
    expected = torch.autograd.grad(attn.k_proj.forward_alone(x).pow(2).sum(), k_tensors)
    assert all(rel_err(g, e) < 1e-5 for g, e in zip(grads, expected))
    attn.q_proj(x).sum().backward()  # v's output stays pending
    v = attn.v_proj(x)
    v.sum().backward()  # no "backward through the graph a second time"
    assert rel_err(v, attn.v_proj.forward_alone(x)) < 1e-5
    twin = copy.copy(attn.k_proj)
    assert twin.input_group is attn.k_proj.input_group and rel_err(twin(x), attn.k_proj.forward_alone(x)) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "compose", "triton"])
def test_input_groups_under_inference_mode_match_ungrouped(backend, monkeypatch):
    """Under torch.inference_mode() (x an inference tensor, which keeps no version to tell an
    in-place write by) and with adapters made under it, each member runs its own op: logits (eval,
    and training with dropout on one seed) and generate() equal the ungrouped model's."""
    from tiny_models import METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_model, token_batch

    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    config = sk.ShareLoRAConfig(target_modules=TARGETS + ["gate_proj"], dropout=0.25, **METHOD_CONFIGS["bishare_slice"])
    model = sk.apply(tiny_model("llama", layers=2), config)
    randomize_adapters(model)
    ids = token_batch()

    def run():
        with torch.inference_mode():
            torch.manual_seed(3)
            out = [model.train()(ids).logits, model.eval()(ids).logits]
            return out + [model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)]

    ref = run()
    assert grouping.enable_input_groups(model) == 4
    for out, r in zip(run(), ref):
        assert torch.equal(out, r)
    with torch.inference_mode():
        inference_model = sk.apply(tiny_model("llama", layers=2), config, group_inputs=True)
        inference_model.load_state_dict(model.state_dict())
    assert next(inference_model.sharelora_adapters.parameters()).is_inference()
    with torch.no_grad():  # x a normal tensor, the adapters inference tensors
        assert torch.equal(inference_model(ids).logits, ref[1])


def test_triton_group_with_adapters_of_two_dtypes_runs_each_member_on_its_kernels(monkeypatch):
    """On triton, q_proj's adapters in bfloat16 and k/v's in float32 (each module fusable alone, no
    one grouped kernel call takes both): each member runs its own kernels, as the ungrouped model,
    and matches the torch backend."""
    from tiny_models import logits_and_grads, randomize_adapters, tiny_model, token_batch

    config = sk.ShareLoRAConfig(method="lora", r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    model = sk.apply(tiny_model("llama", layers=1), config)
    randomize_adapters(model)
    store = model.sharelora_adapters["default"]
    for name, p in list(store._parameters.items()):
        if "q_proj" in name:
            store._parameters[name] = torch.nn.Parameter(p.detach().to(torch.bfloat16))
    ids = token_batch()
    monkeypatch.setenv("SHARELORA_BACKEND", "torch")
    exact, exact_grads = logits_and_grads(model, ids)
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    ref, ref_grads = logits_and_grads(model, ids)
    assert grouping.enable_input_groups(model) == 1  # q/k/v
    out, grads = logits_and_grads(model, ids)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.input_group._plan.backend == "alone"
    assert {m._plan.backend for m in (attn.q_proj, attn.k_proj, attn.v_proj)} == {"triton"}
    assert torch.equal(out, ref) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert rel_err(out, exact.double()) < 3e-2  # q's kernels read bf16 operands
    for g, r in zip(grads, exact_grads):
        assert g.dtype == r.dtype and rel_err(g, r.double()) < 3e-2


def test_compiled_input_groups_with_biases_match_eager(monkeypatch):
    """torch.compile(fullgraph) of a Qwen2 model (q/k/v have biases, gate/up none) with input groups
    on the triton backend: same logits and adapter gradients as eager."""
    from tiny_models import METHOD_CONFIGS, TARGETS, logits_and_grads, randomize_adapters, tiny_model, token_batch

    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    config = sk.ShareLoRAConfig(target_modules=TARGETS + ["gate_proj"], **METHOD_CONFIGS["bishare_slice"])
    model = sk.apply(tiny_model("qwen2", layers=2), config, group_inputs=True)
    randomize_adapters(model)
    ids = token_batch()
    ref, ref_grads = logits_and_grads(model, ids)
    out, grads = logits_and_grads(model, ids, torch.compile(model, fullgraph=True, backend="aot_eager"))
    # float32, one graph vs op by op: equal up to summation order (2.8e-6 seen with Transformers 4.57)
    assert rel_err(out, ref.double()) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r.double()) < 1e-5
