"""Skinny low-rank projection of every path at once: ``h = dropout(x) @ A_eff^T``.

x: (M, K) fp32/bf16/fp16, any strides; A_eff: the (R, K) factor rows of a ``tables.FactorTables``
A table (all paths, ranks concatenated); h: (M, R) float32. One pass over ``x`` per rank tile of 64
(one pass in all for R <= 64, the usual case).

This is where the layer's one dropout mask is drawn (``utils.draw_keep``: four decisions per
Philox call) and stored bit-packed (``utils.pack_keep``) for backward, which reads it and draws
nothing. Backward's ``dh = s * dy B_eff``
comes from the dy pass (``dy_lowrank``), which also computes dB from the same read of dy.

Why a separate kernel and not the GEMM's K-loop: inside the GEMM every N-tile would redo the
projection (R / BLOCK_N extra tensor-core work, plus a mask draw per x tile per N-tile), and ``h``
is needed for backward anyway. Here ``x`` is read once more (a memory-bound pass, small next to the
compute-bound base GEMM) and the mask is drawn once. Launch settings: ``autotune.project_config``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .autotune import project_config
from .utils import (cdiv, dot_precision, draw_keep, index64, load_factor, mask_words, memo, mma, needs_int64_index,
                    on_device, pack_keep, rank_block, rng_needs_int64)


@triton.jit(do_not_specialize=["M"])
def _lowrank_project_kernel(
    a_ptr, table_ptr, out_ptr, seed_ptr, mask_ptr, p,
    M, D, R,
    stride_am, stride_ad, stride_om, stride_or, stride_mm,
    DROPOUT: tl.constexpr, RNG64: tl.constexpr, INT64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    rank_mask = ranks < R
    rows64 = rows.to(tl.int64)
    a_rows = a_ptr + rows64[:, None] * stride_am
    dtype = a_ptr.dtype.element_ty
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        a = tl.load(a_rows + index64(cols, INT64)[None, :] * stride_ad, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            keep = draw_keep(seed, rows, d0, D, p, BLOCK_M, BLOCK_D, RNG64)
            a = (a.to(tl.float32) * (keep.to(tl.float32) / (1.0 - p))).to(dtype)  # x * mask / (1 - p): NaN stays NaN
            if pid_r == 0:  # every rank tile draws the same mask; the first one stores it
                words = d0 // 32 + tl.arange(0, BLOCK_D // 32)
                tl.store(mask_ptr + rows64[:, None] * stride_mm + words[None, :], pack_keep(keep, BLOCK_M, BLOCK_D),
                         mask=row_mask[:, None] & (words < tl.cdiv(D, 32))[None, :])
        u = load_factor(table_ptr, ranks, rank_mask, cols, col_mask, dtype, FACTOR_DTYPE, PERIODIC)
        acc = mma(a, tl.trans(u), acc, DOT_PRECISION)
    out = out_ptr + rows64[:, None] * stride_om + ranks[None, :] * stride_or
    tl.store(out, acc, mask=row_mask[:, None] & rank_mask[None, :])


def lowrank_project(a: Tensor, table: Tensor, factor_dtype: tl.dtype, periodic: bool, dropout_p: float = 0.0,
                    seed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``dropout(a) @ U^T`` as an (M, R) float32 tensor, and the mask it applied.

    a: (M, D); table: (R, 5) int64 factor table over D with factor_dtype elements (``periodic``: it
    may hold Kronecker rows); seed: int64 tensor of one element on a's device, used when
    ``dropout_p > 0``. The mask is the (M, ceil(D / 32)) int32 bit-packed keep
    mask (``utils``) when ``dropout_p > 0``, else an empty tensor.
    """
    m, d = a.shape
    r = table.shape[0]
    out = torch.empty((m, r), device=a.device, dtype=torch.float32)
    dropout = dropout_p > 0
    mask = torch.empty((m, mask_words(d)) if dropout else (0,), device=a.device, dtype=torch.int32)
    if m == 0 or r == 0:
        return out, mask
    grid, block_r, config = memo(_GEOMETRY, (m, d, r, a.element_size()), lambda: geometry(m, d, r, a.element_size()))
    with on_device(a):
        _lowrank_project_kernel[grid](
            a, table, out, seed if seed is not None else table, mask, dropout_p,
            m, d, r,
            *a.stride(), *out.stride(), mask.stride(0) if dropout else 0,
            DROPOUT=dropout, RNG64=rng_needs_int64(m, d),
            INT64=needs_int64_index(a), DOT_PRECISION=dot_precision(a.dtype), FACTOR_DTYPE=factor_dtype, PERIODIC=periodic,
            BLOCK_R=block_r, **config,
        )
    return out, mask


_GEOMETRY: dict[tuple, tuple] = {}


def geometry(m: int, d: int, r: int, elem_bytes: int) -> tuple[tuple[int, int], int, dict]:
    """(grid (M tiles, rank tiles), BLOCK_R, config) of the projection of an (M, D) input at rank r:
    a function of the shapes (kept one per shape)."""
    block_r = rank_block(r)
    config = project_config(m, d, elem_bytes, block_r)
    return (cdiv(m, config["BLOCK_M"]), cdiv(r, block_r)), block_r, config
