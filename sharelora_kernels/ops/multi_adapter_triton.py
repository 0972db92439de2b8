"""Triton path of the multi-adapter op (``ops.multi_adapter``): two launches over every adapter segment.

Shapes: x (M, K) in the compute dtype c (fp32 / bf16 / fp16), any strides; y (M, N) the base's
output (fp32 / bf16 / fp16), updated in place; every adapter tensor of one dtype (it may differ from
c); all sums in fp32. The batch metadata (``multi_adapter.AdapterBatch``) gives ``order`` (token ids
sorted by adapter, base rows left out) and the tile list (adapter, start, count <= BLOCK_M) into it;
the bank tables (``BankTables``) give every adapter's factor rows, adapter a's at rows
``ranks[a] .. ranks[a + 1]`` (``tables.build_tables`` rows: slice offsets, Kronecker kernels, gate
``A_eff`` buffers).

  1. shrink (``_shrink_kernel``): ``h[s] = x[order[s]] A_eff(a)^T`` (M_active, R_max) fp32, one
     program per (tile, rank tile, K split): the tile's rows of x gathered through ``order``, the
     adapter's A_eff rows through the table (Kronecker rows folded while loading, gate A_eff = C G_id):
     each adapter's tensors are read once per tile. The K reduction is split over programs when the
     tiles alone would not fill the GPU (decode with few adapters): fp32 partials summed in order
     (deterministic).
  2. expand (``_expand_kernel``): ``y[order[s]] += (h[s] * scale) B_eff(a)^T``, one program per
     (tile, N tile): ``gemm_tiles.lowrank_tile`` with the adapter's B table (slice offset, gate
     ``G_ou``, Kronecker tiling by ``K_B``), then the tile's rows of y are read, added to and written
     back in place (each token belongs to one tile: no atomics, no (M, N) temporary).

Decode (one token per row): tiles of 16 rows (tl.dot's smallest) hold one adapter's few tokens each;
programs exist only for adapters with rows. Prefill: tiles of up to 64 rows, several per segment.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import LoRAPath
from .autotune import sm_count
from .gemm_tiles import LOWRANK_CHUNK, lowrank_tile
from .tables import build_tables, gate_a_eff
from .utils import INTERPRET, TL_DTYPES, cdiv, dot_precision, load_factor, mma, on_device


@triton.jit(do_not_specialize=["K_STEPS"])
def _shrink_kernel(
    x_ptr, order_ptr, tile_ptr, rank_ptr, table_ptr, h_ptr,
    K, K_STEPS, stride_xm, stride_xk, stride_hs, stride_hm,
    DOT_PRECISION: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """h[split, start + i, ranks] = x[order[start + i], K slice] @ A_eff(adapter)[ranks, K slice]^T
    for tile (adapter, start, count) = tile_ptr[program 0]; K slice = program 2's K_STEPS x BLOCK_K
    columns (split starts stay BLOCK_K-aligned: the x loads keep their 16-byte vectors)."""
    tile = tile_ptr + tl.program_id(0) * 3
    adapter, start, count = tl.load(tile), tl.load(tile + 1), tl.load(tile + 2)
    r0 = tl.load(rank_ptr + adapter)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_mask = ranks < tl.load(rank_ptr + adapter + 1) - r0
    lanes = tl.arange(0, BLOCK_M)
    row_mask = lanes < count
    pos = (start + lanes).to(tl.int64)
    tokens = tl.load(order_ptr + pos, mask=row_mask, other=0)
    x_rows = x_ptr + tokens[:, None] * stride_xm
    k_first = tl.program_id(2) * K_STEPS * BLOCK_K
    k_last = tl.minimum(k_first + K_STEPS * BLOCK_K, K)
    k_last = tl.where(tl.program_id(1) * BLOCK_R < tl.load(rank_ptr + adapter + 1) - r0, k_last, k_first)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_first, k_last, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K  # (a split's own end is a multiple of BLOCK_K)
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        u = load_factor(table_ptr + r0 * 5, ranks, rank_mask, ks, k_mask, x_ptr.dtype.element_ty, FACTOR_DTYPE,
                        PERIODIC)
        acc = mma(x, tl.trans(u), acc, DOT_PRECISION)
    out = h_ptr + tl.program_id(2) * stride_hs + pos[:, None] * stride_hm + ranks[None, :]
    tl.store(out, acc, mask=row_mask[:, None] & rank_mask[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, order_ptr, tile_ptr, rank_ptr, table_ptr, scale_ptr, y_ptr,
    N, stride_hm, stride_ym, stride_yn,
    DOT_PRECISION: tl.constexpr, DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[order[start + i], cols] += (h[start + i, :R_a] * scale) @ B_eff(adapter)^T[:, cols] for tile
    (adapter, start, count) = tile_ptr[program 0], cols = program 1's BLOCK_N columns; MMA in DTYPE."""
    tile = tile_ptr + tl.program_id(0) * 3
    adapter, start, count = tl.load(tile), tl.load(tile + 1), tl.load(tile + 2)
    r0 = tl.load(rank_ptr + adapter)
    lanes = tl.arange(0, BLOCK_M)
    row_mask = lanes < count
    pos = (start + lanes).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = lowrank_tile(h_ptr, h_ptr, table_ptr + r0 * 5, scale_ptr + r0, h_ptr, 0.0, 0, pos, row_mask,
                       tl.program_id(1) * BLOCK_N, cols, col_mask, N, tl.load(rank_ptr + adapter + 1) - r0, stride_hm,
                       1, False, True, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, DTYPE, FACTOR_DTYPE, PERIODIC)
    tokens = tl.load(order_ptr + pos, mask=row_mask, other=0)
    out = y_ptr + tokens[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = row_mask[:, None] & col_mask[None, :]
    acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch settings
def shrink_rank_tile(block_m: int, r_max: int, elem_bytes: int) -> int:
    """Ranks per shrink program: 64 for 64-row tiles of a 16-bit x when r_max > 16, else 16 (decode:
    re-reading a tile's few x rows per rank tile is cheap; wider gathers of Kronecker factor rows
    spill next to a small or float32 MMA, compile_check)."""
    return 64 if block_m == 64 and r_max > 16 and elem_bytes == 2 else 16


def shrink_config(elem_bytes: int, block_r: int, block_m: int) -> dict:
    """x rows are gathered (one token id per row), A_eff rows through the table: with 16-rank tiles
    128 columns of a 16-bit x per step (32 of a float32 one), 8 warps from 32 (64) rows on; 64
    columns with 64-rank tiles (the tiles that compile without spills, compile_check)."""
    if INTERPRET:
        return {"BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    if elem_bytes == 4:
        return {"BLOCK_K": 32, "num_warps": 8 if block_m == 64 else 4, "num_stages": 3}
    if block_r == 16:
        return {"BLOCK_K": 128, "num_warps": 8 if block_m >= 32 else 4, "num_stages": 3}
    return {"BLOCK_K": 64, "num_warps": 4, "num_stages": 4}


def expand_config(block_m: int) -> dict:
    """y is read and written once per tile; the low-rank MMA is small: 128 columns, 4 warps for
    16 / 32-row tiles, 8 for 64."""
    if INTERPRET:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 128, "num_warps": 4 if block_m <= 32 else 8, "num_stages": 3}


def k_splits(programs: int, k: int, block_k: int, device: torch.device) -> int:
    """Programs sharing the K reduction of the shrink: about two waves on the GPU when the tiles
    alone would leave SMs idle, each split at least 4 BLOCK_K steps (1 step under the interpreter)."""
    steps = cdiv(k, block_k if INTERPRET else 4 * block_k)
    return max(1, min(cdiv(2 * sm_count(device), max(programs, 1)), steps))


# ----------------------------------------------------------------------------- bank tables
@dataclass(eq=False)
class BankTables:
    """Every adapter's factor tables concatenated: ``a`` (R_sum, 5) rows of A_eff over K, ``b``
    (R_sum, 5) columns of B_eff over N, ``scale`` (R_sum,) fp32, ``ranks`` (A + 1,) int32 adapter a's
    first row (``ranks[a + 1] - ranks[a]`` its rank), ``r_max`` the largest rank, ``dtype`` the Triton
    dtype of the adapter tensors, ``periodic`` whether any row is Kronecker, ``gates`` one
    (path, A_eff buffer) per gate path (the buffer recomputed at the first call of each batch: the
    gate's tensors as they are when the batch starts, whatever their version counters say)."""

    a: Tensor
    b: Tensor
    scale: Tensor
    ranks: Tensor
    r_max: int
    dtype: tl.dtype
    periodic: bool
    gates: list
    batch: Callable[[], object] = lambda: None  # the batch the gate buffers were computed for (a weak reference)

    def refreshed(self, batch) -> "BankTables":
        """Self, its gate buffers recomputed unless they were for ``batch`` already."""
        if self.batch() is not batch:
            for path, buffer in self.gates:
                buffer.copy_(gate_a_eff(path))
            self.batch = weakref.ref(batch)
        return self


def build_bank_tables(adapters: tuple[tuple[LoRAPath, ...], ...]) -> BankTables:
    """The bank tables of ``adapters`` (validated, one dtype) on their tensors' device."""
    tensors = [t for paths in adapters for p in paths for t in p.tensors]
    device = tensors[0].device if tensors else torch.device("cpu")
    a_rows, b_rows, scales, gates, ranks = [], [], [], [], [0]
    for paths in adapters:
        if paths:
            ft = build_tables(paths, device)
            a_rows.append(ft.a)
            b_rows.append(ft.b)
            scales.append(ft.scale)
            gates += [(paths[i], buffer) for i, buffer in ft.gates]
        ranks.append(ranks[-1] + sum(p.rank for p in paths))
    cat = lambda parts, shape, dtype: torch.cat(parts) if parts else torch.empty(shape, dtype=dtype, device=device)
    widths = [b - a for a, b in zip(ranks, ranks[1:])]
    return BankTables(cat(a_rows, (0, 5), torch.int64), cat(b_rows, (0, 5), torch.int64),
                      cat(scales, (0,), torch.float32), torch.tensor(ranks, dtype=torch.int32).to(device),
                      max(widths, default=0), TL_DTYPES.get(tensors[0].dtype) if tensors else tl.float32,
                      any(p.kind == "kron" for paths in adapters for p in paths), gates)


# ----------------------------------------------------------------------------- launcher
def triton_add(y: Tensor, x: Tensor, batch, bank: BankTables) -> None:
    """y (M, N) += each token's adapter paths of x (M, K) in place, over ``batch``'s tiles (an
    ``AdapterBatch`` with at least one segment)."""
    if bank.r_max == 0:
        return
    m_active, n, k = batch.order.shape[0], y.shape[1], x.shape[1]
    num_tiles, block_m = batch.tiles.shape[0], batch.block_m
    block_r = shrink_rank_tile(block_m, bank.r_max, x.element_size())
    cfg = shrink_config(x.element_size(), block_r, block_m)
    rank_tiles = cdiv(bank.r_max, block_r)
    splits = k_splits(num_tiles * rank_tiles, k, cfg["BLOCK_K"], x.device)
    k_steps = cdiv(cdiv(k, splits), cfg["BLOCK_K"])
    splits = cdiv(k, k_steps * cfg["BLOCK_K"])
    h = torch.empty((splits, m_active, bank.r_max), device=x.device, dtype=torch.float32)
    with on_device(x):
        _shrink_kernel[(num_tiles, rank_tiles, splits)](
            x, batch.order, batch.tiles, bank.ranks, bank.a, h,
            k, k_steps, x.stride(0), x.stride(1), h.stride(0), h.stride(1),
            DOT_PRECISION=dot_precision(x.dtype), FACTOR_DTYPE=bank.dtype, PERIODIC=bank.periodic,
            BLOCK_M=block_m, BLOCK_R=block_r, **cfg,
        )
    h = h[0] if splits == 1 else h.sum(0)
    cfg = expand_config(block_m)
    with on_device(x):
        _expand_kernel[(num_tiles, cdiv(n, cfg["BLOCK_N"]))](
            h, batch.order, batch.tiles, bank.ranks, bank.b, bank.scale, y,
            n, h.stride(0), y.stride(0), y.stride(1),
            DOT_PRECISION=dot_precision(x.dtype), DTYPE=TL_DTYPES[x.dtype], FACTOR_DTYPE=bank.dtype,
            PERIODIC=bank.periodic, BLOCK_M=block_m, BLOCK_R=LOWRANK_CHUNK, **cfg,
        )
