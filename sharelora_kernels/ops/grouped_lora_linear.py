"""Grouped LoRA linear: G modules that read the same x (q/k/v, gate/up), forward and backward together.

    y_g = x W_g^T + b_g + sum_p s_p path_p(dropout(x))        g = 0..G-1

Shapes: x (M, K); W_g (N_g, K) frozen (separate tensors, never concatenated); b_g (N_g,) or None;
y_g (M, N_g) in x's dtype. One dropout mask on x is shared by the whole group.

Forward (two launches for the group):
  1. ``h = dropout(x) A_u^T`` (M, R_u) fp32 in one pass over x (which draws the group's one dropout
     mask and keeps it bit-packed for backward), where A_u holds every *distinct*
     A-view of the group once: two modules whose path reads the same tensors through the same view
     (same A and k_offset; same A_s and K_A; same gate core and G_id), e.g. the intra/inter shared
     paths of q, k and v, share its columns of h (computed once).
  2. every ``y_g`` in ONE grouped GEMM launch (``_grouped_linear_kernel``): a per-module table of
     pointers (W_g, b_g, y_g, the module's columns of h, its B_eff factor table) and a flat grid of
     the modules' output tiles; the low-rank term is fused in the epilogue as in the single op.
Backward:
  1. per module, ``s * dy_g B_eff_g`` and ``dB_eff_g^T = (s h_g)^T dy_g`` from one read of dy_g
     (``dy_lowrank``); the first summed into the distinct columns: ``dh_u``.
  2. ``dx = sum_g dy_g W_g + mask(dh_u A_u) / (1 - p)``: ONE GEMM whose K-reduction runs over the
     concatenation of the modules' N_g (the same kernel, one problem with G segments).
  3. ``dA_u = dh_u^T dropout(x)`` once for the distinct views (``lowrank_grad``, M split with an
     ordered reduction, or atomic with ``SHARELORA_ATOMIC_GRADS=1``); every factor gradient is
     added into the windows of the call's fp32 gradient buffers (``shared_grad``) by its chain.

Loads. The strides the group shares (the unit strides, W's row stride) are kernel arguments, and
when the launcher has checked that every segment's pointers, row strides and sizes are 16-byte
multiples the kernel states so (``tl.multiple_of``): the base-GEMM loop then compiles to 16-byte
loads, as the single-module kernel's does (``compile_check`` reports the narrow loads it finds).
Operands in another layout (a transposed x or dy, a non-contiguous W_g) are copied row-major first.

Registered as ``sharelora::grouped_lora_linear`` (returns [y_0..y_{G-1}, h]) and
``sharelora::grouped_lora_linear_backward`` (mutates the gradient buffers), with fake impls.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..plan import PATH_ROLES
from ..reference import LoRAPath
from .autotune import TunedKernel
from .dy_lowrank import dy_lowrank
from .fused_lora_linear import SPACES, _check
from .gemm_tiles import LOWRANK_CHUNK, lowrank_tile, matmul_tile, tile_coords
from .lowrank_grad import lowrank_grad
from .lowrank_input import lowrank_project
from .shared_grad import GradSink, atomic_grads, chain_a, chain_b
from .tables import index_tensor, path_rank, tables_for
from .utils import TL_DTYPES, dot_precision, dropout_seed, mask_words

KINDS = tuple(PATH_ROLES)


# ----------------------------------------------------------------------------- grouped GEMM kernel
@triton.jit(do_not_specialize=["M"])
def _grouped_linear_kernel(
    prob_ptr, seg_ptr, mask_ptr, p, M, G, N_SUM, K_SUM, R_MAX, M_BUCKET, stride_ak, stride_wk, stride_wn, stride_mm,
    APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """For each problem g (a row of 13 int64 of prob_ptr, laid out by ``grouped_linear``; 4 per
    segment row of seg_ptr): out_g (M, N_g) = sum
    over its segments s of a_s (M, K_s) @ w_s (K_s, N_g) + bias_g + mask((h_g * scale_g) @ U_g) / (1 - p).
    Programs are the problems' output tiles laid end to end (problem order, GROUP_M swizzle inside).
    Every segment shares stride_ak, stride_wk, stride_wn; ALIGNED: every pointer, row stride, K_s and
    N_g is a multiple of 16 bytes."""
    vec: tl.constexpr = 128 // DTYPE.primitive_bitwidth if ALIGNED else 1  # elements per 16 bytes
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    prob = pid * 0
    tile0 = pid * 0
    start = pid * 0
    for g in range(0, G):
        mine = pid >= start
        prob = tl.where(mine, g, prob)
        tile0 = tl.where(mine, start, tile0)
        start += grid_m * tl.cdiv(tl.load(prob_ptr + g * 13).to(tl.int32), BLOCK_N)
    row = prob_ptr + prob * 13
    N = tl.multiple_of(tl.load(row).to(tl.int32), vec)
    _, pid_n, rows64, row_mask, cols, col_mask = tile_coords(pid - tile0, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    acc = lowrank_tile(tl.load(row + 5).to(tl.pointer_type(tl.float32)), tl.load(row + 8).to(tl.pointer_type(tl.int64)),
                       tl.load(row + 9).to(tl.pointer_type(tl.float32)), mask_ptr, p, stride_mm, rows64, row_mask,
                       pid_n * BLOCK_N, cols, col_mask, N, tl.load(row + 10).to(tl.int32), tl.load(row + 6), tl.load(row + 7), APPLY_SCALE,
                       DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, DTYPE, FACTOR_DTYPE, PERIODIC)
    seg_first = tl.load(row + 11).to(tl.int32)
    for s in range(seg_first, seg_first + tl.load(row + 12).to(tl.int32)):
        seg = seg_ptr + s * 4
        a_ptr = tl.multiple_of(tl.load(seg).to(tl.pointer_type(DTYPE)), vec * (DTYPE.primitive_bitwidth // 8))
        w_ptr = tl.multiple_of(tl.load(seg + 2).to(tl.pointer_type(DTYPE)), vec * (DTYPE.primitive_bitwidth // 8))
        acc = matmul_tile(acc, a_ptr, tl.multiple_of(tl.load(seg + 1), vec), stride_ak, w_ptr, stride_wk, stride_wn,
                          rows64, row_mask, cols, col_mask, tl.multiple_of(tl.load(seg + 3).to(tl.int32), vec),
                          DOT_PRECISION, BLOCK_K, False)  # the row stride is an int64 table entry: offsets are int64
    bias_addr = tl.load(row + 4)
    if bias_addr != 0:
        acc += tl.load(bias_addr.to(tl.pointer_type(DTYPE)) + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    out = out_ptr + rows64[:, None] * tl.load(row + 2) + cols[None, :] * tl.load(row + 3)
    tl.store(out, acc.to(DTYPE), mask=row_mask[:, None] & col_mask[None, :])


grouped_kernel = TunedKernel(_grouped_linear_kernel, SPACES,
                             key=["N_SUM", "K_SUM", "R_MAX", "M_BUCKET", "G", "DROPOUT", "stride_wk", "FACTOR_DTYPE"])


class Problem(NamedTuple):
    """One output of a grouped launch: out (M, N) = sum_s a_s @ w_s + bias + low-rank term.

    segments: (a (M, K_s), w_kn (K_s, N)) pairs, a row-major and every w_kn in one layout (W_g^T
    or W_g, W_g contiguous); h (M, R) fp32 and table (R, 5) over N for the low-rank term; scale
    (R,) fp32 (used when the launch applies scales)."""

    out: Tensor
    bias: Tensor | None
    segments: list[tuple[Tensor, Tensor]]
    h: Tensor
    table: Tensor
    scale: Tensor


def _aligned(problems: Sequence[Problem]) -> bool:
    """Whether every segment's pointers, row strides and sizes and every N_g are 16-byte multiples."""
    es = problems[0].out.element_size()
    ok = lambda *values: all((v * es) % 16 == 0 for v in values)
    return all(ok(q.out.shape[1]) and all(a.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and ok(a.stride(0), a.shape[1])
                                          for a, w in q.segments) for q in problems)


def grouped_linear(problems: Sequence[Problem], factor_dtype: tl.dtype, periodic: bool, apply_scale: bool,
                   dropout_p: float, mask: Tensor) -> None:
    """Fill every ``problem.out`` in one launch of ``_grouped_linear_kernel`` (``periodic``: some
    problem's table may hold Kronecker rows; ``mask``: the bit-packed dropout mask of the outputs'
    coordinates, read when ``dropout_p > 0``)."""
    first = problems[0]
    m, dtype, device = first.out.shape[0], first.out.dtype, first.out.device
    a0, w0 = first.segments[0]
    prob_rows, seg_rows = [], []
    for q in problems:
        prob_rows.append([q.out.shape[1], q.out.data_ptr(), q.out.stride(0), q.out.stride(1),
                          0 if q.bias is None else q.bias.data_ptr(), q.h.data_ptr(), q.h.stride(0), q.h.stride(1),
                          q.table.data_ptr(), q.scale.data_ptr(), q.table.shape[0], len(seg_rows), len(q.segments)])
        seg_rows += [[a.data_ptr(), a.stride(0), w.data_ptr(), a.shape[1]] for a, w in q.segments]
        assert all(a.stride(1) == a0.stride(1) and w.stride() == w0.stride() for a, w in q.segments)
    ns = [q.out.shape[1] for q in problems]
    if m == 0 or sum(ns) == 0:
        return
    prob = torch.tensor(prob_rows, dtype=torch.int64).to(device)
    seg = torch.tensor(seg_rows, dtype=torch.int64).to(device)
    r_max = max(q.table.shape[0] for q in problems)
    dropout = dropout_p > 0
    grid = lambda meta: (sum(triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]) for n in ns),)
    grouped_kernel[grid](
        prob, seg, mask if dropout else prob, dropout_p, m, len(problems), sum(ns), sum(a.shape[1] for a, _ in first.segments),
        r_max, triton.next_power_of_2(m), a0.stride(1), w0.stride(0), w0.stride(1), mask.stride(0) if dropout else 0,
        APPLY_SCALE=apply_scale, DROPOUT=dropout, ALIGNED=_aligned(problems), DOT_PRECISION=dot_precision(dtype),
        DTYPE=TL_DTYPES[dtype], FACTOR_DTYPE=factor_dtype, PERIODIC=periodic, BLOCK_R=LOWRANK_CHUNK,
    )


def _row_major(t: Tensor) -> Tensor:
    """t, or a row-major copy when its last dim is not unit-stride (the grouped kernel shares that stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- the group's paths
class Group(NamedTuple):
    """Decoded paths of a group: ``paths[g]`` the LoRAPaths of module g, ``roles[g][j]`` the indices
    in the op's tensor list of path j's tensors, ``views`` one representative path per distinct A-view,
    ``cols[g]`` the columns of h (distinct views, ranks concatenated) that module g's ranks read."""

    paths: list[list[LoRAPath]]
    roles: list[list[list[int]]]
    views: list[LoRAPath]
    view_roles: list[list[int]]
    cols: list[list[int]]


def _view_key(kind: str, idx: list[int], k_offset: int) -> tuple:
    """Paths with equal keys have the same A_eff (so the same h)."""
    if kind in ("plain", "slice"):
        return ("window", idx[0], k_offset)
    if kind == "kron":
        return ("kron", idx[0], idx[2])
    return ("gate", *idx[:5])


def encode(paths: Sequence[Sequence[LoRAPath]]) -> tuple[list[Tensor], list[int], list[float]]:
    """Flatten a group's paths: distinct tensors (by identity), per path
    [module, kind code, k_offset, n_offset, tensor indices...], and per-path scales."""
    tensors, index, layout, scales = [], {}, [], []
    for g, module_paths in enumerate(paths):
        for p in module_paths:
            idx = []
            for t in p.tensors:
                if id(t) not in index:
                    index[id(t)] = len(tensors)
                    tensors.append(t)
                idx.append(index[id(t)])
            layout += [g, KINDS.index(p.kind), p.k_offset, p.n_offset, *idx]
            scales.append(float(p.scale))
    return tensors, layout, scales


def decode(tensors: Sequence[Tensor], layout: Sequence[int], scales: Sequence[float], modules: int) -> Group:
    paths, roles = [[] for _ in range(modules)], [[] for _ in range(modules)]
    views, view_roles, view_cols, cols = [], [], {}, [[] for _ in range(modules)]
    i = 0
    for s in scales:
        g, kind, k_off, n_off = layout[i:i + 4]
        kind = KINDS[kind]
        idx = list(layout[i + 4:i + 4 + len(PATH_ROLES[kind])])
        i += 4 + len(idx)
        path = LoRAPath(kind, tuple(tensors[j] for j in idx), s, k_off, n_off)
        paths[g].append(path)
        roles[g].append(idx)
        key = _view_key(kind, idx, k_off)
        if key not in view_cols:
            c0 = sum(path_rank(v) for v in views)
            view_cols[key] = list(range(c0, c0 + path_rank(path)))
            views.append(path)
            view_roles.append(idx)
        cols[g] += view_cols[key]
    return Group(paths, roles, views, view_roles, cols)


def _columns(h: Tensor, cols: list[int]) -> Tensor:
    """h[:, cols]: a view when the columns are one contiguous run, else a copy (cached device index)."""
    if cols and cols == list(range(cols[0], cols[0] + len(cols))):
        return h[:, cols[0]:cols[0] + len(cols)]
    return h.index_select(1, index_tensor(cols, h.device))


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sharelora::grouped_lora_linear", mutates_args=())
def _forward_op(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], tensors: list[Tensor],
                layout: list[int], scales: list[float], dropout_p: float, seed: Tensor) -> list[Tensor]:
    """Returns [y_0 (M, N_0), ..., y_{G-1}, h (M, R_u) float32 = dropout(x) A_u^T, the dropout mask
    (M, ceil(K / 32)) int32 bit-packed (empty when dropout_p == 0)]; h and the mask are saved for backward."""
    grp = decode(tensors, layout, scales, len(weights))
    views = tables_for(grp.views, x.device)
    h, mask = lowrank_project(x, views.a, views.dtype, views.periodic, dropout_p, seed)
    xr = _row_major(x)
    ys, problems, periodic = [], [], views.periodic
    for w, b, module_paths, cols in zip(weights, biases, grp.paths, grp.cols):
        tables = tables_for(module_paths, x.device)
        y = x.new_empty((x.shape[0], w.shape[0]))
        problems.append(Problem(y, None if b is None else b.contiguous(), [(xr, w.contiguous().t())],
                                _columns(h, cols), tables.b, tables.scale))
        ys.append(y)
        periodic = periodic or tables.periodic
    grouped_linear(problems, views.dtype, periodic, True, 0.0, mask)
    return [*ys, h, mask]


@_forward_op.register_fake
def _(x, weights, biases, tensors, layout, scales, dropout_p, seed):
    grp = decode(tensors, layout, scales, len(weights))
    r, m = sum(path_rank(v) for v in grp.views), x.shape[0]
    mask = x.new_empty((m, mask_words(x.shape[1])) if dropout_p > 0 else (0,), dtype=torch.int32)
    return [*(x.new_empty((m, w.shape[0])) for w in weights), x.new_empty((m, r), dtype=torch.float32), mask]


def _add_chain(paths: list[LoRAPath], roles: list[list[int]], factor: str, grad: Tensor, bufs: list[Tensor]) -> None:
    """Add the gradient of every path's A_eff (``factor`` "a", grad (R, K)) or B_eff^T ("b", (R, N)),
    ranks concatenated in path order, into the windows of the tensors' fp32 buffers (empty buffer: no
    gradient wanted), through each path's chain rule (``shared_grad``)."""
    chain = chain_a if factor == "a" else chain_b
    r0 = 0
    for p, idx in zip(paths, roles):
        r1 = r0 + path_rank(p)
        for role, g, (w0, w1) in chain(p, grad[r0:r1]):
            buf = bufs[idx[role]]
            if buf.numel():
                buf[w0:w0 + g.shape[0], w1:w1 + g.shape[1]].add_(g)
        r0 = r1


@torch.library.custom_op("sharelora::grouped_lora_linear_backward", mutates_args=("bufs",))
def _backward_op(dys: list[Tensor], x: Tensor, weights: list[Tensor], h: Tensor, mask: Tensor, tensors: list[Tensor],
                 layout: list[int], scales: list[float], dropout_p: float, needs_dx: bool, bufs: list[Tensor],
                 atomic: bool) -> Tensor:
    """Returns dx (M, K) in x's dtype (empty unless needs_dx); adds every tensor's gradient into bufs[i]
    (fp32, the tensor's shape; an empty tensor for a tensor that needs none). mask: the forward's."""
    grp = decode(tensors, layout, scales, len(weights))
    views = tables_for(grp.views, x.device)
    dh = torch.zeros_like(h)
    dys = [_row_major(dy) for dy in dys]
    for dy, module_paths, module_roles, cols in zip(dys, grp.paths, grp.roles, grp.cols):
        tables = tables_for(module_paths, x.device)
        dh_g, grad_b = dy_lowrank(dy, _columns(h, cols), tables.b, tables.scale, tables.dtype, tables.periodic)
        dh.index_add_(1, index_tensor(cols, x.device), dh_g)  # index_add_: two paths of one module may read one view
        _add_chain(module_paths, module_roles, "b", grad_b, bufs)
    dx = x.new_empty((0,))
    if needs_dx:
        dx = x.new_empty(x.shape)
        grouped_linear([Problem(dx, None, [(dy, w.contiguous()) for dy, w in zip(dys, weights)], dh, views.a,
                                views.scale)], views.dtype, views.periodic, False, dropout_p, mask)
    _add_chain(grp.views, grp.view_roles, "a", lowrank_grad(dh, x, mask, dropout_p, atomic), bufs)
    return dx


@_backward_op.register_fake
def _(dys, x, weights, h, mask, tensors, layout, scales, dropout_p, needs_dx, bufs, atomic):
    return x.new_empty(x.shape if needs_dx else (0,))


def _setup_context(ctx, inputs, output):
    x, weights, biases, tensors, layout, scales, dropout_p, seed = inputs
    ctx.save_for_backward(x, output[-2], output[-1], *weights, *tensors)
    ctx.layout, ctx.scales, ctx.dropout_p, ctx.modules = layout, scales, dropout_p, len(weights)
    ctx.atomic = atomic_grads()
    # The frozen base gets no gradient: one None per weight, and one per bias when every bias is a
    # tensor (torch.library treats a list holding a None as one opaque argument: a single None).
    ctx.bias_grads = [None] * len(biases) if all(b is not None for b in biases) else None


def _backward(ctx, grads):
    x, h, mask, *rest = ctx.saved_tensors
    weights, tensors = rest[:ctx.modules], rest[ctx.modules:]
    dys = list(grads[:-2])
    sink = GradSink(tensors, [t.requires_grad for t in tensors])
    bufs = [b if b is not None else x.new_empty((0,), dtype=torch.float32) for b in sink.buffers]
    dx = _backward_op(dys, x, weights, h, mask, tensors, ctx.layout, ctx.scales, ctx.dropout_p, x.requires_grad,
                      bufs, ctx.atomic)
    return (dx if x.requires_grad else None), [None] * ctx.modules, ctx.bias_grads, sink.grads(), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry
def _check_group(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                 paths: Sequence[Sequence[LoRAPath]], dropout_p: float) -> None:
    """Raise ValueError naming the problem when the group's inputs do not fit one another."""
    if not len(weights) == len(biases) == len(paths) or not weights:
        raise ValueError(f"grouped_lora_linear needs one weight, bias and path list per module, got "
                         f"{len(weights)} weights, {len(biases)} biases, {len(paths)} path lists")
    dtypes = set()
    for g, (w, b, ps) in enumerate(zip(weights, biases, paths)):
        if not ps:
            raise ValueError(f"module {g} of the group has no low-rank path (the triton backend needs one)")
        try:
            _check(x, w, b, ps, dropout_p)
        except ValueError as e:
            raise ValueError(f"module {g} of the group: {e}") from None
        dtypes.add(ps[0].tensors[0].dtype)
    if len(dtypes) > 1:
        raise ValueError(f"the triton backend needs every adapter of the group in one dtype, found {sorted(map(str, dtypes))}")


def grouped_lora_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                        paths: Sequence[Sequence[LoRAPath]], dropout_p: float = 0.0,
                        training: bool = False) -> tuple[Tensor, ...]:
    """The Triton path of ``ops.grouped_lora_linear``: x (..., K) -> one (..., N_g) output per module.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    _check_group(x, weights, biases, paths, dropout_p)
    p = dropout_p if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    seed = dropout_seed(p, x.device)
    tensors, layout, scales = encode(paths)
    outs = _forward_op(x2, list(weights), list(biases), tensors, layout, scales, p, seed)
    return tuple(y.reshape(*x.shape[:-1], w.shape[0]) for y, w in zip(outs[:-2], weights))
