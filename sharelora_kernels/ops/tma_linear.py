"""The fused GEMM on Hopper: tensor descriptors (TMA) and a persistent tile loop.

    out (M, N) = a (M, K) @ W' + bias + mask((h * scale) (M, R) @ U (R, N)) / (1 - p)

the same contract as the pointer kernel of ``fused_lora_linear`` (forward: a = x, W' = W^T; dx:
a = dy, W' = W). The base operands stream through TMA: one descriptor over a (block BLOCK_M x
BLOCK_K) and one over W in its own row-major (N, K) layout, read K-major for the forward (blocks
BLOCK_N x BLOCK_K, transposed in shared memory) and N-major for dx (blocks BLOCK_K x BLOCK_N).
Out-of-range rows and columns of a ragged last tile are zero-filled by the descriptor, so the
K-loop has no masks. The low-rank term of each tile (h tile, B_eff gathered through the factor
table, the dropout bits) is one more chunk of size r accumulated before the base K-chunks, on the
same accumulator, its R / 16 chunks unrolled (R_CHUNKS, a compile-time count). ``NUM_PROGRAMS``
programs (one per SM) loop over the tiles, GROUP_M-swizzled; the tile loop holds a single inner
loop (K), so the compiler flattens the two (``tl.range(flatten=True)``; ``compile_check`` reports
``flattened``) and its pipeliner can issue the next tile's loads while the current tile's
epilogue runs.

Used where TMA can serve: a CUDA GPU of compute capability 9 or more (or the interpreter, which
runs descriptors too), a row-major a, W row-major in either reading, every row stride and base
address 16-byte aligned, a tensor-core dot (16-bit inputs, or float32 with TF32 allowed).
Elsewhere ``fused_lora_linear`` runs its pointer kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton without host-side descriptors: the pointer kernel serves every call
    TensorDescriptor = None

from .autotune import SMALL_GEMM, TunedKernel, gemm_configs, sm_count
from .gemm_tiles import LOWRANK_CHUNK, epilogue, lowrank_tile, tile_coords
from .utils import INTERPRET, cdiv, dot_precision, memo, mma, next_power_of_2, on_device

PERF = [(128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
FULL = PERF + [(128, 128, 64, 4, 3), (256, 128, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 128, 8, 3),
               (64, 64, 128, 4, 3)]


def _set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: the descriptors' block shapes follow the config being launched."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_KMAJOR"] else [bk, bn]


@triton.jit(do_not_specialize=["M"])
def _tma_linear_kernel(
    a_desc, w_desc, bias_ptr, h_ptr, table_ptr, scale_ptr, out_ptr, mask_ptr, p,
    M, N, K, R, M_BUCKET, NUM_PROGRAMS,
    stride_hm, stride_hr, stride_om, stride_on, stride_mm,
    HAS_BIAS: tl.constexpr, APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr, W_KMAJOR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr, R_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n, rows64, row_mask, cols, col_mask = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = lowrank_tile(h_ptr, h_ptr, table_ptr, scale_ptr, mask_ptr, p, stride_mm, rows64, row_mask,
                           pid_n * BLOCK_N, cols, col_mask, N, R, stride_hm, stride_hr, False, APPLY_SCALE, DROPOUT,
                           DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, out_ptr.dtype.element_ty, FACTOR_DTYPE, PERIODIC,
                           R_CHUNKS)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            if W_KMAJOR:
                w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K]).T
            else:
                w = w_desc.load([ki * BLOCK_K, pid_n * BLOCK_N])
            acc = mma(a, w, acc, DOT_PRECISION)
        epilogue(acc, bias_ptr, out_ptr, rows64, row_mask, cols, col_mask, stride_om, stride_on, HAS_BIAS)


tma_kernel = TunedKernel(_tma_linear_kernel,
                         {"small": SMALL_GEMM, "perf": gemm_configs(PERF), "full": gemm_configs(FULL)},
                         key=["N", "K", "R", "M_BUCKET", "DROPOUT", "W_KMAJOR", "FACTOR_DTYPE", "PERIODIC"],
                         pre_hook=_set_block_shapes)


def _aligned(t: Tensor, row_dim: int) -> bool:
    """A row-major view TMA can read: unit stride along the other dim, a positive 16-byte-multiple row
    stride (not 0: a broadcast row, as an expanded dy, is no tensor a descriptor can describe) and a
    16-byte aligned base."""
    es, row_stride = t.element_size(), t.stride(row_dim)
    return t.stride(1 - row_dim) == 1 and row_stride > 0 and (row_stride * es) % 16 == 0 and t.data_ptr() % 16 == 0


_TMA: dict[torch.device, bool] = {}


def _has_tma(device: torch.device) -> bool:
    """Whether CUDA ``device`` has compute capability 9 or more (asked once per device)."""
    return memo(_TMA, device, lambda: torch.cuda.get_device_capability(device)[0] >= 9)


def usable(a: Tensor, w_kn: Tensor) -> bool:
    """Whether the TMA kernel can run ``a @ w_kn``: a (M, K) row-major, w_kn (K, N) a row-major
    (K, N) or (N, K) matrix, 16-byte aligned, on a GPU with TMA (compute capability >= 9) or the
    interpreter, and on a GPU a tensor-core dot (not float32 with TF32 off: that FMA dot spills at
    every tile here, compile_check; the interpreter computes every dot the same way)."""
    if TensorDescriptor is None or a.shape[0] == 0 or a.shape[1] == 0 or w_kn.shape[1] == 0:
        return False
    if not INTERPRET and not (a.is_cuda and _has_tma(a.device) and dot_precision(a.dtype) != "ieee"):
        return False
    return _aligned(a, 0) and (_aligned(w_kn, 0) or _aligned(w_kn.t(), 0))


def tma_linear(out: Tensor, a: Tensor, w_kn: Tensor, bias: Tensor | None, h: Tensor, table: Tensor,
               factor_dtype: tl.dtype, periodic: bool, scale: Tensor | None, dropout_p: float, mask: Tensor,
               programs: int | None = None) -> None:
    """Fill ``out`` (M, N) with the fused GEMM (see the module docstring); ``usable(a, w_kn)`` must
    hold. ``programs``: persistent programs (default: one per SM, never more than the tiles)."""
    m, k = a.shape
    n = w_kn.shape[1]
    w_kmajor = w_kn.stride(1) != 1  # forward: w_kn = W^T, read W (N, K) K-major
    w = w_kn.t() if w_kmajor else w_kn
    placeholder = [16, 16]  # replaced by the config's tiles in the pre-hook
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), placeholder)
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), placeholder)
    programs = programs or sm_count(a.device)
    grid = lambda meta: (min(programs, cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])),)
    dropout = dropout_p > 0
    with on_device(a):
        tma_kernel[grid](
            a_desc, w_desc, bias if bias is not None else h, h, table, scale if scale is not None else h, out,
            mask if dropout else h, dropout_p,
            m, n, k, table.shape[0], next_power_of_2(m), programs,
            *h.stride(), *out.stride(), mask.stride(0) if dropout else 0,
            HAS_BIAS=bias is not None, APPLY_SCALE=scale is not None, DROPOUT=dropout, W_KMAJOR=w_kmajor,
            DOT_PRECISION=dot_precision(a.dtype), FACTOR_DTYPE=factor_dtype, PERIODIC=periodic,
            R_CHUNKS=cdiv(table.shape[0], LOWRANK_CHUNK), BLOCK_R=LOWRANK_CHUNK,
        )
