"""Tile-level pieces of the fused GEMM kernels (pointer, TMA and grouped): the tile order, the
low-rank term of a tile, and the pointer-load base-GEMM loop."""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import index64, load_factor, load_keep, mma

# Ranks per chunk of a GEMM tile's low-rank term: a (BLOCK_R, BLOCK_N) gather of B_eff (64-bit
# addresses per element with Kronecker rows) stays small next to the accumulator, so no tile of
# the perf lists spills whatever R is (larger chunks do, see compile_check); R > 16 loops.
LOWRANK_CHUNK = 16


@triton.jit
def tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile ``tile`` of an (M, N) output, GROUP_M row tiles at a time (L2 reuse): its (pid_m, pid_n),
    rows (int64) and row mask, columns and column mask."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    first_m = (tile // (GROUP_M * grid_n)) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * grid_n)) % group_size
    pid_n = (tile % (GROUP_M * grid_n)) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, rows.to(tl.int64), rows < M, cols, cols < N


@triton.jit
def _lowrank_chunk(acc, r0, h_ptr, hcol_ptr, table_ptr, scale_ptr, rows64, row_mask, cols, col_mask, R, stride_hm,
                   stride_hr, HCOLS: tl.constexpr, APPLY_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_R: tl.constexpr, DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr):
    """acc + ranks r0 .. r0 + BLOCK_R of the low-rank term (see ``lowrank_tile``)."""
    ranks = r0 + tl.arange(0, BLOCK_R)
    rank_mask = ranks < R
    h_cols = tl.load(hcol_ptr + ranks, mask=rank_mask, other=0) if HCOLS else ranks
    h = tl.load(h_ptr + rows64[:, None] * stride_hm + h_cols[None, :] * stride_hr,
                mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
    if APPLY_SCALE:
        h = h * tl.load(scale_ptr + ranks, mask=rank_mask, other=0.0)[None, :]
    if DTYPE == tl.float16:
        u = load_factor(table_ptr, ranks, rank_mask, cols, col_mask, tl.float32, FACTOR_DTYPE, PERIODIC)
        return mma(h, u, acc, "tf32")
    u = load_factor(table_ptr, ranks, rank_mask, cols, col_mask, DTYPE, FACTOR_DTYPE, PERIODIC)
    return mma(h.to(DTYPE), u, acc, DOT_PRECISION)


@triton.jit
def lowrank_tile(h_ptr, hcol_ptr, table_ptr, scale_ptr, mask_ptr, p, stride_mm, rows64, row_mask, col0, cols, col_mask,
                 N, R, stride_hm, stride_hr, HCOLS: tl.constexpr, APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr, R_CHUNKS: tl.constexpr = -1):
    """The tile's low-rank term ``(h[rows] * scale) @ U[:, cols]`` (fp32): h (M, R) fp32 (HCOLS: its
    rank j is column ``hcol[j]`` (int32) of a wider h), U (R, N) gathered through the factor table
    (``cols = col0 + arange(BLOCK_N)``); masked by the bit-packed dropout mask of the (M, N) output
    coordinates when DROPOUT (dx: the mask of x), divided by 1 - p.

    The MMA takes DTYPE operands, except for a float16 base: h may exceed float16's range (65504)
    where the output does not, so it stays float32 (tf32 operands: float16's mantissa, fp32's range).
    Computed before the base K-loop, which accumulates onto it: one accumulator, also when the mask
    applies to the low-rank term only. R_CHUNKS >= 0 (cdiv(R, BLOCK_R), a compile-time count): the
    chunks are unrolled, no loop, so a persistent kernel's tile loop keeps a single inner loop (its
    K loop) and the compiler flattens the two (``tl.range(flatten=True)`` fuses only such nests);
    -1: a run-time loop over R.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if R_CHUNKS >= 0:
        for c in tl.static_range(R_CHUNKS):
            acc = _lowrank_chunk(acc, c * BLOCK_R, h_ptr, hcol_ptr, table_ptr, scale_ptr, rows64, row_mask, cols,
                                 col_mask, R, stride_hm, stride_hr, HCOLS, APPLY_SCALE, DOT_PRECISION, BLOCK_R, DTYPE,
                                 FACTOR_DTYPE, PERIODIC)
    else:
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined: its gathers would stay live
            acc = _lowrank_chunk(acc, r0, h_ptr, hcol_ptr, table_ptr, scale_ptr, rows64, row_mask, cols, col_mask, R,
                                 stride_hm, stride_hr, HCOLS, APPLY_SCALE, DOT_PRECISION, BLOCK_R, DTYPE, FACTOR_DTYPE,
                                 PERIODIC)
    if DROPOUT:
        keep = load_keep(mask_ptr, stride_mm, rows64, row_mask, col0, N, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    return acc


@triton.jit
def matmul_tile(acc, a_ptr, stride_am, stride_ak, w_ptr, stride_wk, stride_wn, rows64, row_mask, cols, col_mask, K,
                DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, INT64: tl.constexpr):
    """acc + a[rows, :K] @ w[:K, cols]: the base GEMM's K-loop for one output tile, pointer loads
    (INT64: column and K offsets in int64)."""
    cols = index64(cols, INT64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        ks = index64(ks, INT64)
        a = tl.load(a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(a, w, acc, DOT_PRECISION)
    return acc


@triton.jit
def epilogue(acc, bias_ptr, out_ptr, rows64, row_mask, cols, col_mask, stride_om, stride_on, HAS_BIAS: tl.constexpr):
    """Add the bias and store the tile in the output's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
