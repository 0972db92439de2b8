"""Pieces shared by the fused LoRA kernels: the factor table, the dropout mask, launch settings.

Factor table. Every path kind (plain, slice, gate, kron) is a low-rank product whose effective
factors ``A_eff (R, K)`` and ``B_eff (N, R)`` are structured views of parameters. The kernels see
all paths at once, ranks concatenated (R = sum of the path ranks), through one table per factor:
row ``i`` describes the vector ``U[i, :]`` (row i of ``A_eff`` over K, or column i of ``B_eff``
over N) as five int64 numbers

    base    byte address of element 0 of the vector (slice offsets already added)
    stride  element stride along the vector
    period  0, or the Kronecker block ``d``: then U[i, n] = coef[n // d] * base[(n % d) * stride]
    coef    byte address of the Kronecker kernel (K_A or K_B), 0 if none
    cstride element stride of the Kronecker kernel

so slices are pointer offsets, Kronecker factors are expanded tile by tile while loading (x is
folded by K_A, the output tiled by K_B), and nothing (R, K)-, (N, R)- or (N, K)-sized is built.
The gate path's ``A_eff = C G_id`` is a tiny (g, K) tensor made in torch (``gate_a_eff``); the
table points at it, so it must outlive the launch (``FactorTables.keep``).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import LoRAPath, gate_core

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET = tl.constexpr(INTERPRET)


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class FactorTables(NamedTuple):
    """Device tables of one call: ``a`` (R, 5) rows of A_eff over K, ``b`` (R, 5) columns of
    B_eff over N, ``scale`` (R,) float32 path scale of every rank, ``keep`` temporaries the
    tables point into, ``dtype`` the Triton dtype of every adapter tensor (it may differ from
    x's: fp32 adapters of a bf16 base are loaded as fp32 and rounded to bf16 for the MMA),
    ``periodic`` whether any row is a Kronecker row (kernels compiled without it skip the
    period/coefficient arithmetic)."""

    a: Tensor
    b: Tensor
    scale: Tensor
    keep: tuple[Tensor, ...]
    dtype: tl.dtype
    periodic: bool


def path_rank(path: LoRAPath) -> int:
    """Rank the path contributes to the concatenated R (g for a gate path)."""
    return path.tensors[2].shape[0] if path.kind == "gate" else path.tensors[0].shape[0]


def gate_a_eff(path: LoRAPath) -> Tensor:
    """``A_eff = C G_id`` (g, K) of a gate path: fp32 math, cast once to the adapter dtype."""
    fp32 = path._replace(tensors=tuple(t.float() for t in path.tensors))
    return (gate_core(fp32) @ fp32.tensors[2]).to(path.tensors[0].dtype).contiguous()


def _rows(t: Tensor, rank_dim: int, offset: int, period: int = 0, coef: Tensor | None = None,
          coef_dim: int = 0) -> list[list[int]]:
    """Table rows of the vectors of ``t`` indexed along ``rank_dim``, read from ``offset`` on."""
    long_dim = 1 - rank_dim
    es = t.element_size()
    base = t.data_ptr() + offset * t.stride(long_dim) * es
    c_addr, c_stride = (coef.data_ptr(), coef.stride(coef_dim)) if coef is not None else (0, 0)
    return [[base + i * t.stride(rank_dim) * es, t.stride(long_dim), period, c_addr, c_stride]
            for i in range(t.shape[rank_dim])]


def build_tables(paths: Sequence[LoRAPath], device: torch.device) -> FactorTables:
    """The factor tables of ``paths`` (validated by the caller) on ``device``."""
    a_rows, b_rows, scales, keep = [], [], [], []
    for p in paths:
        t = p.tensors
        if p.kind in ("plain", "slice"):
            a_rows += _rows(t[0], 0, p.k_offset)
            b_rows += _rows(t[1], 1, p.n_offset)
        elif p.kind == "gate":
            a_eff = gate_a_eff(p)
            keep.append(a_eff)
            a_rows += _rows(a_eff, 0, 0)
            b_rows += _rows(t[5], 1, 0)
        else:  # kron: A = K_A (x) A_s, B = K_B (x) B_s
            d = t[0].shape[1]
            a_rows += _rows(t[0], 0, 0, d, t[2], 1)
            b_rows += _rows(t[1], 1, 0, d, t[3], 0)
        scales += [p.scale] * path_rank(p)
    as_table = lambda rows: torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    scale = torch.tensor(scales, dtype=torch.float32).to(device, non_blocking=True)
    return FactorTables(as_table(a_rows), as_table(b_rows), scale, tuple(keep), TL_DTYPES[paths[0].tensors[0].dtype],
                        any(p.kind == "kron" for p in paths))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE fp32 unless TF32 is allowed (16-bit inputs ignore it)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dropout_seed(p: float, device: torch.device) -> Tensor:
    """A fresh (1,) int64 seed for a dropout mask drawn in-kernel (zeros when p == 0: no mask)."""
    if p > 0:
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    return torch.zeros(1, dtype=torch.int64, device=device)


def rng_needs_int64(m: int, k: int) -> bool:
    """Whether dropout offsets ``row * K + col`` of an (M, K) input overflow int32."""
    return m * k > 2**31 - 1


def needs_int64_index(*tensors: Tensor) -> bool:
    """Whether an element offset ``index * stride`` into one of ``tensors`` can overflow int32
    (Triton passes strides and sizes below 2**31 as int32): then the kernels index in int64."""
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) > 2**31 - 1 for t in tensors if t.numel())


def rank_block(r: int) -> int:
    """Rank tile: a power of two in [16, 64] (tl.dot needs >= 16 on GPU)."""
    return max(16, min(64, triton.next_power_of_2(r)))


def pick_configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """H100-class autotune configs on GPU; one small fixed config under the interpreter."""
    return [interp] if INTERPRET else gpu


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` on tensor cores. The interpreter's dot multiplies raw bfloat16 bits, so it
    gets fp32 operands (exact products, the same fp32 accumulation)."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def index64(idx, INT64: tl.constexpr):
    """``idx`` as int64 when INT64 (offsets into a tensor of 2**31 or more elements), else unchanged."""
    if INT64:
        idx = idx.to(tl.int64)
    return idx


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p, RNG64: tl.constexpr):
    """Keep mask (rows x cols) of the one dropout mask on an (M, n_cols) input: rand >= p."""
    if RNG64:
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    else:
        offsets = rows[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def load_factor(table_ptr, ranks, rank_mask, offs, offs_mask, DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr,
                PERIODIC: tl.constexpr):
    """Tile ``U[ranks, offs]`` (len(ranks), len(offs)) in DTYPE, gathered through a factor table
    whose vectors hold FACTOR_DTYPE elements. PERIODIC: the table may hold Kronecker rows."""
    row = table_ptr + ranks * 5  # 5 int64 per row: base, stride, period, coef, cstride
    base = tl.load(row, mask=rank_mask, other=0)
    stride = tl.load(row + 1, mask=rank_mask, other=0)
    mask = rank_mask[:, None] & offs_mask[None, :]
    if not PERIODIC:  # plain, slice and gate rows: one strided vector each
        ptrs = base.to(tl.pointer_type(FACTOR_DTYPE))[:, None] + offs[None, :] * stride[:, None]
        return tl.load(ptrs, mask=mask, other=0.0).to(DTYPE)
    period = tl.load(row + 2, mask=rank_mask, other=0).to(tl.int32)
    coef_base = tl.load(row + 3, mask=rank_mask, other=0)
    coef_stride = tl.load(row + 4, mask=rank_mask, other=0)
    kron = (period > 0)[:, None]
    safe_period = tl.where(period > 0, period, 1)[:, None]
    idx = tl.where(kron, offs[None, :] % safe_period, offs[None, :])
    ptrs = base.to(tl.pointer_type(FACTOR_DTYPE))[:, None] + idx * stride[:, None]
    u = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    coef_ptrs = coef_base.to(tl.pointer_type(FACTOR_DTYPE))[:, None] + (offs[None, :] // safe_period) * coef_stride[:, None]
    coef = tl.load(coef_ptrs, mask=mask & kron, other=1.0).to(tl.float32)
    return (u * coef).to(DTYPE)
