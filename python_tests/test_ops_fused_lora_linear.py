"""Fused Triton LoRA linear (through TRITON_INTERPRET=1, see conftest.py) vs the float64 reference."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from sharelora_kernels import ops, reference  # noqa: E402
from sharelora_kernels.layer import SharedLoRALinear  # noqa: E402
from sharelora_kernels.ops.fused_lora_linear import KINDS, fused_lora_linear  # noqa: E402
from sharelora_kernels.ops.grouped_lora_linear import grouped_lora_linear  # noqa: E402
from sharelora_kernels.reference import LoRAPath  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
KRON_D = 8


@pytest.fixture(params=["tma", "pointer"])
def gemm(request, monkeypatch):
    """Which fused GEMM kernel runs: the TMA + persistent one (checked to have run) or the pointer one."""
    from sharelora_kernels.ops import tma_linear

    calls = []
    if request.param == "pointer":
        monkeypatch.setattr(tma_linear, "usable", lambda a, w_kn: False)
    else:
        real = tma_linear.tma_linear
        monkeypatch.setattr(tma_linear, "tma_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    yield request.param
    assert bool(calls) == (request.param == "tma")


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def make_path(kind: str, k: int, n: int, r: int, dtype=torch.float32) -> LoRAPath:
    """A path of ``kind`` with non-zero random tensors; shared dims a bit larger than (K, N)."""
    t = lambda *s: rand(*s, dtype=dtype)
    if kind == "plain":
        return LoRAPath("plain", (t(r, k), t(n, r)), 0.5)
    if kind == "slice":
        return LoRAPath("slice", (t(r, k + 7), t(n + 5, r)), 0.25, 3, 5)
    if kind == "gate":
        m, gn, g = 12, 10, 2
        return LoRAPath("gate", (t(r, m), t(gn, r), t(g, k), t(m, g), t(g, gn), t(n, g)), 0.75)
    return LoRAPath("kron", (t(r, KRON_D), t(KRON_D, r), t(1, k // KRON_D), t(n // KRON_D, 1)), 0.4)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def float64_reference(x, weight, bias, paths, dy, xd=None):
    """Output and gradients (x, then every path tensor) of the reference in float64.

    ``xd``: an explicit dropped-out input (x times the kernel's mask), else no dropout.
    """
    d = lambda t: t.detach().double().requires_grad_()
    x64 = d(x)
    p64 = [p._replace(tensors=tuple(d(t) for t in p.tensors)) for p in paths]
    y = reference.lora_linear(x64, weight.double(), None if bias is None else bias.double(), p64,
                              x_dropped=None if xd is None else x64 * xd.double())
    leaves = [x64] + [t for p in p64 for t in p.tensors]
    return y.detach(), torch.autograd.grad(y, leaves, dy.double())


def check_against_reference(kinds, m, k, n, ranks, dtype, bias=True, adapter_dtype=None):
    torch.manual_seed(0)
    x = rand(m, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    paths = [make_path(kind, k, n, r, adapter_dtype or dtype) for kind, r in zip(kinds, ranks)]
    y = fused_lora_linear(x, weight, b, paths)
    dy = torch.randn_like(y)
    leaves = [x] + [t for p in paths for t in p.tensors]
    grads = torch.autograd.grad(y, leaves, dy)
    y_ref, grads_ref = float64_reference(x, weight, b, paths, dy)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, y_ref) < TOL[dtype]
    for i, (g, g_ref, leaf) in enumerate(zip(grads, grads_ref, leaves)):
        assert g.dtype == leaf.dtype and g.shape == g_ref.shape
        assert rel_err(g, g_ref) < TOL[dtype], f"gradient {i} of {[p.kind for p in paths]}"


def test_half_base_with_float32_adapters(gemm):
    """apply() keeps fp32 adapters on a bf16/fp16 base: the kernels load them as fp32."""
    for dtype in (torch.bfloat16, torch.float16):
        check_against_reference(["plain", "slice", "gate", "kron"], m=9, k=48, n=40, ranks=[2, 3, 5, 2], dtype=dtype,
                                adapter_dtype=torch.float32)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_float16_low_rank_input_beyond_float16_range(adapter_dtype):
    """h = x A^T far above float16's 65504 while the output fits: every backend keeps h in float32
    (the kernels' low-rank dot takes tf32 operands for a float16 base), so nothing turns into inf.
    Gradients are checked with float32 adapters (float16 adapter grads of this size overflow, as any
    float16 parameter's would)."""
    torch.manual_seed(5)
    m, k, n, r = 16, 64, 24, 4
    x = torch.randn(m, k, dtype=torch.float16, requires_grad=True)
    weight, bias = torch.randn(n, k, dtype=torch.float16) / 8, torch.randn(n, dtype=torch.float16)
    a = (torch.randn(r, k) * 6000).to(adapter_dtype).requires_grad_()
    b = (torch.randn(n, r) * 1e-5).to(adapter_dtype).requires_grad_()
    paths = [LoRAPath("plain", (a, b), 2.0)]
    dy = torch.randn(m, n, dtype=torch.float16)
    y_ref, grads_ref = float64_reference(x, weight, bias, paths, dy)
    assert (x.double() @ a.double().t()).abs().max() > 65504
    grouped = lambda x, w, b, ps: grouped_lora_linear(x, [w], [b], [ps])[0]
    for name, run in (("fused", fused_lora_linear), ("grouped", grouped), ("torch", reference.lora_linear)):
        y = run(x, weight, bias, paths)
        assert torch.isfinite(y).all() and rel_err(y, y_ref) < TOL[torch.float16], name
        if adapter_dtype == torch.float32:
            grads = torch.autograd.grad(y, [x, a, b], dy)
            for g, g_ref in zip(grads, grads_ref):
                assert torch.isfinite(g).all() and rel_err(g, g_ref) < TOL[torch.float16], name


@pytest.mark.parametrize("kind", ["plain", "slice", "gate", "kron"])
def test_each_kind_fp32_gqa_shape(kind, gemm):
    check_against_reference([kind], m=7, k=48, n=16, ranks=[3], dtype=torch.float32)


@pytest.mark.parametrize("m", [1, 33])
def test_all_kinds_summed_fp32(m, gemm):
    check_against_reference(["plain", "slice", "gate", "kron"], m=m, k=40, n=56, ranks=[5, 3, 4, 7],
                            dtype=torch.float32, bias=m == 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_kinds_summed_half(dtype, gemm):
    check_against_reference(["plain", "slice", "gate", "kron"], m=33, k=48, n=40, ranks=[1, 5, 3, 9], dtype=dtype)


def test_rank_above_one_tile(gemm):
    check_against_reference(["plain", "kron"], m=7, k=40, n=24, ranks=[67, 5], dtype=torch.float32)


def test_non_contiguous_input_and_weight():
    torch.manual_seed(1)
    x = torch.randn(48, 9).t().requires_grad_()  # (9, 48), strides (1, 9)
    weight = torch.randn(48, 24).t()  # (24, 48) non-contiguous
    paths = [make_path("plain", 48, 24, 3), make_path("slice", 48, 24, 2)]
    y = fused_lora_linear(x, weight, None, paths)
    dy = torch.randn(24, 9).t()  # non-contiguous output gradient
    grads = torch.autograd.grad(y, [x] + [t for p in paths for t in p.tensors], dy)
    y_ref, grads_ref = float64_reference(x, weight, None, paths, dy)
    assert rel_err(y, y_ref) < 1e-4
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, grads_ref))


def test_int64_element_offsets(monkeypatch):
    """Tensors of 2**31+ elements index in int64 (too large to allocate here: the choice is forced,
    with column-major x and dy, whose column offsets are the ones that overflow)."""
    from sharelora_kernels.ops import dy_lowrank, fused_lora_linear as fused, lowrank_grad, lowrank_input
    from sharelora_kernels.ops.utils import needs_int64_index

    big = lambda cols: torch.empty_strided((2, cols), (1, 2), device="meta")  # column-major (2, cols)
    assert needs_int64_index(torch.empty(3), big(2**30 + 1))  # last offset 2 * 2**30 + 1 = 2**31 + 1
    assert not needs_int64_index(big(2**30), torch.empty(0))  # last offset 2**31 - 1
    for module in (fused, lowrank_grad, lowrank_input, dy_lowrank):
        monkeypatch.setattr(module, "needs_int64_index", lambda *tensors: True)
    torch.manual_seed(6)
    x = torch.randn(40, 9).t().requires_grad_()
    weight = torch.randn(24, 40)
    paths = [make_path("plain", 40, 24, 3), make_path("kron", 40, 24, 2)]
    y = fused_lora_linear(x, weight, None, paths)
    dy = torch.randn(24, 9).t()
    grads = torch.autograd.grad(y, [x] + [t for p in paths for t in p.tensors], dy)
    y_ref, grads_ref = float64_reference(x, weight, None, paths, dy)
    assert rel_err(y, y_ref) < 1e-4
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, grads_ref))


def test_adapters_of_mixed_dtypes_run_the_reference_in_their_common_dtype():
    """fp32 plain + fp16 gate + bf16 Kronecker adapters on one fp32 base: promoted, not refused."""
    torch.manual_seed(7)
    x, weight = rand(5, 48), torch.randn(40, 48)
    paths = [make_path("plain", 48, 40, 3), make_path("gate", 48, 40, 2, torch.float16),
             make_path("kron", 48, 40, 2, torch.bfloat16)]
    assert reference.adapter_compute_dtype(paths[1:]) == torch.float32
    y = ops.lora_linear(x, weight, None, paths)
    dy = torch.randn_like(y)
    leaves = [x] + [t for p in paths for t in p.tensors]
    grads = torch.autograd.grad(y, leaves, dy)
    y_ref, grads_ref = float64_reference(x, weight, None, paths, dy)
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < 1e-4
    for g, r, leaf in zip(grads, grads_ref, leaves):
        assert g.dtype == leaf.dtype and rel_err(g, r) < TOL[leaf.dtype]


def test_leading_dims_and_empty_batch():
    torch.manual_seed(2)
    weight = torch.randn(16, 24)
    paths = [make_path("kron", 24, 16, 2)]
    x = rand(2, 3, 24)
    y = fused_lora_linear(x, weight, None, paths)
    y_ref, _ = float64_reference(x.reshape(6, 24), weight, None, paths, torch.zeros(6, 16))
    assert y.shape == (2, 3, 16) and rel_err(y.reshape(6, 16), y_ref) < 1e-4
    x0 = rand(0, 24)
    y0 = fused_lora_linear(x0, weight, None, paths)
    assert y0.shape == (0, 16)
    grads = torch.autograd.grad(y0.sum(), [x0, *paths[0].tensors])
    assert grads[0].shape == (0, 24) and all(g.abs().sum() == 0 for g in grads[1:])


# ---------------------------------------------------------------------------------- dropout
def unpack_mask(words: torch.Tensor, k: int) -> torch.Tensor:
    """The (M, K) keep mask of the kernels' bit-packed (M, ceil(K / 32)) int32 mask."""
    bits = (words[:, :, None].long() >> torch.arange(32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :k].bool()


def kernel_mask(m: int, k: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The kernel's dropout mask for seed: h of an identity path on an all-ones x, times (1 - p);
    checked equal to the bits the forward stores for backward."""
    eye = torch.eye(k)
    _, h, words = torch.ops.sharelora.fused_lora_linear(torch.ones(m, k), torch.zeros(1, k), None,
                                                        [eye, torch.zeros(1, k)], [0, 0, 0], [1.0], p, seed)
    assert torch.equal(unpack_mask(words, k), h > 0)
    return h * (1 - p)


@pytest.mark.parametrize("rng64", [False, True])
def test_dropout_one_mask_forward_and_backward(rng64, gemm, monkeypatch):
    """The forward draws the mask once and stores it bit-packed; dx and dA apply exactly those bits
    (checked against the reference run with the explicit mask), and backward draws nothing (the
    generator's state does not move). int64 Philox offsets: forced here (M*K/4 >= 2^31 on a GPU)."""
    from sharelora_kernels.ops import lowrank_input

    if rng64:
        monkeypatch.setattr(lowrank_input, "rng_needs_int64", lambda m, k: True)
    torch.manual_seed(3)
    m, k, n, p = 9, 40, 24, 0.3
    x, weight, b = rand(m, k), torch.randn(n, k), torch.randn(n)
    paths = [make_path("plain", k, n, 3), make_path("kron", k, n, 2), make_path("gate", k, n, 3)]
    tensors = [t for q in paths for t in q.tensors]
    layout = [c for q in paths for c in (KINDS.index(q.kind), q.k_offset, q.n_offset)]
    seed = torch.tensor([1234])
    y, _, words = torch.ops.sharelora.fused_lora_linear(x, weight, b, tensors, layout, [q.scale for q in paths], p, seed)
    assert words.shape == (m, 2) and words.dtype == torch.int32  # ceil(40 / 32) words per row
    keep = unpack_mask(words, k)
    assert torch.equal(keep.float(), kernel_mask(m, k, p, seed))  # the stored bits are the applied mask
    assert 0.5 < keep.float().mean() < 0.9
    dy = torch.randn_like(y)
    state = torch.get_rng_state()
    grads = torch.autograd.grad(y, [x] + tensors, dy)
    assert torch.equal(torch.get_rng_state(), state)
    y_ref, grads_ref = float64_reference(x, weight, b, paths, dy, xd=keep / (1 - p))
    assert rel_err(y, y_ref) < 1e-4
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-4


def test_backward_op_takes_the_mask_not_a_seed():
    schema = str(torch.ops.sharelora.fused_lora_linear_backward.default._schema)
    assert "Tensor mask" in schema and "seed" not in schema


def test_dropout_mask_statistics():
    p = 0.3
    a = kernel_mask(64, 64, p, torch.tensor([7]))
    b = kernel_mask(64, 64, p, torch.tensor([8]))
    assert abs(a.mean().item() - (1 - p)) < 0.03
    assert (a != b).float().mean() > 0.2  # another seed, another mask
    assert torch.equal(a, kernel_mask(64, 64, p, torch.tensor([7])))  # same seed, same mask


def test_dropout_only_in_training():
    torch.manual_seed(4)
    x, weight = torch.randn(5, 16), torch.randn(8, 16)
    paths = [make_path("plain", 16, 8, 2)]
    eval_y = fused_lora_linear(x, weight, None, paths, dropout_p=0.5, training=False)
    train_y = fused_lora_linear(x, weight, None, paths, dropout_p=0.5, training=True)
    ref, _ = float64_reference(x, weight, None, paths, torch.zeros(5, 8))
    assert rel_err(eval_y, ref) < 1e-4 and rel_err(train_y, ref) > 1e-3


# ---------------------------------------------------------------------------------- integration
def test_compile_fullgraph_custom_op(monkeypatch):
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    torch.manual_seed(5)
    layer = SharedLoRALinear(torch.nn.Linear(24, 16), r=3, alpha=6.0)
    torch.nn.init.normal_(layer.lora_paths[0].B)
    x = torch.randn(2, 5, 24, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    eager_grads = [x.grad.clone(), layer.lora_paths[0].A.grad.clone(), layer.lora_paths[0].B.grad.clone()]
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    for g, e in zip([x.grad, layer.lora_paths[0].A.grad, layer.lora_paths[0].B.grad], eager_grads):
        assert torch.allclose(g, e, atol=1e-5)


@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck_custom_ops(contiguous):
    """Schema, fake (meta) impls, autograd registration and AOT tracing of the forward and backward
    ops, with contiguous and with transposed (non-contiguous) x, W and dy."""
    torch.manual_seed(7)
    m, k, n = 5, 24, 16
    paths = [make_path("slice", k, n, 3), make_path("kron", k, n, 2)]
    tensors = [t for q in paths for t in q.tensors]
    layout = [c for q in paths for c in (KINDS.index(q.kind), q.k_offset, q.n_offset)]
    scales = [q.scale for q in paths]

    def mat(rows, cols, grad=False):
        t = torch.randn(rows, cols) if contiguous else torch.randn(cols, rows).t()
        return t.requires_grad_(grad)

    x, weight, dy, seed = mat(m, k, grad=True), mat(n, k), mat(m, n), torch.tensor([11])
    torch.library.opcheck(torch.ops.sharelora.fused_lora_linear.default,
                          (x, weight, torch.randn(n), tensors, layout, scales, 0.2, seed))
    h = torch.randn(m, sum(q.tensors[0].shape[0] for q in paths))
    mask = torch.randint(-2**31, 2**31 - 1, (m, 1), dtype=torch.int32)  # bit-packed: ceil(24 / 32) words per row
    torch.library.opcheck(torch.ops.sharelora.fused_lora_linear_backward.default,
                          (dy, x.detach(), weight, h, mask, [t.detach() for t in tensors], layout, scales, 0.2, True))


def test_compile_fullgraph_cpu_route(monkeypatch):
    monkeypatch.delenv("SHARELORA_BACKEND", raising=False)
    layer = SharedLoRALinear(torch.nn.Linear(24, 16), r=3, alpha=6.0)
    x = torch.randn(4, 24)
    assert ops.backend_for(x) == ops.dispatch.DEFAULT_CPU
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), layer(x), atol=1e-6)


def test_dispatch(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.delenv("SHARELORA_BACKEND", raising=False)
    assert ops.backend_for(x) == ops.dispatch.DEFAULT_CPU
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    assert ops.backend_for(x) == "triton"
    monkeypatch.setenv("SHARELORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SHARELORA_BACKEND"):
        ops.backend_for(x)


def test_layer_forced_triton_matches_reference(monkeypatch):
    torch.manual_seed(6)
    layer = SharedLoRALinear(torch.nn.Linear(40, 24), r=5, alpha=10.0)
    torch.nn.init.normal_(layer.lora_paths[0].B)
    x = torch.randn(3, 40)
    ref = layer(x)
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    assert rel_err(layer(x), ref.double()) < 1e-4


@pytest.mark.parametrize("name", ["share_ab", "bishare_gate", "bishare_kron"])
def test_applied_model_runs_fused_and_matches_torch_backend(name, monkeypatch):
    """A whole tiny LLaMA after apply(): logits and every adapter gradient, triton vs torch backend."""
    import sharelora_kernels as sk
    from tiny_models import METHOD_CONFIGS, TARGETS, logits_and_grads, randomize_adapters, tiny_model, token_batch

    model = sk.apply(tiny_model("mistral", layers=2), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))
    randomize_adapters(model)
    ids = token_batch()
    monkeypatch.setenv("SHARELORA_BACKEND", "torch")
    ref, ref_grads = logits_and_grads(model, ids)
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    out, grads = logits_and_grads(model, ids)
    layers = [m for m in model.modules() if isinstance(m, SharedLoRALinear)]
    assert len(layers) == 2 * len(TARGETS) and all(m._plan.backend == "triton" for m in layers)  # every call fused
    assert rel_err(out, ref.double()) < 1e-4
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref.double()) < 1e-4


# ---------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    x, weight = torch.randn(3, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="K=12 features but weight has shape \\(8, 16\\)"):
        fused_lora_linear(torch.randn(3, 12), weight, None, [make_path("plain", 16, 8, 2)])
    with pytest.raises(ValueError, match=r"B has shape \(9, 2\), expected \(8, 2\)"):
        fused_lora_linear(x, weight, None, [LoRAPath("plain", (torch.randn(2, 16), torch.randn(9, 2)), 1.0)])
    with pytest.raises(ValueError, match="d=8 must divide K=12"):
        fused_lora_linear(torch.randn(3, 12), torch.randn(8, 12), None, [make_path("kron", 16, 8, 2)])
    with pytest.raises(ValueError, match="k_offset=3 \\+ K=16 exceeds"):
        fused_lora_linear(x, weight, None, [LoRAPath("slice", (torch.randn(2, 18), torch.randn(8, 2)), 1.0, 3, 0)])
    with pytest.raises(ValueError, match="bias"):
        fused_lora_linear(x, weight, torch.randn(7), [make_path("plain", 16, 8, 2)])
    with pytest.raises(ValueError, match="frozen"):
        fused_lora_linear(x, torch.randn(8, 16, requires_grad=True), None, [make_path("plain", 16, 8, 2)])
    with pytest.raises(ValueError, match="x, weight and bias in one dtype"):
        fused_lora_linear(x, weight.half(), None, [make_path("plain", 16, 8, 2)])
    with pytest.raises(ValueError, match="every adapter tensor in one dtype"):
        fused_lora_linear(x, weight, None, [make_path("plain", 16, 8, 2), make_path("plain", 16, 8, 2, torch.float16)])
    with pytest.raises(ValueError, match="float64"):
        fused_lora_linear(x, weight, None, [make_path("plain", 16, 8, 2, torch.float64)])


def test_tma_refuses_degenerate_strides():
    """A zero row stride (an expanded dy) or a row stride off 16 bytes never reaches a descriptor."""
    from sharelora_kernels.ops import tma_linear

    w = torch.randn(32, 64)
    assert tma_linear.usable(torch.randn(8, 32), w)
    assert not tma_linear.usable(torch.randn(1, 32).expand(8, 32), w)  # row stride 0
    assert not tma_linear.usable(torch.randn(8, 33)[:, :32], w)  # 132-byte rows
    assert not tma_linear.usable(torch.randn(8, 32), torch.randn(1, 64).expand(32, 64))


def test_dropout_seed_has_63_bits_and_p0_allocates_nothing():
    from sharelora_kernels.ops.utils import dropout_seed

    seeds = torch.cat([dropout_seed(0.1, torch.device("cpu")) for _ in range(8)])
    assert seeds.dtype == torch.int64 and (seeds >= 2**31).any() and (seeds >= 0).all()
    first = dropout_seed(0.0, torch.device("cpu"))
    assert first is dropout_seed(0.0, torch.device("cpu")) and first.item() == 0  # made once, reused


def test_every_kernel_launch_runs_under_its_tensors_device():
    """Each launch site of the ops is the body of a ``with on_device(...)`` (a model over two GPUs
    launches on each tensor's GPU); read off the source, as no second GPU is here."""
    import re
    from pathlib import Path

    import sharelora_kernels.ops as package

    sites = 0
    for path in Path(package.__file__).parent.glob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*\w*kernel\[[^\]]+\]\(", line):  # a launch: kernel[grid](...
                sites += 1
                assert lines[i - 1].strip().startswith("with on_device("), f"{path.name}:{i + 1}: {line.strip()}"
    assert sites >= 8


def test_tensor_read_by_several_paths_gets_the_sum_of_its_gradients():
    """Two slice paths at different windows of one (A_s, B_s) and two Kronecker paths of one K_A
    in one layer: each shared tensor's gradient is the sum over its readers (one buffer, windows)."""
    torch.manual_seed(0)
    m, k, n, r = 5, 24, 16, 3
    a_s, b_s, k_a = rand(r, k + 7), rand(n + 5, r), rand(1, k // KRON_D)
    paths = [LoRAPath("slice", (a_s, b_s), 0.25, 3, 5), LoRAPath("slice", (a_s, b_s), 0.5, 0, 1),
             LoRAPath("kron", (rand(2, KRON_D), rand(KRON_D, 2), k_a, rand(n // KRON_D, 1)), 0.4),
             LoRAPath("kron", (rand(4, KRON_D), rand(KRON_D, 4), k_a, rand(n // KRON_D, 1)), 0.3)]
    x, weight, bias = rand(m, k), torch.randn(n, k), torch.randn(n)
    y = fused_lora_linear(x, weight, bias, paths)
    dy = torch.randn_like(y)
    leaves = [x, *{id(t): t for p in paths for t in p.tensors}.values()]
    grads = torch.autograd.grad(y, leaves, dy)
    x64 = {id(t): t.detach().double().requires_grad_() for t in leaves}
    p64 = [p._replace(tensors=tuple(x64[id(t)] for t in p.tensors)) for p in paths]
    y64 = reference.lora_linear(x64[id(x)], weight.double(), bias.double(), p64)
    grads64 = torch.autograd.grad(y64, list(x64.values()), dy.double())
    assert rel_err(y, y64) < TOL[torch.float32]
    for g, g64 in zip(grads, grads64):
        assert rel_err(g, g64) < TOL[torch.float32]


@pytest.mark.parametrize("kind", ["plain", "gate", "kron"])
def test_a_nan_in_x_survives_dropout_as_in_torch(kind):
    """dropout(x) is x * mask / (1 - p), so a NaN in x poisons what it feeds even where the mask drops
    it (NaN * 0 is NaN), as torch's dropout does: the kernels multiply by the mask rather than select."""
    m, k, n = 8, 16, 24
    x = torch.randn(m, k)
    x[2, 3] = float("nan")
    w = torch.randn(n, k)
    paths = [make_path(kind, k, n, 3)]
    for seed in range(4):  # the element is dropped on some of these seeds
        counts = {}
        for backend in ("torch", "triton"):
            torch.manual_seed(seed)
            xx = x.clone().requires_grad_()
            y = ops.lora_linear(xx, w, None, paths, 0.5, True, backend=backend)
            grads = torch.autograd.grad(y, [xx, *paths[0].tensors], torch.ones_like(y))
            counts[backend] = [int(t.isnan().sum()) for t in (y, *grads)]
        assert counts["triton"] == counts["torch"], (seed, counts)
