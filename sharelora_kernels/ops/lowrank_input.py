"""Skinny low-rank projection of every path at once: ``h = (dropout(a) @ U^T) * scale``.

a: (M, D) fp32/bf16/fp16, any strides; U: the (R, D) factor rows of a ``FactorTables`` table
(all paths, ranks concatenated); h: (M, R) float32. One pass over ``a`` per rank tile of 64
(one pass in all for R <= 64, the usual case).

Forward: ``h = dropout(x) A_eff^T`` (a = x, the A table, no scale). Backward:
``dh = s * dy B_eff`` (a = dy, the B table, scaled, no dropout).

Why a separate kernel and not the GEMM's K-loop: inside the GEMM every N-tile would redo the
projection (R / BLOCK_N extra tensor-core work, plus a Philox draw per x tile per N-tile with
dropout), and ``h`` is needed for backward anyway. Here ``x`` is read once more (a memory-bound
pass, small next to the compute-bound base GEMM) and the mask is drawn once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (dot_precision, dropout_keep, index64, load_factor, mma, needs_int64_index, pick_configs, rank_block,
                    rng_needs_int64)

_CONFIGS = pick_configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
     for bm, bd, w, s in ((64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (32, 128, 4, 4))],
    triton.Config({"BLOCK_M": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_CONFIGS, key=["D", "R", "M_BUCKET"])
@triton.jit
def _lowrank_project_kernel(
    a_ptr, table_ptr, scale_ptr, out_ptr, seed_ptr, p,
    M, D, R, M_BUCKET,
    stride_am, stride_ad, stride_om, stride_or,
    DROPOUT: tl.constexpr, APPLY_SCALE: tl.constexpr, RNG64: tl.constexpr, INT64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    rank_mask = ranks < R
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    dtype = a_ptr.dtype.element_ty
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        a = tl.load(a_rows + index64(cols, INT64)[None, :] * stride_ad, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed, rows, cols, D, p, RNG64)
            a = tl.where(keep, a.to(tl.float32) / (1.0 - p), 0.0).to(dtype)
        u = load_factor(table_ptr, ranks, rank_mask, cols, col_mask, dtype, FACTOR_DTYPE, PERIODIC)
        acc = mma(a, tl.trans(u), acc, DOT_PRECISION)
    if APPLY_SCALE:
        acc = acc * tl.load(scale_ptr + ranks, mask=rank_mask, other=0.0)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + ranks[None, :] * stride_or
    tl.store(out, acc, mask=row_mask[:, None] & rank_mask[None, :])


def lowrank_project(a: Tensor, table: Tensor, factor_dtype: tl.dtype, periodic: bool, scale: Tensor | None = None,
                    dropout_p: float = 0.0, seed: Tensor | None = None) -> Tensor:
    """``(dropout(a) @ U^T) * scale`` as an (M, R) float32 tensor.

    a: (M, D); table: (R, 5) int64 factor table over D with factor_dtype elements (``periodic``: it
    may hold Kronecker rows);
    scale: (R,) float32 or None;
    seed: int64 tensor of one element on a's device, used when ``dropout_p > 0``.
    """
    m, d = a.shape
    r = table.shape[0]
    out = torch.empty((m, r), device=a.device, dtype=torch.float32)
    if m == 0 or r == 0:
        return out
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))
    _lowrank_project_kernel[grid](
        a, table, scale if scale is not None else table, out, seed if seed is not None else table, dropout_p,
        m, d, r, triton.next_power_of_2(m),
        a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        DROPOUT=dropout_p > 0, APPLY_SCALE=scale is not None, RNG64=rng_needs_int64(m, d),
        INT64=needs_int64_index(a), DOT_PRECISION=dot_precision(a.dtype), FACTOR_DTYPE=factor_dtype, PERIODIC=periodic, BLOCK_R=block_r,
    )
    return out
