"""Both low-rank gradients that read the output gradient, from one pass over dy (LoRAFusion's split):

    dh       = (dy @ B_eff) * s        (M, R) float32    (input of dx and dA)
    dB_eff^T = (h * s)^T @ dy          (R, N) float32

dy: (M, N) fp32/bf16/fp16, any strides; h: (M, R) float32 (the forward's, saved); B_eff through
the B factor table (``tables``), s the per-rank scale. Each dy tile is loaded once and feeds both
products.

Grid (S_m, S_n, rank tiles): program (i, j) owns the i-th chunk of rows and the j-th chunk of
columns. It walks its column tiles; for each it keeps the dB tile in registers over its rows
(written once, into slab i of an (S_m, R, N) partial) and adds each row block's dh into slab j of
an (S_n, M, R) partial (its first column tile writes the block, later ones read-modify-write it: a
small fp32 block, resident in L2; no zero-filled buffer). Both partials are
then summed over their slabs in a fixed order (``lowrank_grad.reduce_splits``): bitwise
reproducible, and S_m x S_n programs fill the GPU where one program per (R, N) tile would not.
Launch settings: ``autotune.dy_config`` and ``autotune.m_splits``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .autotune import dy_config, m_splits
from .lowrank_grad import reduce_splits, split_buffer
from .utils import cdiv, dot_precision, index64, load_factor, memo, mma, needs_int64_index, on_device, rank_block

MAX_N_SPLITS = 8  # column chunks: each adds an (M, R) fp32 slab of dh to reduce


@triton.jit(do_not_specialize=["M", "M_CHUNK"])
def _dy_lowrank_kernel(
    dy_ptr, h_ptr, table_ptr, scale_ptr, dh_ptr, db_ptr,
    M, N, R, M_CHUNK, N_CHUNK,
    stride_ym, stride_yn, stride_hm, stride_hr, stride_dhs, stride_dhm, stride_dhr, stride_dbs, stride_dbr, stride_dbn,
    INT64: tl.constexpr, DOT_PRECISION: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_mask = ranks < R
    scale = tl.load(scale_ptr + ranks, mask=rank_mask, other=0.0)
    m_start = pid_m * M_CHUNK
    m_end = tl.minimum(M, m_start + M_CHUNK)
    n_start = pid_n * N_CHUNK
    n_end = tl.minimum(N, n_start + N_CHUNK)
    dtype = dy_ptr.dtype.element_ty
    for n0 in range(n_start, n_end, BLOCK_D):
        cols = n0 + tl.arange(0, BLOCK_D)
        col_mask = cols < n_end
        u = load_factor(table_ptr, ranks, rank_mask, cols, col_mask, dtype, FACTOR_DTYPE, PERIODIC)  # (BLOCK_R, BLOCK_D)
        acc_b = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_mask = rows < m_end
            rows64 = rows.to(tl.int64)
            dy = tl.load(dy_ptr + rows64[:, None] * stride_ym + index64(cols, INT64)[None, :] * stride_yn,
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            hs = tl.load(h_ptr + rows64[:, None] * stride_hm + ranks[None, :] * stride_hr,
                         mask=row_mask[:, None] & rank_mask[None, :], other=0.0) * scale[None, :]
            if dtype == tl.float16:  # h may exceed float16's range: tf32 operands keep it
                acc_b = mma(tl.trans(hs), dy.to(tl.float32), acc_b, "tf32")
            else:
                acc_b = mma(tl.trans(hs.to(dtype)), dy, acc_b, DOT_PRECISION)
            dh = mma(dy, tl.trans(u), tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), DOT_PRECISION)
            dh_ptrs = dh_ptr + pid_n.to(tl.int64) * stride_dhs + rows64[:, None] * stride_dhm + ranks[None, :] * stride_dhr
            dh_mask = row_mask[:, None] & rank_mask[None, :]
            # the first column tile writes the slab (no zero-filled buffer), the later ones add to it
            # (the tile test as a (1, BLOCK_R) block: a scalar in a mask is int32 in Triton 3.9's interpreter)
            later = (ranks * 0 + n0 > n_start)[None, :]
            tl.store(dh_ptrs, tl.load(dh_ptrs, mask=dh_mask & later, other=0.0) + dh * scale[None, :],
                     mask=dh_mask)
        tl.store(db_ptr + pid_m.to(tl.int64) * stride_dbs + ranks[:, None] * stride_dbr + cols[None, :] * stride_dbn, acc_b,
                 mask=rank_mask[:, None] & col_mask[None, :])


def dy_lowrank(dy: Tensor, h: Tensor, table: Tensor, scale: Tensor, factor_dtype: tl.dtype, periodic: bool,
               splits: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """(dh (M, R), dB_eff^T (R, N)), both float32, from one read of dy (M, N).

    table: (R, 5) int64 B factor table over N with factor_dtype elements (``periodic``: it may hold
    Kronecker rows); scale: (R,) float32; ``splits``: (S_m, S_n) programs over rows and columns
    (default from the shape, see the module docstring).
    """
    m, n = dy.shape
    r = h.shape[1]
    if m == 0 or n == 0:
        return torch.zeros((m, r), device=dy.device, dtype=torch.float32), torch.zeros((r, n), device=dy.device,
                                                                                         dtype=torch.float32)
    device = dy.device
    grid, m_chunk, n_chunk, block_r, config = memo(_GEOMETRY, (m, n, r, device, splits),
                                                   lambda: geometry(m, n, r, device, splits))
    dh, dh_strides = split_buffer(grid[1], m, r, device)  # every slab written (its first column tile)
    db, db_strides = split_buffer(grid[0], r, n, device)
    with on_device(dy):
        _dy_lowrank_kernel[grid](
            dy, h, table, scale, dh, db,
            m, n, r, m_chunk, n_chunk,
            *dy.stride(), *h.stride(), *dh_strides, *db_strides,
            INT64=needs_int64_index(dy), DOT_PRECISION=dot_precision(dy.dtype), FACTOR_DTYPE=factor_dtype,
            PERIODIC=periodic, BLOCK_R=block_r, **config,
        )
    return reduce_splits(dh), reduce_splits(db)


_GEOMETRY: dict[tuple, tuple] = {}


def geometry(m: int, n: int, r: int, device: torch.device,
             splits: tuple[int, int] | None) -> tuple[tuple[int, int, int], int, int, int, dict]:
    """(grid (S_m, S_n, rank tiles), M_CHUNK, N_CHUNK, BLOCK_R, config) of the dy pass over an
    (M, N) dy at rank r: a function of the shapes (``dy_lowrank`` keeps one per shape)."""
    block_r = rank_block(r)
    config = dy_config(block_r)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_D"]
    n_tiles = cdiv(n, block_n)
    s_n = min(n_tiles, MAX_N_SPLITS) if splits is None else min(splits[1], n_tiles)
    n_chunk = cdiv(n_tiles, s_n) * block_n
    s_n = cdiv(n, n_chunk)
    r_tiles = cdiv(r, block_r)
    s_m = m_splits(m, s_n * r_tiles, block_m, device) if splits is None else splits[0]
    m_chunk = cdiv(cdiv(m, min(s_m, cdiv(m, block_m))), block_m) * block_m
    s_m = cdiv(m, m_chunk)
    return (s_m, s_n, r_tiles), m_chunk, n_chunk, block_r, config
