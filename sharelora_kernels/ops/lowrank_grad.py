"""Gradient of the effective low-rank factors: ``G = g^T @ dropout(a)``, reduced over the M tokens.

g: (M, R) float32; a: (M, D) fp32/bf16/fp16, any strides; G: (R, D) float32.
``dA_eff = dh^T dropout(x)`` (g = dh, a = x, with the forward's mask regenerated from the seed)
and ``dB_eff^T = (s h)^T dy`` (g = s h, a = dy, no dropout). The per-path chain to the shared
parameters (slice window, Kronecker fold, gate core) is tiny torch work.

Two output modes:
  dense   G is a new (R, D) tensor; each program owns one (R, D) tile and loops over all of M,
          so it is written once, deterministically.
  table   row i of G is *added* into the fp32 vector that row i of an ``out_table`` (factor
          table format, only ``base`` and ``stride`` read) points at: a window of a shared
          gradient buffer (``shared_grad``). Deterministic: one program per tile, load + add +
          store. ``atomic=True`` also splits M over several programs that ``tl.atomic_add``
          (more parallel when R x D has few tiles; the order of fp32 additions then varies).
          The rows of one launch must point at disjoint memory unless ``atomic``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (INTERPRET, dot_precision, dropout_keep, index64, mma, needs_int64_index, pick_configs, rank_block,
                    rng_needs_int64)

_CONFIGS = pick_configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
     for bm, bd, w, s in ((64, 32, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 4))],
    triton.Config({"BLOCK_M": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1),
)

_TABLE_CONFIG = ({"BLOCK_M": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1} if INTERPRET else
                 {"BLOCK_M": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4})


@triton.autotune(configs=_CONFIGS, key=["D", "R", "M_BUCKET"])
@triton.jit
def _lowrank_grad_kernel(
    g_ptr, a_ptr, out_ptr, seed_ptr, p,
    M, D, R, M_BUCKET, M_CHUNK,
    stride_gm, stride_gr, stride_am, stride_ad, stride_or, stride_od,
    DROPOUT: tl.constexpr, RNG64: tl.constexpr, INT64: tl.constexpr, DOT_PRECISION: tl.constexpr, TABLE_OUT: tl.constexpr,
    ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    m_start = tl.program_id(2) * M_CHUNK
    m_end = tl.minimum(M, m_start + M_CHUNK)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_mask = cols < D
    rank_mask = ranks < R
    dtype = a_ptr.dtype.element_ty
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < m_end
        rows64 = rows.to(tl.int64)[:, None]
        a = tl.load(a_ptr + rows64 * stride_am + index64(cols, INT64)[None, :] * stride_ad,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed, rows, cols, D, p, RNG64)
            a = tl.where(keep, a.to(tl.float32) / (1.0 - p), 0.0).to(dtype)
        g = tl.load(g_ptr + rows64 * stride_gm + ranks[None, :] * stride_gr,
                    mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        if dtype == tl.float16:  # g may exceed float16's range: tf32 operands keep it
            acc = mma(tl.trans(g), a.to(tl.float32), acc, "tf32")
        else:
            acc = mma(tl.trans(g.to(dtype)), a, acc, DOT_PRECISION)
    mask = rank_mask[:, None] & col_mask[None, :]
    if TABLE_OUT:  # out_ptr is the (R, 5) int64 table: add into the vector each row points at
        row = out_ptr + ranks * 5
        base = tl.load(row, mask=rank_mask, other=0)
        stride = tl.load(row + 1, mask=rank_mask, other=0)
        out = base.to(tl.pointer_type(tl.float32))[:, None] + cols[None, :] * stride[:, None]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=mask)
        else:
            tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)
    else:
        tl.store(out_ptr + ranks[:, None] * stride_or + cols[None, :] * stride_od, acc, mask=mask)


def _m_chunk(m: int, d: int, r: int, atomic: bool) -> int:
    """Rows of M per program: all of M, or in atomic mode a multiple of 128 (every BLOCK_M divides it)
    sized for ~256 programs in all (estimated with 64-wide D tiles), each with >= 512 rows."""
    if not atomic:
        return m
    split = max(1, min(triton.cdiv(256, triton.cdiv(d, 64) * triton.cdiv(r, rank_block(r))), triton.cdiv(m, 512)))
    return triton.cdiv(triton.cdiv(m, split), 128) * 128


def lowrank_grad(g: Tensor, a: Tensor, dropout_p: float = 0.0, seed: Tensor | None = None,
                 out_table: Tensor | None = None, atomic: bool = False) -> Tensor | None:
    """``g^T @ dropout(a)``: g (M, R) float32; a (M, D).

    Without ``out_table``: returns a new (R, D) float32 tensor. With ``out_table`` ((R, 5) int64,
    rows pointing at fp32 vectors of length D, see the module docstring): adds row i of the result
    into the vector of row i and returns None; ``atomic`` picks ``tl.atomic_add`` with M split.
    """
    m, d = a.shape
    r = g.shape[1]
    if m == 0 or r == 0:
        return None if out_table is not None else torch.zeros((r, d), device=a.device, dtype=torch.float32)
    out = torch.empty((r, d), device=a.device, dtype=torch.float32) if out_table is None else out_table
    block_r = rank_block(r)
    atomic = atomic and out_table is not None
    chunk = _m_chunk(m, d, r, atomic)
    grid = lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(r, block_r), triton.cdiv(m, chunk))
    # table mode adds into live buffers: autotuning would add once per trial, so it runs one fixed config
    kernel, fixed = (_lowrank_grad_kernel, {}) if out_table is None else (_lowrank_grad_kernel.fn, _TABLE_CONFIG)
    kernel[grid](
        g, a, out, seed if seed is not None else g, dropout_p,
        m, d, r, triton.next_power_of_2(m), chunk,
        g.stride(0), g.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        DROPOUT=dropout_p > 0, RNG64=rng_needs_int64(m, d), INT64=needs_int64_index(a), DOT_PRECISION=dot_precision(a.dtype),
        TABLE_OUT=out_table is not None, ATOMIC=atomic, BLOCK_R=block_r, **fixed,
    )
    return out if out_table is None else None
