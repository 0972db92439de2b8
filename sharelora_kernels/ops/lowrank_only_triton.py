"""Triton path of the low-rank-only op (``ops.lowrank_only``): y += (h * s) B_eff^T in place, and its backward.

Shapes: y (M, N) the base's output, any of fp32 / bf16 / fp16, contiguous; x (M, K) in the compute
dtype c (fp32 / bf16 / fp16); every adapter tensor of one dtype (it may differ from c: fp32
adapters of a bf16 base are loaded as fp32 and rounded to bf16 for the MMA); all sums in fp32.

Forward (two launches):
  1. ``h = dropout(x) A_eff^T`` (M, R) fp32, every path at once, and the dropout mask, bit-packed
     (``lowrank_project``: one pass over x).
  2. ``_lowrank_add_kernel``: each program loads one (M, N) tile of y, adds the tile of
     ``(h * s) B_eff^T`` (``gemm_tiles.lowrank_tile``: B_eff gathered through the factor table, slice
     offset, gate ``G_ou``, Kronecker tiling by ``K_B``) in fp32 and stores it back: y is read and
     written once, no (M, N) temporary.
Backward (y's gradient passes through; the base's own backward gives the rest of dx):
  1. ``dh = s * dy B_eff`` (M, R) and ``dB_eff^T = (s h)^T dy`` (R, N) fp32 from one read of dy
     (``dy_lowrank``).
  2. ``dx = mask(dh A_eff) / (1 - p)``: ``_lowrank_add_kernel`` writing (not adding) an (M, K) tile,
     the mask read from the forward's bits.
  3. ``dA_eff = dh^T dropout(x)`` in fp32 (``lowrank_grad``, the same bits).
Factor tables come from the per-plan device cache (``tables.tables_for``); launch settings from
``autotune.lowrank_add_config`` (memory-bound: not autotuned). A layer's call plan keeps a
``LowRankPlan``: the tables and the gradient routes resolved once, a call only launches.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import LoRAPath
from .autotune import lowrank_add_config
from .dy_lowrank import dy_lowrank
from .gemm_tiles import LOWRANK_CHUNK, lowrank_tile, tile_coords
from .grad_routes import RouteCache, path_routes
from .lowrank_grad import lowrank_grad
from .lowrank_input import lowrank_project
from .tables import FactorTables, refresh_gates, tables_for
from .utils import TL_DTYPES, cdiv, dot_precision, on_device


@triton.jit(do_not_specialize=["M"])
def _lowrank_add_kernel(
    h_ptr, table_ptr, scale_ptr, out_ptr, mask_ptr, p,
    M, N, R,
    stride_hm, stride_hr, stride_om, stride_on, stride_mm,
    ACCUMULATE: tl.constexpr, APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (M, N) [+]= mask((h * scale) (M, R) @ U (R, N)) / (1 - p), MMA operands in DTYPE, fp32 sums."""
    _, pid_n, rows64, row_mask, cols, col_mask = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = lowrank_tile(h_ptr, h_ptr, table_ptr, scale_ptr, mask_ptr, p, stride_mm, rows64, row_mask, pid_n * BLOCK_N,
                       cols, col_mask, N, R, stride_hm, stride_hr, False, APPLY_SCALE, DROPOUT, DOT_PRECISION,
                       BLOCK_M, BLOCK_N, BLOCK_R, DTYPE, FACTOR_DTYPE, PERIODIC)
    out = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
    mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


_ADD_CONFIG = lowrank_add_config()  # a constant of the process (interpreter or not)


def _lowrank_add(out: Tensor, h: Tensor, table: Tensor, tables: FactorTables, compute: torch.dtype,
                 scale: Tensor | None, accumulate: bool, dropout_p: float = 0.0, mask: Tensor | None = None) -> None:
    """Launch ``_lowrank_add_kernel`` over out (M, D) with h (M, R) fp32 and a factor table (R, 5)
    over D; ``mask``: the bit-packed dropout mask of out's coordinates, read when ``dropout_p > 0``."""
    m, d = out.shape
    if out.numel() == 0:
        return
    config = _ADD_CONFIG
    dropout = dropout_p > 0
    grid = (cdiv(m, config["BLOCK_M"]) * cdiv(d, config["BLOCK_N"]),)
    with on_device(out):
        _lowrank_add_kernel[grid](
            h, table, scale if scale is not None else h, out, mask if dropout else h, dropout_p,
            m, d, table.shape[0],
            *h.stride(), *out.stride(), mask.stride(0) if dropout else 0,
            ACCUMULATE=accumulate, APPLY_SCALE=scale is not None, DROPOUT=dropout, DOT_PRECISION=dot_precision(compute),
            DTYPE=TL_DTYPES[compute], FACTOR_DTYPE=tables.dtype, PERIODIC=tables.periodic, BLOCK_R=LOWRANK_CHUNK,
            **config,
        )



def _forward(y: Tensor, x: Tensor, tables: FactorTables, p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    h, mask = lowrank_project(x, tables.a, tables.dtype, tables.periodic, p, seed)
    _lowrank_add(y, h, tables.b, tables, x.dtype, tables.scale, accumulate=True)
    return h, mask


def _backward(dy: Tensor, x: Tensor, h: Tensor, mask: Tensor, tables: FactorTables, p: float, needs_dx: bool,
              needs_a: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    dh, grad_b = dy_lowrank(dy if dy.dtype == x.dtype else dy.to(x.dtype), h, tables.b, tables.scale, tables.dtype,
                            tables.periodic)
    dx = x.new_empty(x.shape if needs_dx else (0,))
    if needs_dx:
        _lowrank_add(dx, dh, tables.a, tables, x.dtype, None, accumulate=False, dropout_p=p, mask=mask)
    return dx, lowrank_grad(dh, x, mask, p) if needs_a else None, grad_b


def triton_forward(y: Tensor, x: Tensor, paths: Sequence[LoRAPath], p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """y (M, N) += the paths of dropout(x) (M, K) in place; returns h (M, R) float32 and the
    (M, ceil(K / 32)) int32 bit-packed dropout mask (empty when p == 0)."""
    return _forward(y, x, tables_for(paths, x.device), p, seed)


def triton_backward(dy: Tensor, x: Tensor, h: Tensor, mask: Tensor, paths: Sequence[LoRAPath], p: float,
                    seed: Tensor, needs_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dx (M, K) in x's dtype (empty unless needs_dx), dA_eff (R, K) and dB_eff^T (R, N) float32;
    the mask is the forward's (``seed`` is not read: nothing is drawn again)."""
    return _backward(dy, x, h, mask, tables_for(paths, x.device), p, needs_dx, True)


class LowRankPlan:
    """What an eager call of these kernels reads that does not change between calls, built once per
    call plan (as ``fused_lora_linear.FusedPlan``): the paths, the factor tables (gate cores
    refreshed each forward), dropout p, and where each factor gradient goes (``grad_routes``, one
    routing per set of tensors needing a gradient)."""

    __slots__ = ("paths", "tables", "p", "routes")

    def __init__(self, paths: Sequence[LoRAPath], p: float, k: int, n: int, device: torch.device):
        self.paths = list(paths)
        self.tables = tables_for(self.paths, device)
        self.p = p
        self.routes = RouteCache([t for q in self.paths for t in q.tensors], path_routes(self.paths, k, n))

    def forward(self, y: Tensor, x: Tensor, seed: Tensor) -> tuple[Tensor, Tensor]:
        """``triton_forward`` of y (M, N), x (M, K) on the plan's tables (two launches)."""
        if self.tables.gates:
            refresh_gates(self.tables, self.paths)
        return _forward(y, x, self.tables, self.p, seed)

    def backward(self, dy: Tensor, x: Tensor, h: Tensor, mask: Tensor, needs_dx: bool,
                 needs: tuple[bool, ...]) -> tuple[Tensor, list[Tensor | None]]:
        """(dx (M, K), or empty unless needs_dx; the tensors' gradients, None where ``needs`` is
        false): the dy pass, dx and dA only where wanted, then the routes."""
        routes = self.routes(needs)
        dx, grad_a, grad_b = _backward(dy, x, h, mask, self.tables, self.p, needs_dx, routes.uses(0))
        return dx, routes((grad_a, grad_b))
