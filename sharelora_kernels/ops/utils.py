"""Pieces shared by the fused LoRA kernels: dtypes, index widths, the MMA, factor loads, the dropout mask.

The factor tables that ``load_factor`` reads are described and built in ``tables.py``.

Dropout mask. Drawn once, in the forward projection (``lowrank_input``), four keep decisions per
Philox call (``tl.rand4x``), and stored bit-packed: an (M, ceil(K / 32)) int32 tensor whose bit b
of word w of row m keeps element (m, 32 w + b) of x (M * K / 8 bytes). dx and dA read those bits
(``load_keep``); backward draws nothing, so the mask it applies is the forward's, bit for bit.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET = tl.constexpr(INTERPRET)


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE fp32 unless TF32 is allowed (16-bit inputs ignore it). Reads
    ``torch.backends.cuda.matmul.allow_tf32`` (its C getter: a setting a user may change between calls)."""
    if dtype == torch.float32 and not torch._C._get_cublas_allow_tf32():
        return "ieee"
    return "tf32"


def check_kernel_device(x: Tensor) -> None:
    """ValueError unless the kernels can run on x's device: CUDA, or any under Triton's interpreter
    (``INTERPRET`` read at the call: the host benchmark lifts the guard to time launches stubbed)."""
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got x on {x.device}")


_NO_SEED: dict[torch.device, Tensor] = {}


def dropout_seed(p: float, device: torch.device) -> Tensor:
    """A (1,) int64 seed for the dropout mask, drawn on ``device`` from its generator (a device op:
    no host data, and capturable in a CUDA graph), 63 random bits (Philox takes a 64-bit key). When
    p == 0 (no mask is drawn): one zero tensor per device, made once and never written, so such a
    call launches nothing for it."""
    if p > 0:
        return torch.randint(0, 2**63 - 1, (1,), device=device)
    if torch.compiler.is_compiling():  # traced: a fresh (fake) tensor, never cached
        return torch.zeros(1, dtype=torch.int64, device=device)
    if device not in _NO_SEED:
        _NO_SEED[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _NO_SEED[device]


_NOWHERE = contextlib.nullcontext()  # reusable: it holds no state


def on_device(t: Tensor):
    """The context every launch runs in: ``t``'s CUDA device made current (a model spread over two
    GPUs launches each kernel on its tensors' GPU); on CPU tensors (the interpreter) it changes nothing."""
    return torch.cuda.device(t.device.index) if t.is_cuda else _NOWHERE


def memo(cache: dict, key, build):
    """``cache[key]``, made by ``build()`` on a miss: launch geometry that is a function of a few ints
    (shapes, flags, the device) is computed once per distinct key, not per call. A cache past
    ``MEMO_SIZE`` keys (sequence lengths that never repeat) starts over."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= MEMO_SIZE:
            cache.clear()
        value = cache[key] = build()
    return value


MEMO_SIZE = 4096


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code (``triton.cdiv`` is a constexpr function: slow to call from Python)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code, like ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def mask_words(k: int) -> int:
    """int32 words per row of the bit-packed dropout mask of an (M, K) input."""
    return cdiv(k, 32)


def rng_needs_int64(m: int, k: int) -> bool:
    """Whether the Philox offsets ``row * ceil(K / 4) + col // 4`` of an (M, K) input overflow int32."""
    return m * cdiv(k, 4) > 2**31 - 1


def needs_int64_index(*tensors: Tensor) -> bool:
    """Whether an element offset ``index * stride`` into one of ``tensors`` can overflow int32
    (Triton passes strides and sizes below 2**31 as int32): then the kernels index in int64."""
    for t in tensors:
        n = t.numel()
        if n < 2**31 and t.is_contiguous():  # the largest offset is n - 1 (the common case: no stride sum)
            continue
        if n and sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride())) > 2**31 - 1:
            return True
    return False


def rank_block(r: int) -> int:
    """Rank tile: a power of two in [16, 64] (tl.dot needs >= 16 on GPU)."""
    return max(16, min(64, next_power_of_2(r)))


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


@triton.jit
def draw_keep(seed, rows, col0, n_cols, p, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, RNG64: tl.constexpr):
    """Keep decisions (BLOCK_M, BLOCK_D) of the dropout mask of an (M, n_cols) input at ``rows`` x
    columns ``col0 + arange(BLOCK_D)`` (col0 a multiple of 4): one Philox call (``rand4x``) per 4
    consecutive columns, interleaved back into column order."""
    first = col0 // 4 + tl.arange(0, BLOCK_D // 4)  # the Philox counter of each run of 4 columns
    if RNG64:
        offsets = rows.to(tl.int64)[:, None] * tl.cdiv(n_cols, 4) + first[None, :]
    else:
        offsets = rows[:, None] * tl.cdiv(n_cols, 4) + first[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, offsets)
    u = tl.join(tl.join(u0, u1), tl.join(u2, u3))  # (BLOCK_M, BLOCK_D // 4, 2, 2): column 4j + 2a + b <- u_{a + 2b}
    return tl.reshape(u, (BLOCK_M, BLOCK_D)) >= p


@triton.jit
def pack_keep(keep, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_D) booleans -> (BLOCK_M, BLOCK_D // 32) int32 words, bit b = column 32 w + b."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_D // 32, 32)) << tl.arange(0, 32)[None, None, :]
    return tl.sum(bits, axis=2)  # disjoint bits: the sum is their OR (bit 31 wraps to the sign, as wanted)


@triton.jit
def load_keep(mask_ptr, stride_mm, rows64, row_mask, col0, n_cols, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keep decisions (BLOCK_M, BLOCK_D) at ``rows`` x columns ``col0 + arange(BLOCK_D)`` (col0 a
    multiple of 32) of the bit-packed mask of an (M, n_cols) input: BLOCK_D / 32 words per row
    loaded, their bits spread out (columns past n_cols: garbage the caller masks)."""
    words = col0 // 32 + tl.arange(0, BLOCK_D // 32)
    packed = tl.load(mask_ptr + rows64[:, None] * stride_mm + words[None, :],
                     mask=row_mask[:, None] & (words < tl.cdiv(n_cols, 32))[None, :], other=0)
    bits = (packed[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_D)) != 0
