"""Gradient of the effective A factor: ``dA_eff = dh^T @ dropout(x)``, reduced over the M tokens.

g: (M, R) float32 (dh); a: (M, D) fp32/bf16/fp16, any strides (x); result (R, D) float32. The
dropout is the forward's, read from its bit-packed mask (``utils.load_keep``); nothing is drawn.
(dB comes from the dy pass, ``dy_lowrank``, which reads dy once for dh and dB.) The per-path chain
to the shared parameters (slice window, Kronecker fold, gate core) is tiny torch work.

Filling the GPU: an (R, D) gradient has few tiles (at D = 4096, R = 16: 64 of 64 x 64), too few
for 132 SMs, so M is split across S programs per tile (``autotune.m_splits``): each writes its
partial sum into an (S, R, D) fp32 buffer and ``reduce_splits`` adds the S slabs in order. The
split depends on the shapes only and the order is fixed, so the result is bitwise reproducible.
``atomic=True`` (``SHARELORA_ATOMIC_GRADS=1``, grouped op) lets the splits ``tl.atomic_add`` into
a zeroed result instead: no second stage, an order of fp32 additions that varies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .autotune import grad_config, m_splits, reduce_config
from .utils import cdiv, dot_precision, index64, load_keep, memo, mma, needs_int64_index, on_device, rank_block


@triton.jit(do_not_specialize=["M", "M_CHUNK"])
def _lowrank_grad_kernel(
    g_ptr, a_ptr, out_ptr, mask_ptr, p,
    M, D, R, M_CHUNK,
    stride_gm, stride_gr, stride_am, stride_ad, stride_os, stride_or, stride_od, stride_mm,
    DROPOUT: tl.constexpr, INT64: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[s] (R, D) = g[rows of split s]^T @ dropout(a)[rows of split s] (or atomically added into out)."""
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    m_start = pid_s * M_CHUNK
    m_end = tl.minimum(M, m_start + M_CHUNK)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_mask = cols < D
    rank_mask = ranks < R
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < m_end
        rows64 = rows.to(tl.int64)
        a = tl.load(a_ptr + rows64[:, None] * stride_am + index64(cols, INT64)[None, :] * stride_ad,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if DROPOUT:
            keep = load_keep(mask_ptr, stride_mm, rows64, row_mask, pid_d * BLOCK_D, D, BLOCK_M, BLOCK_D)
            a = (a.to(tl.float32) * (keep.to(tl.float32) / (1.0 - p))).to(dtype)  # as torch's dropout: NaN stays NaN
        g = tl.load(g_ptr + rows64[:, None] * stride_gm + ranks[None, :] * stride_gr,
                    mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        if dtype == tl.float16:  # g may exceed float16's range: tf32 operands keep it
            acc = mma(tl.trans(g), a.to(tl.float32), acc, "tf32")
        else:
            acc = mma(tl.trans(g.to(dtype)), a, acc, DOT_PRECISION)
    out = out_ptr + pid_s.to(tl.int64) * stride_os + ranks[:, None] * stride_or + cols[None, :] * stride_od
    mask = rank_mask[:, None] & col_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


@triton.jit
def _reduce_splits_kernel(part_ptr, out_ptr, S, X, Y, stride_ps, stride_px, stride_py, stride_ox, stride_oy,
                          BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr):
    """out (X, Y) = sum over s = 0, 1, ..., S-1 of part[s] (X, Y), in that order (fp32)."""
    xs = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    mask = (xs < X)[:, None] & (ys < Y)[None, :]
    ptrs = part_ptr + xs.to(tl.int64)[:, None] * stride_px + ys[None, :] * stride_py
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    for s in range(0, S):  # a pointer step per slab: no s * stride_ps product (it can pass 2**31)
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_ps
    tl.store(out_ptr + xs.to(tl.int64)[:, None] * stride_ox + ys[None, :] * stride_oy, acc, mask=mask)


_REDUCE_CONFIG = reduce_config()  # a constant of the process (interpreter or not)


def split_buffer(s: int, x: int, y: int, device: torch.device) -> tuple[Tensor, tuple[int, int, int]]:
    """An uninitialised fp32 buffer for S partial (X, Y) slabs and its (slab, row, column) strides:
    (S, X, Y), or (X, Y) itself when S == 1 (the result, with slab stride 0: nothing to reduce)."""
    if s == 1:
        out = torch.empty((x, y), device=device, dtype=torch.float32)
        return out, (0, y, 1)
    out = torch.empty((s, x, y), device=device, dtype=torch.float32)
    return out, (x * y, y, 1)


def reduce_splits(partial: Tensor) -> Tensor:
    """The sum over dim 0 of an (S, X, Y) float32 tensor, added in order s = 0..S-1: (X, Y) float32
    (an (X, Y) tensor, ``split_buffer``'s single slab, is its own sum)."""
    if partial.dim() == 2:
        return partial
    s, x, y = partial.shape
    out = torch.empty((x, y), device=partial.device, dtype=torch.float32)
    config = _REDUCE_CONFIG
    grid = (cdiv(x, config["BLOCK_X"]), cdiv(y, config["BLOCK_Y"]))
    with on_device(partial):
        _reduce_splits_kernel[grid](partial, out, s, x, y, *partial.stride(), *out.stride(), **config)
    return out


def lowrank_grad(g: Tensor, a: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0, atomic: bool = False,
                 splits: int | None = None) -> Tensor:
    """``g^T @ dropout(a)`` as a new (R, D) float32 tensor: g (M, R) float32; a (M, D); mask the
    forward's (M, ceil(D / 32)) int32 bit-packed keep mask, used when ``dropout_p > 0``.

    ``splits``: programs sharing the M reduction (default ``autotune.m_splits``); ``atomic``: they
    add into the result atomically instead of through the ordered second stage.
    """
    m, d = a.shape
    r = g.shape[1]
    if m == 0 or r == 0:
        return torch.zeros((r, d), device=a.device, dtype=torch.float32)
    device = a.device
    grid, chunk, block_r, config = memo(_GEOMETRY, (m, d, r, a.element_size(), device, splits),
                                        lambda: geometry(m, d, r, a.element_size(), device, splits))
    if atomic:
        out, strides = torch.zeros((r, d), device=device, dtype=torch.float32), (0, d, 1)
    else:
        out, strides = split_buffer(grid[2], r, d, device)
    dropout = dropout_p > 0
    with on_device(a):
        _lowrank_grad_kernel[grid](
            g, a, out, mask if dropout else g, dropout_p,
            m, d, r, chunk,
            *g.stride(), *a.stride(), *strides, mask.stride(0) if dropout else 0,
            DROPOUT=dropout, INT64=needs_int64_index(a), DOT_PRECISION=dot_precision(a.dtype), ATOMIC=atomic,
            BLOCK_R=block_r, **config,
        )
    return out if atomic else reduce_splits(out)


_GEOMETRY: dict[tuple, tuple] = {}


def geometry(m: int, d: int, r: int, elem_bytes: int, device: torch.device,
             splits: int | None) -> tuple[tuple[int, int, int], int, int, dict]:
    """(grid (D tiles, rank tiles, splits), M_CHUNK, BLOCK_R, config) of ``lowrank_grad`` over an
    (M, D) input at rank r: a function of the shapes (kept one per shape)."""
    block_r = rank_block(r)
    config = grad_config(d, elem_bytes, block_r)
    block_m = config["BLOCK_M"]
    other_tiles = cdiv(d, config["BLOCK_D"]) * cdiv(r, block_r)
    splits = min(splits or m_splits(m, other_tiles, block_m, device), cdiv(m, block_m))
    chunk = cdiv(cdiv(m, splits), block_m) * block_m
    splits = cdiv(m, chunk)
    return (cdiv(d, config["BLOCK_D"]), cdiv(r, block_r), splits), chunk, block_r, config
