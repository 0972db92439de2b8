"""Many adapters in one batch (``ops.multi_adapter``) vs the float64 reference run row by row.

Both backends: the torch path, and the Triton shrink / expand kernels through TRITON_INTERPRET=1
(conftest.py). Adapters of every path kind, of different ranks, methods and path counts, in one
batch, with base rows (index -1), adapters without rows, one row per adapter and segments longer
than a tile; and drawn batches (adapters, rows, shapes) of all of these.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sharelora_kernels import ops, reference
from sharelora_kernels.ops.lowrank_only import lowrank_add
from sharelora_kernels.ops.multi_adapter import (BASE, adapter_batch, adapter_tables, multi_adapter_add,
                                                 multi_adapter_linear)
from sharelora_kernels.reference import LoRAPath
from test_ops_fused_lora_linear import KRON_D, TOL, make_path, rel_err

BACKENDS = [False, pytest.param(True, marks=pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable"))]
IDS = ["torch", "triton"]
# one adapter per method shape: plain LoRA, ShareLoRA (a shared pair, a slice of it), Bi-Share
# slice / gate / Kronecker sums, an adapter with no paths, one of rank 21 (two rank tiles); odd ranks
METHODS = [[("plain", 3)], [("slice", 5)], [("plain", 2), ("slice", 4), ("slice", 7)], [("gate", 3)],
           [("plain", 1), ("gate", 2), ("kron", 3)], [("kron", 5)], [], [("kron", 2), ("plain", 9)],
           [("plain", 9), ("kron", 1), ("slice", 11)]]


def make_adapters(methods, k, n, dtype=torch.float32):
    """Frozen adapters (inference): one list of paths per entry of ``methods``."""
    adapters = [[make_path(kind, k, n, r, dtype) for kind, r in method] for method in methods]
    for paths in adapters:
        for p in paths:
            for t in p.tensors:
                t.requires_grad_(False)
    return adapters


def float64_rows(y0, x, rows, adapters, tokens_per_row):
    """y0 + each row's adapter paths of x, in float64, one row (its T tokens) at a time."""
    k, n = x.shape[-1], y0.shape[-1]
    x64 = x.reshape(len(rows), tokens_per_row, k).double()
    y = y0.reshape(len(rows), tokens_per_row, n).double().clone()
    for i, a in enumerate(rows):
        if a != BASE and adapters[a]:
            paths = [p._replace(tensors=tuple(t.double() for t in p.tensors)) for p in adapters[a]]
            y[i] += reference.lora_linear(x64[i], torch.zeros(n, k, dtype=torch.float64), None, paths)
    return y.reshape(y0.shape)


def check(rows, methods, k, n, tokens_per_row, use_triton, dtype=torch.float32, adapter_dtype=None, y_dtype=None,
          block_m=None):
    torch.manual_seed(0)
    adapters = make_adapters(methods, k, n, adapter_dtype or dtype)
    x = torch.randn(len(rows), tokens_per_row, k, dtype=dtype)
    y0 = torch.randn(len(rows), tokens_per_row, n, dtype=y_dtype or dtype)
    batch = adapter_batch(rows, len(adapters), tokens_per_row, block_m=block_m)
    y = multi_adapter_add(y0.clone(), x, batch, adapter_tables(adapters, k, n), use_triton=use_triton)
    y_ref = float64_rows(y0, x, rows, adapters, tokens_per_row)
    assert y.shape == y0.shape and y.dtype == y0.dtype
    assert rel_err(y - y0, y_ref - y0.double()) < TOL[dtype]
    base = [i for i, a in enumerate(rows) if a == BASE or not adapters[a]]
    assert torch.equal(y[base], y0[base])  # rows without adapter (or with an empty one) untouched
    return y, y0, x, adapters, batch


def plan_of(batch):
    """The torch path's one segment plan of ``batch`` (its cache also holds the batch's stacks)."""
    (plan,) = [v for key, v in batch.cache.items() if key[0] == "plan"]
    return plan


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@pytest.mark.parametrize("tokens_per_row", [1, 3], ids=["decode", "prefill"])
def test_every_method_in_one_batch(tokens_per_row, use_triton):
    """Base rows, an adapter without rows (5), one row per adapter (3, 6, 7), rows out of order."""
    rows = [2, 0, BASE, 1, 2, 4, 0, 7, BASE, 3, 1, 6, 2, 4, 8]
    check(rows, METHODS, k=48, n=40, tokens_per_row=tokens_per_row, use_triton=use_triton)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tenants_of_one_method(dtype, use_triton):
    """Six tenants of one Bi-Share configuration (every path kind, different values): the torch path
    pads their uneven segments and runs them as batched GEMMs; a seventh tenant's long segment (it
    would more than double the padding) runs alone."""
    method = [("plain", 2), ("slice", 3), ("gate", 2), ("kron", 4), ("kron", 1)]
    rows = [0, 1, 1, 2, BASE, 3, 3, 3, 4, 5, 5, 0, 2] + [6] * 40
    _, _, _, _, batch = check(rows, [method] * 7, k=48, n=40, tokens_per_row=1, use_triton=use_triton, dtype=dtype,
                              adapter_dtype=torch.float32)
    if not use_triton:
        plan = plan_of(batch)
        assert sorted((item[0], sorted(item[1]) if item[0] == "batched" else item[1]) for item in plan) == \
            [("batched", [0, 1, 2, 3, 4, 5]), ("single", 6)]


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_single_token(use_triton):
    check([4], METHODS, k=40, n=56, tokens_per_row=1, use_triton=use_triton)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m", [16, 32, None])
def test_segments_longer_than_a_tile(block_m, dtype, use_triton):
    """A 37-token segment over three 16-row tiles, two 32-row ones or one 64-row tile (the default),
    next to a 1-token one; adapter 3 (rank 21) takes two 16-rank tiles, or one 64-rank tile (64-row
    tiles of a 16-bit x)."""
    rows = [0] * 37 + [2] + [BASE] * 3 + [1] * 16 + [3] * 5
    _, _, _, _, batch = check(rows, METHODS[:3] + [METHODS[8]], k=24, n=72, tokens_per_row=1, use_triton=use_triton,
                              block_m=block_m, dtype=dtype, adapter_dtype=torch.float32)
    assert batch.block_m == (block_m or 64)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_many_adapters_one_row_each(use_triton):
    methods = [METHODS[i % len(METHODS)] for i in range(20)]
    check(list(range(20))[::-1], methods, k=32, n=24, tokens_per_row=1, use_triton=use_triton)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_float32_adapters(dtype, use_triton):
    check([1, 0, BASE, 4, 1], METHODS, k=48, n=40, tokens_per_row=2, use_triton=use_triton, dtype=dtype,
          adapter_dtype=torch.float32)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_bf16_adapters_and_float32_y(use_triton):
    """A 4-bit base's case: x and y float32 from the base, bf16 adapters and compute dtype."""
    torch.manual_seed(1)
    k, n, rows = 32, 24, [0, 1, BASE, 1]
    adapters = make_adapters([[("plain", 3)], [("kron", 2), ("gate", 3)]], k, n, torch.bfloat16)
    x, y0 = torch.randn(len(rows), k), torch.randn(len(rows), n)
    y = multi_adapter_add(y0.clone(), x, adapter_batch(rows, 2), adapter_tables(adapters, k, n),
                          compute_dtype=torch.bfloat16, use_triton=use_triton)
    y_ref = float64_rows(y0, x, rows, adapters, 1)
    assert y.dtype == torch.float32
    assert 1e-6 < rel_err(y - y0, y_ref - y0.double()) < TOL[torch.bfloat16]  # rounded to bf16, not fp32


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@pytest.mark.parametrize("tenants", ["mixed", "one_method"])
def test_each_row_equals_its_adapter_run_alone(tenants, use_triton):
    """Row i of the mixed batch == the single-adapter op on row i alone (same backend), to float
    rounding: adapters of different methods, and of one method (the torch path's batched GEMMs)."""
    rows = [3, 0, 4, BASE, 7, 2, 0]
    methods = METHODS if tenants == "mixed" else [METHODS[4] + METHODS[2]] * 8
    y, y0, x, adapters, _ = check(rows, methods, k=48, n=40, tokens_per_row=2, use_triton=use_triton)
    for i, a in enumerate(rows):
        alone = lowrank_add(y0[i].clone(), x[i], adapters[a], use_triton=use_triton) if a != BASE else y0[i]
        assert rel_err(y[i], alone.double()) < 1e-6, f"row {i} (adapter {a})"


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_dense_base_linear(use_triton):
    torch.manual_seed(2)
    k, n, rows = 40, 24, [1, BASE, 0, 1]
    adapters = make_adapters([[("slice", 3)], [("gate", 2), ("plain", 3)]], k, n)
    x, weight, bias = torch.randn(4, 3, k), torch.randn(n, k), torch.randn(n)
    y = multi_adapter_linear(x, weight, bias, adapter_batch(rows, 2, 3), adapter_tables(adapters, k, n),
                             use_triton=use_triton)
    y_ref = float64_rows(F.linear(x.double(), weight.double(), bias.double()), x, rows, adapters, 3)
    assert y.shape == (4, 3, n) and rel_err(y, y_ref) < 1e-4


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_in_place_base_only_and_empty_batches(use_triton):
    torch.manual_seed(3)
    k, n = 24, 16
    tables = adapter_tables(make_adapters([[("kron", 2)], [("plain", 3)]], k, n), k, n)
    x, y = torch.randn(5, k), torch.randn(5, n)
    before, address = y.clone(), y.data_ptr()
    out = multi_adapter_add(y, x, adapter_batch([1, 0, 0, BASE, 1], 2), tables, use_triton=use_triton)
    assert out is y and y.data_ptr() == address and not torch.equal(y, before) and torch.equal(y[3], before[3])
    y = before.clone()
    assert torch.equal(multi_adapter_add(y, x, adapter_batch([BASE] * 5, 2), tables, use_triton=use_triton), before)
    empty = multi_adapter_add(torch.randn(0, n), torch.randn(0, k), adapter_batch([], 2), tables, use_triton=use_triton)
    assert empty.shape == (0, n)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_non_contiguous_x_and_y(use_triton):
    """A transposed x is read through its strides; a non-contiguous y gets the sum in a contiguous copy."""
    torch.manual_seed(4)
    k, n, rows = 24, 16, [0, BASE, 0]
    adapters = make_adapters([[("plain", 2), ("kron", 3)]], k, n)
    x, y0 = torch.randn(k, 3).t(), torch.randn(n, 3).t()
    out = multi_adapter_add(y0, x, adapter_batch(rows, 1), adapter_tables(adapters, k, n), use_triton=use_triton)
    assert out.is_contiguous() and rel_err(out, float64_rows(y0, x, rows, adapters, 1)) < 1e-4


@pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")
def test_gate_buffer_follows_in_place_updates():
    """The Triton tables keep a gate's A_eff, made anew for each batch: an update of a gate tensor, in
    place or through .data (no version counted), is seen by the next batch."""
    torch.manual_seed(5)
    k, n, rows = 24, 16, [0, 1]
    adapters = make_adapters([[("gate", 2)], [("plain", 2)]], k, n)
    tables = adapter_tables(adapters, k, n)
    x, y0 = torch.randn(2, k), torch.randn(2, n)
    multi_adapter_add(y0.clone(), x, adapter_batch(rows, 2), tables, use_triton=True)
    for change in (lambda t: t.mul_(-3.0), lambda t: t.data.add_(0.5)):
        change(adapters[0][0].tensors[2])  # G_id
        y = multi_adapter_add(y0.clone(), x, adapter_batch(rows, 2), tables, use_triton=True)
        assert rel_err(y, float64_rows(y0, x, rows, adapters, 1)) < 1e-4


@pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")
@pytest.mark.parametrize("wrong", [False, True])
def test_default_kernels_are_compared_before_they_are_trusted(wrong, monkeypatch):
    """auto's choice (use_triton=None under auto, the CUDA default: the kernels for CUDA tensors; here
    the interpreter stands in) compares the kernels with the torch path on the first batch of these
    tables: kept when they agree, ruled out with one warning when they differ; every result right
    either way."""
    import warnings

    from sharelora_kernels.ops import multi_adapter, multi_adapter_triton

    ops.set_backend("auto")

    real, calls = multi_adapter_triton.triton_add, []

    def kernels(y, *a):
        calls.append(1)
        real(y, *a)
        if wrong:
            y.mul_(1.5)

    monkeypatch.setattr(multi_adapter, "_default_triton", lambda *a: True)
    monkeypatch.setattr(multi_adapter_triton, "triton_add", kernels)
    torch.manual_seed(0)
    adapters = make_adapters(METHODS[:4], 24, 16)
    tables = adapter_tables(adapters, 24, 16)
    rows = [0, 1, BASE, 2, 3, 1]
    batch = adapter_batch(rows, len(adapters), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            x, y0 = torch.randn(len(rows), 2, 24), torch.randn(len(rows), 2, 16)
            y = multi_adapter_add(y0.clone(), x, batch, tables)
            y_ref = float64_rows(y0, x, rows, adapters, 2)
            assert rel_err(y - y0, y_ref - y0.double()) < TOL[torch.float32]
    differ = [w for w in caught if "differ from the torch path" in str(w.message)]
    assert tables.verified == {torch.float32: not wrong} and len(differ) == int(wrong)
    assert len(calls) == (1 if wrong else 4)  # compared once; then run on every batch, or never again


@pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")
def test_the_backend_setting_picks_the_path(monkeypatch):
    """use_triton=None follows ops.set_backend as a layer does: torch and compose the torch path (on
    CUDA too), triton the kernels uncompared (here under the interpreter) where they take the dtypes,
    auto the CUDA default (the torch path on the CPU)."""
    from sharelora_kernels.ops import multi_adapter, multi_adapter_triton

    calls = []
    for name, module in (("torch", multi_adapter), ("triton", multi_adapter_triton)):
        real = getattr(module, f"{name}_add")
        monkeypatch.setattr(module, f"{name}_add", lambda *a, real=real, name=name: (calls.append(name), real(*a)))
    torch.manual_seed(0)
    adapters = make_adapters(METHODS[:4], 24, 16)
    tables = adapter_tables(adapters, 24, 16)
    rows = [0, 1, BASE, 2, 3, 1]
    batch = adapter_batch(rows, len(adapters), 2)
    x, y0 = torch.randn(len(rows), 2, 24), torch.randn(len(rows), 2, 16)
    y_ref = float64_rows(y0, x, rows, adapters, 2)

    def run(backend, cuda=False, dtype=torch.float32):
        calls.clear()
        ops.set_backend(backend)
        monkeypatch.setattr(multi_adapter, "_default_triton", lambda *a: cuda)  # CUDA tensors: auto's kernels
        y = multi_adapter_add(y0.to(dtype, copy=True), x.to(dtype), batch, tables)
        assert rel_err(y - y0.to(dtype), y_ref - y0.double()) < TOL[torch.float32]
        return calls[:]

    assert run("triton") == ["triton"] and tables.verified == {}
    assert run("triton", dtype=torch.float64) == ["torch"]  # the kernels do not take float64
    assert run("torch", cuda=True) == run("compose", cuda=True) == run(None) == ["torch"]
    assert run("auto") == ["torch"]
    assert run("auto", cuda=True) == ["torch", "triton", "triton"] and tables.verified == {torch.float32: True}
    assert run("auto", cuda=True) == ["triton"]  # compared on the first batch only


def test_torch_stacks_once_per_adapter_set_and_checks_once_per_batch():
    """The torch path stacks each structure group for all its adapters once per batch, whichever subset
    (in any order) it uses: an in-place change is seen by the next batch, while a batch that already
    ran keeps reading the adapters as they were when it started."""
    torch.manual_seed(6)
    k, n = 48, 40
    method = [("plain", 2), ("slice", 3), ("gate", 2), ("kron", 4)]
    adapters = make_adapters([method] * 5, k, n)
    tables = adapter_tables(adapters, k, n)
    x, y0 = torch.randn(6, k), torch.randn(6, n)
    for rows in ([0, 1, 2, 3, 4, BASE], [4, 2, 2, BASE, 0, 4], [3, 1, 3, 1, 1, 3]):
        batch = adapter_batch(rows, 5)
        y = multi_adapter_add(y0.clone(), x, batch, tables, use_triton=False)
        assert rel_err(y - y0, float64_rows(y0, x, rows, adapters, 1) - y0.double()) < TOL[torch.float32]
        assert len(stacks_of([batch], tables)) == 1  # one entry: the group of all five adapters
    rows = [0, 1, 2, 3]
    batch = adapter_batch(rows, 5)
    first = multi_adapter_add(y0[:4].clone(), x[:4], batch, tables, use_triton=False)
    stacks = stacks_of([batch], tables)
    adapters[1][3].tensors[0].mul_(-2.0)  # A_s of adapter 1's Kronecker path, in place
    assert torch.equal(multi_adapter_add(y0[:4].clone(), x[:4], batch, tables, use_triton=False), first)
    assert stacks_of([batch], tables) == stacks  # the batch keeps its stacks
    y = multi_adapter_add(y0[:4].clone(), x[:4], adapter_batch(rows, 5), tables, use_triton=False)
    assert rel_err(y - y0[:4], float64_rows(y0[:4], x[:4], rows, adapters, 1) - y0[:4].double()) < TOL[torch.float32]
    assert not torch.equal(y[1], first[1]) and torch.equal(y[0], first[0])
    alive = weakref.ref(next(iter(stacks.values()))[0][0])  # a stacked copy (the dense paths' A)
    del batch, stacks
    gc.collect()
    assert alive() is None  # the copies go with their batch (the tables kept them after it)


def stacks_of(batches, tables) -> dict:
    """Group key -> the stacked factors the torch path keeps in ``batches`` for a layer's ``tables``."""
    return {slot[2]: value[0] for b in batches for slot, value in b.cache.items()
            if isinstance(slot, tuple) and slot[0] == "stacks" and value[1] is tables.adapters}


def test_torch_decode_rows_in_order_need_no_gather():
    """One row per adapter, rows in adapter order (a decode batch of distinct tenants): the plan reads
    x's rows as they are (no token ids)."""
    k, n = 32, 24
    _, _, _, _, batch = check(list(range(6)), [[("plain", 3), ("kron", 2)]] * 6, k, n, tokens_per_row=2,
                              use_triton=False)
    plan = plan_of(batch)
    (item,) = plan
    assert item[0] == "batched" and item[4] is None  # tokens: x's own rows


# ---------------------------------------------------------------------------------- metadata
def test_batch_metadata_groups_tokens_by_adapter():
    batch = adapter_batch([2, BASE, 0, 2, 0], num_adapters=4, tokens_per_row=2)
    assert batch.num_tokens == 10 and batch.active == (0, 2)
    assert batch.order.tolist() == [4, 5, 8, 9, 0, 1, 6, 7]  # stable, base tokens (2, 3) left out
    assert batch.segments == ((0, 0, 4), (2, 4, 4))
    assert batch.block_m == 16 and batch.tiles.tolist() == [[0, 0, 4], [2, 4, 4]]


def test_decode_tiles_one_per_adapter_and_prefill_tiles_split():
    decode = adapter_batch(list(range(64)), 64)
    assert decode.block_m == 16 and decode.tiles.shape == (64, 3) and set(decode.tiles[:, 2].tolist()) == {1}
    prefill = adapter_batch([0, 1], 2, tokens_per_row=100)
    assert prefill.block_m == 64 and prefill.tiles.tolist() == [[0, 0, 64], [0, 64, 36], [1, 100, 64], [1, 164, 36]]
    assert adapter_batch(torch.tensor([1, 0]), 2).segments == ((0, 0, 1), (1, 1, 1))


# ---------------------------------------------------------------------------------- bad input
def test_bad_batch_input_names_the_problem():
    with pytest.raises(ValueError, match="adapter index 3 out of range for 3 adapters"):
        adapter_batch([0, 3], 3)
    with pytest.raises(ValueError, match="adapter index -2"):
        adapter_batch([-2], 3)
    with pytest.raises(ValueError, match="tokens_per_row"):
        adapter_batch([0], 1, tokens_per_row=0)
    with pytest.raises(ValueError, match="block_m"):
        adapter_batch([0], 1, block_m=48)
    with pytest.raises(ValueError, match="integer tensor"):
        adapter_batch(torch.tensor([0.0]), 1)
    for bad in (0.7, -0.5, True):  # not truncated into an index
        with pytest.raises(ValueError, match=f"row_adapters must hold adapter indices \\(ints\\), got {bad!r}"):
            adapter_batch([0, bad], 2)


def test_bad_tables_name_adapter_and_path():
    good, bad = make_path("plain", 24, 16, 2), make_path("plain", 32, 16, 2)
    with pytest.raises(ValueError, match=r"adapter 1: path 1 \(plain\): A has shape \(2, 32\), expected \(2, 24\)"):
        adapter_tables([[good], [good, bad]], 24, 16)
    with pytest.raises(ValueError, match="adapter 0, path 0: expected a reference.LoRAPath"):
        adapter_tables([[("plain", 2)]], 24, 16)
    for size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"in_features must be a positive int, got {size!r}"):
            adapter_tables([[good]], size, 16)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_linear_checks_its_weight_and_bias_as_lora_linear_does(use_triton):
    """A (1,) bias was broadcast over N; a float16 weight with float32 x failed inside F.linear."""
    k, n = 24, 16
    tables = adapter_tables(make_adapters([[("plain", 2)]], k, n), k, n)
    batch, x, w = adapter_batch([0, BASE], 1, tokens_per_row=2), torch.randn(2, 2, k), torch.randn(n, k)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"bias has shape \(1,\), expected \(N,\) = \(16,\)"):
            multi_adapter_linear(x, w, torch.randn(1), batch, tables, use_triton=use_triton)
        with pytest.raises(ValueError, match="x is torch.float32 but the weight is torch.float16"):
            multi_adapter_linear(x, w.half(), None, batch, tables, use_triton=use_triton)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_bad_call_input_raises_before_work(use_triton):
    k, n = 24, 16
    adapters = make_adapters([[("plain", 2)], [("kron", 2)]], k, n)
    tables, batch = adapter_tables(adapters, k, n), adapter_batch([0, 1, BASE], 2, tokens_per_row=2)
    x, y = torch.randn(3, 2, k), torch.randn(3, 2, n)
    before = y.clone()
    call = lambda **kw: multi_adapter_add(kw.get("y", y), kw.get("x", x), kw.get("batch", batch),
                                          kw.get("tables", tables), use_triton=use_triton)
    with pytest.raises(ValueError, match=r"x has 8 tokens .* 3 rows x 2 tokens = 6: give one adapter index per row"):
        call(x=torch.randn(4, 2, k), y=torch.randn(4, 2, n))
    with pytest.raises(ValueError, match="in_features K=24"):
        call(x=torch.randn(3, 2, k + 1))
    with pytest.raises(ValueError, match="y has shape"):
        call(y=torch.randn(3, 2, n + 1))
    with pytest.raises(ValueError, match="the batch indexes 3 adapters, the tables hold 2"):
        call(batch=adapter_batch([0, 1, 2], 3, tokens_per_row=2))
    with pytest.raises(ValueError, match="floating point"):
        call(x=torch.ones(3, 2, k, dtype=torch.int32))
    with pytest.raises(ValueError, match="y on meta"):
        call(y=torch.empty(3, 2, n, device="meta"))
    with pytest.raises(ValueError, match="batch metadata on meta"):
        call(batch=adapter_batch([0, 1, BASE], 2, tokens_per_row=2, device="meta"))
    with pytest.raises(ValueError, match="batch must come from adapter_batch"):
        call(batch=[0, 1, BASE])
    assert torch.equal(y, before)


@pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")
def test_triton_refuses_mixed_adapter_dtypes_and_float64():
    k, n = 24, 16
    mixed = make_adapters([[("plain", 2)]], k, n) + make_adapters([[("plain", 2)]], k, n, torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        multi_adapter_add(torch.randn(2, n), torch.randn(2, k), adapter_batch([0, 1], 2), adapter_tables(mixed, k, n),
                          use_triton=True)
    x, y0 = torch.randn(2, k, dtype=torch.float64), torch.randn(2, n, dtype=torch.float64)
    y = multi_adapter_add(y0.clone(), x, adapter_batch([0, 1], 2), adapter_tables(mixed, k, n))  # the torch path
    assert rel_err(y - y0, float64_rows(y0, x, [0, 1], mixed, 1) - y0) < 1e-12  # takes both, in float64
    with pytest.raises(ValueError, match="float32, bfloat16, float16; x's compute dtype"):
        multi_adapter_add(y0, x, adapter_batch([0, 0], 1), adapter_tables(mixed[:1], k, n), use_triton=True)


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
def test_refused_with_grad_enabled(use_triton):
    k, n = 24, 16
    adapters = [[make_path("plain", k, n, 2)]]  # requires grad
    tables, batch = adapter_tables(adapters, k, n), adapter_batch([0], 1)
    with pytest.raises(RuntimeError, match="inference only"):
        multi_adapter_add(torch.randn(1, n), torch.randn(1, k), batch, tables, use_triton=use_triton)
    with pytest.raises(RuntimeError, match="inference only"):
        multi_adapter_linear(torch.randn(1, k), torch.randn(n, k), None, batch, tables, use_triton=use_triton)
    with torch.no_grad():
        y = multi_adapter_add(torch.zeros(1, n), torch.randn(1, k), batch, tables, use_triton=use_triton)
    assert y.abs().sum() > 0


def test_adapter_without_paths_everywhere():
    """A bank whose adapters have no paths at all: nothing to add, no kernel launched."""
    tables = adapter_tables([[], []], 24, 16)
    y = torch.randn(2, 16)
    assert torch.equal(multi_adapter_add(y.clone(), torch.randn(2, 24), adapter_batch([0, 1], 2), tables,
                                         use_triton=ops.HAS_TRITON), y)


def test_tables_reject_tensors_on_two_devices():
    a = LoRAPath("plain", (torch.randn(2, 24), torch.randn(16, 2)), 1.0)
    b = LoRAPath("plain", (torch.randn(2, 24, device="meta"), torch.randn(16, 2, device="meta")), 1.0)
    with pytest.raises(ValueError, match="one device"):
        adapter_tables([[a], [b]], 24, 16)


@st.composite
def drawn_batches(draw):
    """(methods, rows, K, N, tokens per row): up to five adapters of up to three paths each (any kind,
    ranks 1-12, an adapter may have none), up to eight rows of them or of the base, K and N
    multiples of the Kronecker block."""
    methods = draw(st.lists(st.lists(st.tuples(st.sampled_from(["plain", "slice", "gate", "kron"]),
                                               st.integers(1, 12)), max_size=3), min_size=1, max_size=5))
    rows = draw(st.lists(st.sampled_from([BASE, *range(len(methods))]), min_size=1, max_size=8))
    k, n = (KRON_D * draw(st.integers(1, 5)) for _ in range(2))
    return methods, rows, k, n, draw(st.integers(1, 5))


@pytest.mark.parametrize("use_triton", BACKENDS, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(case=drawn_batches())
def test_drawn_batches_match_float64(case, use_triton):
    methods, rows, k, n, tokens_per_row = case
    check(rows, methods, k, n, tokens_per_row, use_triton)
