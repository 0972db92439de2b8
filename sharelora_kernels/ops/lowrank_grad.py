"""Gradient of the effective low-rank factors: ``G = g^T @ dropout(a)``, reduced over the M tokens.

g: (M, R) float32; a: (M, D) fp32/bf16/fp16, any strides; G: (R, D) float32.
``dA_eff = dh^T dropout(x)`` (g = dh, a = x, with the forward's mask regenerated from the seed)
and ``dB_eff^T = (s h)^T dy`` (g = s h, a = dy, no dropout). Each program owns one (R, D) tile and
loops over all of M, so the result is written once, deterministically, in fp32; the per-path
chain to the shared parameters (slice window, Kronecker fold, gate core) is tiny torch work.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import dot_precision, dropout_keep, mma, pick_configs, rank_block, rng_needs_int64

_CONFIGS = pick_configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
     for bm, bd, w, s in ((64, 32, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 4))],
    triton.Config({"BLOCK_M": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_CONFIGS, key=["D", "R", "M_BUCKET"])
@triton.jit
def _lowrank_grad_kernel(
    g_ptr, a_ptr, out_ptr, seed_ptr, p,
    M, D, R, M_BUCKET,
    stride_gm, stride_gr, stride_am, stride_ad, stride_or, stride_od,
    DROPOUT: tl.constexpr, RNG64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_mask = cols < D
    rank_mask = ranks < R
    dtype = a_ptr.dtype.element_ty
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)[:, None]
        a = tl.load(a_ptr + rows64 * stride_am + cols[None, :] * stride_ad,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed, rows, cols, D, p, RNG64)
            a = tl.where(keep, a.to(tl.float32) / (1.0 - p), 0.0).to(dtype)
        g = tl.load(g_ptr + rows64 * stride_gm + ranks[None, :] * stride_gr,
                    mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        acc = mma(tl.trans(g.to(dtype)), a, acc, DOT_PRECISION)
    out = out_ptr + ranks[:, None] * stride_or + cols[None, :] * stride_od
    tl.store(out, acc, mask=rank_mask[:, None] & col_mask[None, :])


def lowrank_grad(g: Tensor, a: Tensor, dropout_p: float = 0.0, seed: Tensor | None = None) -> Tensor:
    """``g^T @ dropout(a)`` as an (R, D) float32 tensor. g: (M, R) float32; a: (M, D)."""
    m, d = a.shape
    r = g.shape[1]
    if m == 0:
        return torch.zeros((r, d), device=a.device, dtype=torch.float32)
    out = torch.empty((r, d), device=a.device, dtype=torch.float32)
    block_r = rank_block(r)
    grid = lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(r, block_r))
    _lowrank_grad_kernel[grid](
        g, a, out, seed if seed is not None else g, dropout_p,
        m, d, r, triton.next_power_of_2(m),
        g.stride(0), g.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        DROPOUT=dropout_p > 0, RNG64=rng_needs_int64(m, d), DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_R=block_r,
    )
    return out
