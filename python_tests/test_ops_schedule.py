"""The Hopper-side machinery of the fused kernels, on the CPU through the interpreter (conftest.py):
the persistent TMA schedule, the split-M reductions, the per-plan table cache (no host data per
call), the autotune modes; and one GPU-only test, a CUDA-graph capture of forward + backward."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from sharelora_kernels import ops, reference  # noqa: E402
from sharelora_kernels.ops import autotune, fused_lora_linear as fused, tables, tma_linear  # noqa: E402
from sharelora_kernels.ops.dy_lowrank import dy_lowrank  # noqa: E402
from sharelora_kernels.ops.fused_lora_linear import fused_lora_linear  # noqa: E402
from sharelora_kernels.ops.lowrank_grad import lowrank_grad  # noqa: E402
from test_ops_fused_lora_linear import float64_reference, make_path, rand, rel_err, unpack_mask  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")


def run_layer(m, k, n, kinds, ranks, dropout_p=0.0, seed=0):
    """Output and gradients of the fused op, and the float64 reference's (dropout: the op's own mask)."""
    torch.manual_seed(seed)
    x, weight, bias = rand(m, k), torch.randn(n, k), torch.randn(n)
    paths = [make_path(kind, k, n, r) for kind, r in zip(kinds, ranks)]
    tensors = [t for p in paths for t in p.tensors]
    layout = [c for p in paths for c in (fused.KINDS.index(p.kind), p.k_offset, p.n_offset)]
    y, _, words = torch.ops.sharelora.fused_lora_linear(x, weight, bias, tensors, layout, [p.scale for p in paths],
                                                        dropout_p, torch.tensor([seed + 11]))
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + tensors, dy)
    xd = unpack_mask(words, k) / (1 - dropout_p) if dropout_p > 0 else None
    return (y, grads), float64_reference(x, weight, bias, paths, dy, xd=xd)


def assert_matches(got, ref, tol=1e-4):
    (y, grads), (y_ref, grads_ref) = got, ref
    assert rel_err(y, y_ref) < tol
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert rel_err(g, g_ref) < tol, f"gradient {i}"


# ---------------------------------------------------------------------------------- persistent TMA schedule
@pytest.mark.parametrize("programs", [1, 3, 64])
def test_persistent_schedule_more_and_fewer_tiles_than_programs(programs, monkeypatch):
    """33 x 40 output in 32 x 32 tiles (4 tiles; dx 33 x 48: 4): one program looping over all of them,
    three (uneven), and 64 asked for (clamped to the tiles). Ragged edges in M, N and K throughout."""
    launched = []
    real = tma_linear.tma_linear
    monkeypatch.setattr(tma_linear, "sm_count", lambda device: programs)
    monkeypatch.setattr(tma_linear, "tma_linear", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    got, ref = run_layer(33, 48, 40, ["plain", "kron", "gate"], [5, 2, 3], dropout_p=0.2)
    assert len(launched) == 2  # forward and dx both ran the TMA kernel
    assert_matches(got, ref)


def test_tma_refuses_unaligned_rows_and_the_pointer_kernel_serves():
    """bf16 rows of 36 elements are 72 bytes (not a 16-byte multiple): no descriptor, pointer kernel."""
    x, w = torch.randn(5, 36, dtype=torch.bfloat16), torch.randn(8, 36, dtype=torch.bfloat16)
    assert not tma_linear.usable(x, w.t())
    assert tma_linear.usable(torch.randn(5, 40, dtype=torch.bfloat16), torch.randn(8, 40, dtype=torch.bfloat16).t())
    assert not tma_linear.usable(torch.randn(40, 5).t(), torch.randn(8, 40).t())  # column-major x


# ---------------------------------------------------------------------------------- split-M reductions
def test_split_m_da_is_bitwise_reproducible_and_exact():
    torch.manual_seed(1)
    m, d, r, p = 100, 40, 5, 0.25
    g, a = torch.randn(m, r), torch.randn(m, d)
    words = torch.randint(-2**31, 2**31 - 1, (m, 2), dtype=torch.int32)
    keep = unpack_mask(words, d)
    ref = g.double().t() @ (a.double() * keep / (1 - p))
    runs = [lowrank_grad(g, a, words, p, splits=s) for s in (4, 4, 1)]
    assert torch.equal(runs[0], runs[1])  # same split, same order: the same bits
    for out in runs:
        assert rel_err(out, ref) < 1e-5
    atomic = lowrank_grad(g, a, words, p, atomic=True, splits=4)
    assert rel_err(atomic, ref) < 1e-5


def test_dy_pass_gives_dh_and_db_bitwise_reproducibly():
    torch.manual_seed(2)
    m, n = 70, 40
    paths = [make_path("plain", 24, n, 3), make_path("kron", 24, n, 2), make_path("gate", 24, n, 2)]
    tab = tables.build_tables(paths, torch.device("cpu"))
    r = tab.b.shape[0]
    dy, h = torch.randn(m, n), torch.randn(m, r)
    b_eff = torch.cat([reference.path_factors(p, 24, n)[1].detach() for p in paths], 1).double()  # (N, R)
    s = tab.scale.double()
    dh_ref, db_ref = (dy.double() @ b_eff) * s, (h.double() * s).t() @ dy.double()
    runs = [dy_lowrank(dy, h, tab.b, tab.scale, tab.dtype, tab.periodic, splits=splits)
            for splits in ((3, 2), (3, 2), (1, 1))]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    for dh, db in runs:
        assert rel_err(dh, dh_ref) < 1e-5 and rel_err(db, db_ref) < 1e-5


def test_layer_gradients_bitwise_equal_across_runs():
    """Large enough M that dA and dB are split across programs: two backward passes, the same bits."""
    first, ref = run_layer(200, 40, 24, ["plain", "slice"], [3, 4], seed=3)
    second, _ = run_layer(200, 40, 24, ["plain", "slice"], [3, 4], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert_matches(first, ref)


# ---------------------------------------------------------------------------------- per-plan table cache
@pytest.mark.parametrize("op", ["fused", "grouped"])
def test_forward_and_backward_create_no_tensor_from_host_data(op, monkeypatch):
    """After one call has built the plan's tables, a forward and backward (dropout on) copy nothing
    from the host: torch.tensor / as_tensor / from_numpy refuse to run. A cold call does need them,
    which shows the refusal is armed."""
    from sharelora_kernels.ops.grouped_lora_linear import grouped_lora_linear

    torch.manual_seed(4)
    x = rand(9, 40)
    kinds = (("plain", 3), ("slice", 2), ("gate", 2), ("kron", 2))
    weights, biases = [torch.randn(24, 40), torch.randn(16, 40)], [torch.randn(24), None]
    paths = [[make_path(kind, 40, w.shape[0], r) for kind, r in kinds] for w in weights]

    def step():
        if op == "fused":
            ys = [fused_lora_linear(x, weights[0], biases[0], paths[0], dropout_p=0.1, training=True)]
        else:
            ys = grouped_lora_linear(x, weights, biases, paths, dropout_p=0.1, training=True)
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])

    tables.clear_cache()
    step()

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was made from host data during the call")

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, refuse)
    step()
    tables.clear_cache()
    with pytest.raises(AssertionError, match="host data"):
        step()


def test_table_cache_follows_in_place_updates_replacements_and_reshapes():
    torch.manual_seed(5)
    m, k, n = 7, 40, 24
    x, weight = rand(m, k), torch.randn(n, k)
    gate, plain = make_path("gate", k, n, 2), make_path("plain", k, n, 3)

    def check(paths):
        y = fused_lora_linear(x, weight, None, paths)
        y_ref, _ = float64_reference(x, weight, None, paths, torch.zeros(m, n))
        assert rel_err(y, y_ref) < 1e-4

    check([gate, plain])
    with torch.no_grad():
        gate.tensors[2].mul_(-3.0)  # G_id updated in place (an optimizer step): same table, new A_eff
        plain.tensors[1].add_(1.0)
    check([gate, plain])
    replaced = plain._replace(tensors=tuple(t.detach().clone().requires_grad_() for t in plain.tensors))  # .to(), assign
    check([gate, replaced])
    check([gate, make_path("plain", k, n, 5)])  # reshaped: another rank


# ---------------------------------------------------------------------------------- autotune modes
def test_autotune_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv(autotune.ENV, raising=False)
    assert autotune.mode() == "perf"
    for value in autotune.MODES:
        monkeypatch.setenv(autotune.ENV, value.upper())
        assert autotune.mode() == value
    monkeypatch.setenv(autotune.ENV, "fastest")
    with pytest.raises(ValueError, match="SHARELORA_AUTOTUNE"):
        autotune.mode()
    with pytest.raises(ValueError, match="SHARELORA_AUTOTUNE"):
        fused_lora_linear(torch.randn(3, 16), torch.randn(8, 16), None, [make_path("plain", 16, 8, 2)])


def test_autotune_spaces_and_keys():
    """small: one config that fits any GPU (fp32 operands within 48 KiB of shared memory); perf a
    short list inside full, with the 128x256x64 / 4-stage TMA config; keys that separate dropout,
    the weight layout and the adapter dtype."""
    (small,) = fused.SPACES["small"]
    kw = small.kwargs
    assert small.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 4 <= 48 * 1024
    for perf, full in ((fused.PERF, fused.FULL), (tma_linear.PERF, tma_linear.FULL)):
        assert 1 < len(perf) < len(full) and set(perf) <= set(full)
    assert (128, 256, 64, 8, 4) in tma_linear.PERF
    for kernel in (fused.pointer_kernel, tma_linear.tma_kernel):
        assert {"DROPOUT", "FACTOR_DTYPE", "M_BUCKET"} <= set(kernel.key) and "M" not in kernel.key
    assert "W_KMAJOR" in tma_linear.tma_kernel.key and "stride_wk" in fused.pointer_kernel.key
    wide = [c for c in autotune.gemm_configs(tma_linear.PERF)]
    assert len(autotune.kronecker_fits(wide, {}, PERIODIC=True)) == len(wide) - 1  # 128x256 spills with Kronecker
    assert autotune.kronecker_fits(wide, {}, PERIODIC=False) == wide


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the one test here that does)")
def test_cuda_graph_captures_forward_and_backward(monkeypatch):
    """Once the plan's tables exist, forward + backward of a layer (dropout on) capture in a CUDA
    graph: replays give the eager gradients without dropout, and a fresh mask per replay with it."""
    from sharelora_kernels.layer import SharedLoRALinear

    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    torch.manual_seed(6)
    results = {}
    for p in (0.0, 0.1):
        layer = SharedLoRALinear(torch.nn.Linear(256, 128).cuda().bfloat16(), r=16, alpha=32, dropout=p).train()
        torch.nn.init.normal_(layer.lora_paths[0].B)
        x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).backward(dy)
        torch.cuda.current_stream().wait_stream(side)
        eager = [x.grad.clone(), layer.lora_paths[0].A.grad.clone()]
        layer.zero_grad(set_to_none=True)
        x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(x).backward(dy)
        replays = []
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            replays.append([x.grad.clone(), layer.lora_paths[0].A.grad.clone()])
        results[p] = eager, replays
    eager, replays = results[0.0]
    assert all(torch.equal(a, b) for replay in replays for a, b in zip(replay, eager))
    _, replays = results[0.1]
    assert not torch.equal(replays[0][1], replays[1][1])  # a new mask each replay
