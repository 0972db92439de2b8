"""Fused LoRA linear: ``y = x W^T + b + sum_p s_p path_p(dropout(x))``, forward and backward.

Shapes: x (M, K); W (N, K) frozen; b (N,) frozen or None; y (M, N). x, W and b share one dtype,
every adapter tensor one dtype (each fp32, bf16 or fp16; fp32 adapters of a bf16 base are the
default of ``apply``); all accumulation is fp32, each output is cast once.

Forward (two launches; the (M, N) output is written once, never read back):
  1. ``h = dropout(x) A_eff^T`` (M, R) fp32, every path at once (``lowrank_input``).
  2. ``y = x W^T + b + (h * s) B_eff^T`` in one GEMM kernel: the low-rank product is added to the
     fp32 accumulator in the epilogue, with B_eff gathered through the factor table (slice offset,
     gate ``G_ou``, Kronecker tiling of the output by ``K_B``).
Backward (W and b get no gradient):
  1. ``dh = s * dy B_eff`` (M, R) fp32 (``lowrank_input`` over dy with the B table).
  2. ``dx = dy W + mask(dh A_eff) / (1 - p)`` with the same GEMM kernel (W read transposed).
  3. ``dA_eff = dh^T dropout(x)`` and ``dB_eff^T = (s h)^T dy`` in fp32 (``lowrank_grad``).
  4. the chain to each parameter tensor (``shared_grad.chain_a/b``: slice window, Kronecker fold,
     gate core), added into the window of one fp32 buffer per tensor (``shared_grad.GradSink``: no
     padded full-size gradient per path), cast once.
Dropout draws one mask on x from a seed (``tl.rand``); backward regenerates it, x is not copied.

Registered as the custom ops ``sharelora::fused_lora_linear`` and
``sharelora::fused_lora_linear_backward`` with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..plan import PATH_ROLES
from ..reference import LoRAPath
from .lowrank_grad import lowrank_grad
from .lowrank_input import lowrank_project
from .shared_grad import GradSink, chain_a, chain_b
from .utils import (INTERPRET, TL_DTYPES, build_tables, dot_precision, dropout_keep, dropout_seed, index64, load_factor, mma,
                    needs_int64_index, path_rank, pick_configs, rank_block, rng_needs_int64)

KINDS = tuple(PATH_ROLES)  # layout code of a path kind = its index here

_CONFIGS = pick_configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
     for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                              (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (32, 64, 64, 4, 5))],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1),
)


@triton.jit
def _add_lowrank(acc, h_ptr, table_ptr, scale_ptr, rows64, row_mask, cols, col_mask, R, stride_hm, stride_hr,
                 APPLY_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, DTYPE: tl.constexpr,
                 FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr):
    """acc + (h[rows] * scale) @ U[:, cols]: h (M, R) fp32, U (R, N) gathered through the factor table.

    The MMA takes DTYPE operands, except for a float16 base: h may exceed float16's range (65504)
    where the output does not, so it stays float32 (tf32 operands: float16's mantissa, fp32's range).
    """
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_mask = ranks < R
        h = tl.load(h_ptr + rows64[:, None] * stride_hm + ranks[None, :] * stride_hr,
                    mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        if APPLY_SCALE:
            h = h * tl.load(scale_ptr + ranks, mask=rank_mask, other=0.0)[None, :]
        if DTYPE == tl.float16:
            u = load_factor(table_ptr, ranks, rank_mask, cols, col_mask, tl.float32, FACTOR_DTYPE, PERIODIC)
            acc = mma(h, u, acc, "tf32")
        else:
            u = load_factor(table_ptr, ranks, rank_mask, cols, col_mask, DTYPE, FACTOR_DTYPE, PERIODIC)
            acc = mma(h.to(DTYPE), u, acc, DOT_PRECISION)
    return acc


@triton.jit
def swizzled_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` over an (M, N) output, GROUP_M row tiles at a time (L2 reuse)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * grid_n)) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * grid_n)) % group_size, (pid % (GROUP_M * grid_n)) // group_size


@triton.jit
def matmul_tile(acc, a_ptr, stride_am, stride_ak, w_ptr, stride_wk, stride_wn, rows64, row_mask, cols, col_mask, K,
                DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, INT64: tl.constexpr):
    """acc + a[rows, :K] @ w[:K, cols]: the base GEMM's K-loop for one output tile (INT64: column
    and K offsets in int64)."""
    cols = index64(cols, INT64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        ks = index64(ks, INT64)
        a = tl.load(a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(a, w, acc, DOT_PRECISION)
    return acc


@triton.jit
def lowrank_tile(h_ptr, table_ptr, scale_ptr, seed_ptr, p, rows, rows64, row_mask, cols, col_mask, N, R,
                 stride_hm, stride_hr, APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr, RNG64: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr):
    """The tile's low-rank term (fp32), masked by dropout on (M, N) coordinates when DROPOUT.

    Computed before the base K-loop, which then accumulates onto it: one accumulator, also when
    the mask applies to the low-rank term only.
    """
    low = _add_lowrank(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), h_ptr, table_ptr, scale_ptr, rows64, row_mask,
                       cols, col_mask, R, stride_hm, stride_hr, APPLY_SCALE, DOT_PRECISION, BLOCK_R, DTYPE,
                       FACTOR_DTYPE, PERIODIC)
    if DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), rows, cols, N, p, RNG64)
        low = tl.where(keep, low / (1.0 - p), 0.0)
    return low


@triton.autotune(configs=_CONFIGS, key=["N", "K", "R", "M_BUCKET"])
@triton.jit
def _fused_linear_kernel(
    a_ptr, w_ptr, bias_ptr, h_ptr, table_ptr, scale_ptr, out_ptr, seed_ptr, p,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_wk, stride_wn, stride_hm, stride_hr, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr, RNG64: tl.constexpr, INT64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M, N) = a (M, K) @ w (K, N) + bias + mask((h * scale) (M, R) @ U (R, N)) / (1 - p)."""
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    rows64 = rows.to(tl.int64)
    acc = lowrank_tile(h_ptr, table_ptr, scale_ptr, seed_ptr, p, rows, rows64, row_mask, cols, col_mask, N, R,
                       stride_hm, stride_hr, APPLY_SCALE, DROPOUT, RNG64, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
                       a_ptr.dtype.element_ty, FACTOR_DTYPE, PERIODIC)
    acc = matmul_tile(acc, a_ptr, stride_am, stride_ak, w_ptr, stride_wk, stride_wn, rows64, row_mask, cols, col_mask,
                      K, DOT_PRECISION, BLOCK_K, INT64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _fused_linear(a: Tensor, w_kn: Tensor, bias: Tensor | None, h: Tensor, table: Tensor, factor_dtype: tl.dtype,
                  periodic: bool, scale: Tensor | None, dropout_p: float, seed: Tensor) -> Tensor:
    """Launch ``_fused_linear_kernel``. a (M, K); w_kn (K, N) any strides; h (M, R) fp32; table (R, 5)
    over N with factor_dtype elements (``periodic``: it may hold Kronecker rows)."""
    m, k = a.shape
    n = w_kn.shape[1]
    out = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    r = table.shape[0]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _fused_linear_kernel[grid](
        a, w_kn, bias if bias is not None else a, h, table, scale if scale is not None else h, out, seed, dropout_p,
        m, n, k, r, triton.next_power_of_2(m),
        a.stride(0), a.stride(1), w_kn.stride(0), w_kn.stride(1), h.stride(0), h.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, APPLY_SCALE=scale is not None, DROPOUT=dropout_p > 0,
        RNG64=rng_needs_int64(m, n), INT64=needs_int64_index(a, w_kn), DOT_PRECISION=dot_precision(a.dtype), FACTOR_DTYPE=factor_dtype,
        PERIODIC=periodic, BLOCK_R=rank_block(r),
    )
    return out


# ----------------------------------------------------------------------------- path encoding
def _encode(paths: Sequence[LoRAPath]) -> tuple[list[Tensor], list[int], list[float]]:
    """Flatten paths for the custom op: tensors, layout [kind code, k_offset, n_offset] per path, scales."""
    tensors, layout = [], []
    for p in paths:
        tensors += p.tensors
        layout += [KINDS.index(p.kind), p.k_offset, p.n_offset]
    return tensors, layout, [float(p.scale) for p in paths]


def _decode(tensors: Sequence[Tensor], layout: Sequence[int], scales: Sequence[float]) -> list[LoRAPath]:
    paths, i = [], 0
    for j, s in enumerate(scales):
        kind = KINDS[layout[3 * j]]
        n = len(PATH_ROLES[kind])
        paths.append(LoRAPath(kind, tuple(tensors[i:i + n]), s, layout[3 * j + 1], layout[3 * j + 2]))
        i += n
    return paths


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sharelora::fused_lora_linear", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], tensors: list[Tensor], layout: list[int],
                scales: list[float], dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """Returns y (M, N) in x's dtype and h = dropout(x) A_eff^T (M, R) float32 (saved for backward)."""
    tables = build_tables(_decode(tensors, layout, scales), x.device)
    h = lowrank_project(x, tables.a, tables.dtype, tables.periodic, None, dropout_p, seed)
    y = _fused_linear(x, weight.t(), None if bias is None else bias.contiguous(), h, tables.b, tables.dtype,
                      tables.periodic, tables.scale, 0.0, seed)
    return y, h


@_forward_op.register_fake
def _(x, weight, bias, tensors, layout, scales, dropout_p, seed):
    r = sum(path_rank(p) for p in _decode(tensors, layout, scales))
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], r), dtype=torch.float32)


@torch.library.custom_op("sharelora::fused_lora_linear_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, weight: Tensor, h: Tensor, tensors: list[Tensor], layout: list[int],
                 scales: list[float], dropout_p: float, seed: Tensor, needs_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx (M, K) in x's dtype (empty unless needs_dx), dA_eff (R, K) and dB_eff^T (R, N) float32."""
    tables = build_tables(_decode(tensors, layout, scales), x.device)
    dh = lowrank_project(dy, tables.b, tables.dtype, tables.periodic, tables.scale)
    if needs_dx:
        dx = _fused_linear(dy, weight, None, dh, tables.a, tables.dtype, tables.periodic, None, dropout_p, seed)
    else:
        dx = x.new_empty((0,))
    grad_a = lowrank_grad(dh, x, dropout_p, seed)
    grad_b = lowrank_grad(h * tables.scale, dy)
    return dx, grad_a, grad_b


@_backward_op.register_fake
def _(dy, x, weight, h, tensors, layout, scales, dropout_p, seed, needs_dx):
    r = h.shape[1]
    dx = x.new_empty(x.shape if needs_dx else (0,))
    return dx, x.new_empty((r, x.shape[1]), dtype=torch.float32), x.new_empty((r, dy.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, tensors, layout, scales, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, output[1], seed, *tensors)
    ctx.layout, ctx.scales, ctx.dropout_p = layout, scales, dropout_p


def _backward(ctx, dy, _dh):
    x, weight, h, seed, *tensors = ctx.saved_tensors
    dx, grad_a, grad_b = _backward_op(dy, x, weight, h, tensors, ctx.layout, ctx.scales, ctx.dropout_p, seed,
                                      ctx.needs_input_grad[0])
    sink = GradSink(tensors, [t.requires_grad for t in tensors])
    i0, r0 = 0, 0
    for p in _decode(tensors, ctx.layout, ctx.scales):
        r1 = r0 + path_rank(p)
        for role, g, window in (*chain_a(p, grad_a[r0:r1]), *chain_b(p, grad_b[r0:r1])):
            sink.add(i0 + role, g, window)
        i0, r0 = i0 + len(p.tensors), r1
    return (dx if ctx.needs_input_grad[0] else None), None, None, sink.grads(), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry
def _check(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float) -> None:
    """Raise ValueError naming the problem when the inputs do not fit one another."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[-1]} features but weight has shape {tuple(weight.shape)}, expected (N, K)")
    k, n = weight.shape[1], weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected (N,) = ({n},)")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the triton backend takes a frozen weight and bias (requires_grad=False)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got x on {x.device}")
    for t in (weight, *([bias] if bias is not None else [])):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"the triton backend needs x, weight and bias in one dtype and device: x is {x.dtype} "
                             f"on {x.device}, the weight or bias {t.dtype} on {t.device}")
    adapter_dtype = paths[0].tensors[0].dtype if paths else x.dtype
    for t in (t for p in paths for t in p.tensors):
        if t.dtype != adapter_dtype or t.device != x.device:
            raise ValueError(f"the triton backend needs every adapter tensor in one dtype on x's device ({x.device}): "
                             f"found {adapter_dtype} and {t.dtype} on {t.device}")
    for what, dtype in (("x", x.dtype), ("the adapters", adapter_dtype)):
        if dtype not in TL_DTYPES:
            raise ValueError(f"the triton backend supports float32, bfloat16, float16; {what} are {dtype}")
    for i, p in enumerate(paths):
        _check_path(i, p, k, n)


def _check_path(i: int, p: LoRAPath, k: int, n: int) -> None:
    if p.kind not in PATH_ROLES:
        raise ValueError(f"path {i}: unknown kind {p.kind!r}")
    if len(p.tensors) != len(PATH_ROLES[p.kind]):
        raise ValueError(f"path {i} ({p.kind}) needs tensors {PATH_ROLES[p.kind]}, got {len(p.tensors)}")
    t = p.tensors
    if any(u.dim() != 2 for u in t):
        raise ValueError(f"path {i} ({p.kind}): every tensor must be 2-D, got {[tuple(u.shape) for u in t]}")
    r = path_rank(p)
    kind = p.kind
    if kind == "gate":
        m, gn, g = t[0].shape[1], t[1].shape[0], r
        expect = [(t[0].shape[0], m), (gn, t[0].shape[0]), (g, k), (m, g), (g, gn), (n, g)]
    elif kind == "kron":
        d = t[0].shape[1]
        if k % d or n % d:
            raise ValueError(f"path {i} (kron): d={d} must divide K={k} and N={n}")
        expect = [(r, d), (d, r), (1, k // d), (n // d, 1)]
    elif kind == "slice":
        if p.k_offset < 0 or p.k_offset + k > t[0].shape[1]:
            raise ValueError(f"path {i} (slice): k_offset={p.k_offset} + K={k} exceeds A's K_max={t[0].shape[1]}")
        if p.n_offset < 0 or p.n_offset + n > t[1].shape[0]:
            raise ValueError(f"path {i} (slice): n_offset={p.n_offset} + N={n} exceeds B's N_max={t[1].shape[0]}")
        expect = [(r, t[0].shape[1]), (t[1].shape[0], r)]
    else:
        expect = [(r, k), (n, r)]
    for role, u, e in zip(PATH_ROLES[kind], t, expect):
        if tuple(u.shape) != e:
            raise ValueError(f"path {i} ({kind}): {role} has shape {tuple(u.shape)}, expected {e} (K={k}, N={n}, r={r})")


def fused_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath],
                      dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """The Triton path of ``ops.lora_linear``: x (..., K) -> (..., N), same dtype throughout.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    _check(x, weight, bias, paths, dropout_p)
    p = dropout_p if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    seed = dropout_seed(p, x.device)
    tensors, layout, scales = _encode(paths)
    y, _ = _forward_op(x2, weight, bias, tensors, layout, scales, p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])
