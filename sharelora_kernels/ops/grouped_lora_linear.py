"""Grouped LoRA linear: G modules that read the same x (q/k/v, gate/up), forward and backward together.

    y_g = x W_g^T + b_g + sum_p s_p path_p(dropout(x))        g = 0..G-1

Shapes: x (M, K); W_g (N_g, K) frozen (separate tensors, never concatenated); b_g (N_g,) or None;
y_g (M, N_g) in x's dtype. One dropout mask on x is shared by the whole group.

Forward (two launches for the group):
  1. ``h = dropout(x) A_u^T`` (M, R_u) fp32 in one pass over x, where A_u holds every *distinct*
     A-view of the group once: two modules whose path reads the same tensors through the same view
     (same A and k_offset; same A_s and K_A; same gate core and G_id), e.g. the intra/inter shared
     paths of q, k and v, share its columns of h (computed once).
  2. every ``y_g`` in ONE grouped GEMM launch (``_grouped_linear_kernel``): a per-module table of
     pointers (W_g, b_g, y_g, the module's columns of h, its B_eff factor table) and a flat grid of
     the modules' output tiles; the low-rank term is fused in the epilogue as in the single op.
Backward:
  1. ``dh_u = sum_g s * dy_g B_eff_g`` scattered into the distinct columns (one skinny pass per dy_g).
  2. ``dx = sum_g dy_g W_g + mask(dh_u A_u) / (1 - p)``: ONE GEMM whose K-reduction runs over the
     concatenation of the modules' N_g (the same kernel, one problem with G segments).
  3. ``dA_u = dh_u^T dropout(x)`` once for the distinct views and ``dB_eff_g^T = (s h_g)^T dy_g``
     per module, written by the kernel straight into the windows of the call's fp32 gradient
     buffers (``shared_grad``) for plain and slice paths; gate and kron go through their chain.

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
from .fused_lora_linear import _CONFIGS, _check, lowrank_tile, matmul_tile, swizzled_tile
from .lowrank_grad import lowrank_grad
from .lowrank_input import lowrank_project
from .shared_grad import GradSink, atomic_grads, chain_a, chain_b, direct_window
from .utils import TL_DTYPES, _rows, build_tables, dot_precision, dropout_seed, path_rank, rank_block, rng_needs_int64

KINDS = tuple(PATH_ROLES)


# ----------------------------------------------------------------------------- grouped GEMM kernel
@triton.autotune(configs=_CONFIGS, key=["N_SUM", "K_SUM", "R_MAX", "M_BUCKET", "G"])
@triton.jit
def _grouped_linear_kernel(
    prob_ptr, seg_ptr, seed_ptr, p, M, G, N_SUM, K_SUM, R_MAX, M_BUCKET,
    APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr, RNG64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """For each problem g (a row of 13 int64 of prob_ptr, laid out by ``grouped_linear``): out_g (M, N_g) = sum over its segments s of
    a_s (M, K_s) @ w_s (K_s, N_g) + bias_g + mask((h_g * scale_g) @ U_g) / (1 - p).
    Programs are the problems' output tiles laid end to end (problem order, GROUP_M swizzle inside)."""
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
    N = tl.load(row).to(tl.int32)
    pid_m, pid_n = swizzled_tile(pid - tile0, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    rows64 = rows.to(tl.int64)

    acc = lowrank_tile(tl.load(row + 5).to(tl.pointer_type(tl.float32)), tl.load(row + 8).to(tl.pointer_type(tl.int64)),
                       tl.load(row + 9).to(tl.pointer_type(tl.float32)), seed_ptr, p, rows, rows64, row_mask, cols,
                       col_mask, N, tl.load(row + 10).to(tl.int32), tl.load(row + 6), tl.load(row + 7), APPLY_SCALE,
                       DROPOUT, RNG64, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, DTYPE, FACTOR_DTYPE, PERIODIC)
    seg_first = tl.load(row + 11).to(tl.int32)
    for s in range(seg_first, seg_first + tl.load(row + 12).to(tl.int32)):
        seg = seg_ptr + s * 7
        acc = matmul_tile(acc, tl.load(seg).to(tl.pointer_type(DTYPE)), tl.load(seg + 1), tl.load(seg + 2),
                          tl.load(seg + 3).to(tl.pointer_type(DTYPE)), tl.load(seg + 4), tl.load(seg + 5), rows64,
                          row_mask, cols, col_mask, tl.load(seg + 6).to(tl.int32), DOT_PRECISION, BLOCK_K,
                          False)  # the strides are int64 table entries: offsets are int64 already
    bias_addr = tl.load(row + 4)
    if bias_addr != 0:
        acc += tl.load(bias_addr.to(tl.pointer_type(DTYPE)) + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    out = out_ptr + rows64[:, None] * tl.load(row + 2) + cols[None, :] * tl.load(row + 3)
    tl.store(out, acc.to(DTYPE), mask=row_mask[:, None] & col_mask[None, :])


class Problem(NamedTuple):
    """One output of a grouped launch: out (M, N) = sum_s a_s @ w_s + bias + low-rank term.

    segments: (a (M, K_s), w_kn (K_s, N)) pairs; h (M, R) fp32 and table (R, 5) over N for the
    low-rank term; scale (R,) fp32 (used when the launch applies scales)."""

    out: Tensor
    bias: Tensor | None
    segments: list[tuple[Tensor, Tensor]]
    h: Tensor
    table: Tensor
    scale: Tensor


def grouped_linear(problems: Sequence[Problem], factor_dtype: tl.dtype, periodic: bool, apply_scale: bool,
                   dropout_p: float, seed: Tensor) -> None:
    """Fill every ``problem.out`` in one launch of ``_grouped_linear_kernel`` (``periodic``: some
    problem's table may hold Kronecker rows)."""
    first = problems[0]
    m, dtype, device = first.out.shape[0], first.out.dtype, first.out.device
    prob_rows, seg_rows = [], []
    for q in problems:
        prob_rows.append([q.out.shape[1], q.out.data_ptr(), q.out.stride(0), q.out.stride(1),
                          0 if q.bias is None else q.bias.data_ptr(), q.h.data_ptr(), q.h.stride(0), q.h.stride(1),
                          q.table.data_ptr(), q.scale.data_ptr(), q.table.shape[0], len(seg_rows), len(q.segments)])
        seg_rows += [[a.data_ptr(), a.stride(0), a.stride(1), w.data_ptr(), w.stride(0), w.stride(1), a.shape[1]]
                     for a, w in q.segments]
    ns = [q.out.shape[1] for q in problems]
    if m == 0 or sum(ns) == 0:
        return
    prob = torch.tensor(prob_rows, dtype=torch.int64).to(device)
    seg = torch.tensor(seg_rows, dtype=torch.int64).to(device)
    r_max = max(q.table.shape[0] for q in problems)
    grid = lambda meta: (sum(triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]) for n in ns),)
    _grouped_linear_kernel[grid](
        prob, seg, seed, dropout_p, m, len(problems), sum(ns), sum(a.shape[1] for a, _ in first.segments), r_max,
        triton.next_power_of_2(m),
        APPLY_SCALE=apply_scale, DROPOUT=dropout_p > 0, RNG64=rng_needs_int64(m, max(ns)),
        DOT_PRECISION=dot_precision(dtype), DTYPE=TL_DTYPES[dtype], FACTOR_DTYPE=factor_dtype, PERIODIC=periodic,
        BLOCK_R=rank_block(max(r_max, 1)),
    )


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
    """h[:, cols]: a view when the columns are one contiguous run."""
    if cols and cols == list(range(cols[0], cols[0] + len(cols))):
        return h[:, cols[0]:cols[0] + len(cols)]
    return h[:, cols]


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sharelora::grouped_lora_linear", mutates_args=())
def _forward_op(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], tensors: list[Tensor],
                layout: list[int], scales: list[float], dropout_p: float, seed: Tensor) -> list[Tensor]:
    """Returns [y_0 (M, N_0), ..., y_{G-1}, h (M, R_u) float32 = dropout(x) A_u^T (saved for backward)]."""
    grp = decode(tensors, layout, scales, len(weights))
    views = build_tables(grp.views, x.device)
    h = lowrank_project(x, views.a, views.dtype, views.periodic, None, dropout_p, seed)
    ys, problems, keep = [], [], []
    for w, b, module_paths, cols in zip(weights, biases, grp.paths, grp.cols):
        tables = build_tables(module_paths, x.device)
        y = x.new_empty((x.shape[0], w.shape[0]))
        problems.append(Problem(y, None if b is None else b.contiguous(), [(x, w.t())], _columns(h, cols),
                                tables.b, tables.scale))
        ys.append(y)
        keep.append(tables)
    grouped_linear(problems, views.dtype, any(t.periodic for t in keep), True, 0.0, seed)
    return [*ys, h]


@_forward_op.register_fake
def _(x, weights, biases, tensors, layout, scales, dropout_p, seed):
    grp = decode(tensors, layout, scales, len(weights))
    r = sum(path_rank(v) for v in grp.views)
    return [*(x.new_empty((x.shape[0], w.shape[0])) for w in weights), x.new_empty((x.shape[0], r), dtype=torch.float32)]


def _add_factor_grads(paths: list[LoRAPath], roles: list[list[int]], factor: str, g: Tensor, a: Tensor,
                      dropout_p: float, seed: Tensor, bufs: list[Tensor], atomic: bool) -> None:
    """Add ``g^T dropout(a)`` (the gradient of every path's A_eff, or B_eff^T) into ``bufs``: rows of a
    plain/slice path whose tensor has a buffer go straight into its window (each tensor at most once
    per launch, so rows never alias); the others land in an fp32 scratch and go through the chain."""
    if g.shape[1] == 0 or not any(b.numel() for b in bufs):
        return
    targets, used, n_scratch = [], set(), 0  # per path: (buffer index, rank_dim, offset) or scratch row
    for p, idx in zip(paths, roles):
        win = direct_window(p, factor)
        if win is not None and bufs[idx[win[0]]].numel() and idx[win[0]] not in used:
            used.add(idx[win[0]])
            targets.append((idx[win[0]], 0, win[1][1]) if factor == "a" else (idx[win[0]], 1, win[1][0]))
        else:
            targets.append(n_scratch)
            n_scratch += path_rank(p)
    scratch = torch.zeros((n_scratch, a.shape[1]), device=a.device, dtype=torch.float32)
    rows = []
    for p, target in zip(paths, targets):
        if isinstance(target, tuple):
            rows += _rows(bufs[target[0]], target[1], target[2])
        else:
            rows += _rows(scratch, 0, 0)[target:target + path_rank(p)]
    lowrank_grad(g, a, dropout_p, seed, torch.tensor(rows, dtype=torch.int64).to(a.device), atomic)
    chain = chain_a if factor == "a" else chain_b
    for p, idx, target in zip(paths, roles, targets):
        if isinstance(target, tuple):
            continue
        for role, grad, (w0, w1) in chain(p, scratch[target:target + path_rank(p)]):
            if bufs[idx[role]].numel():
                bufs[idx[role]][w0:w0 + grad.shape[0], w1:w1 + grad.shape[1]].add_(grad)


@torch.library.custom_op("sharelora::grouped_lora_linear_backward", mutates_args=("bufs",))
def _backward_op(dys: list[Tensor], x: Tensor, weights: list[Tensor], h: Tensor, tensors: list[Tensor],
                 layout: list[int], scales: list[float], dropout_p: float, seed: Tensor, needs_dx: bool,
                 bufs: list[Tensor], atomic: bool) -> Tensor:
    """Returns dx (M, K) in x's dtype (empty unless needs_dx); adds every tensor's gradient into bufs[i]
    (fp32, the tensor's shape; an empty tensor for a tensor that needs none)."""
    grp = decode(tensors, layout, scales, len(weights))
    views = build_tables(grp.views, x.device)
    dh = torch.zeros_like(h)
    module_tables = [build_tables(ps, x.device) for ps in grp.paths]
    for dy, tables, cols in zip(dys, module_tables, grp.cols):
        # index_add_: two paths of one module may read the same A view (repeated columns)
        dh.index_add_(1, torch.tensor(cols, device=dh.device),
                      lowrank_project(dy, tables.b, tables.dtype, tables.periodic, tables.scale))
    dx = x.new_empty((0,))
    if needs_dx:
        dx = x.new_empty(x.shape)
        grouped_linear([Problem(dx, None, list(zip(dys, weights)), dh, views.a, views.scale)], views.dtype,
                       views.periodic, False, dropout_p, seed)
    _add_factor_grads(grp.views, grp.view_roles, "a", dh, x, dropout_p, seed, bufs, atomic)
    for dy, module_paths, module_roles, tables, cols in zip(dys, grp.paths, grp.roles, module_tables, grp.cols):
        _add_factor_grads(module_paths, module_roles, "b", _columns(h, cols) * tables.scale, dy, 0.0, seed, bufs,
                          atomic)
    return dx


@_backward_op.register_fake
def _(dys, x, weights, h, tensors, layout, scales, dropout_p, seed, needs_dx, bufs, atomic):
    return x.new_empty(x.shape if needs_dx else (0,))


def _setup_context(ctx, inputs, output):
    x, weights, biases, tensors, layout, scales, dropout_p, seed = inputs
    ctx.save_for_backward(x, output[-1], seed, *weights, *tensors)
    ctx.layout, ctx.scales, ctx.dropout_p, ctx.modules = layout, scales, dropout_p, len(weights)
    ctx.atomic = atomic_grads()
    # The frozen base gets no gradient: one None per weight, and one per bias when every bias is a
    # tensor (torch.library treats a list holding a None as one opaque argument: a single None).
    ctx.bias_grads = [None] * len(biases) if all(b is not None for b in biases) else None


def _backward(ctx, grads):
    x, h, seed, *rest = ctx.saved_tensors
    weights, tensors = rest[:ctx.modules], rest[ctx.modules:]
    dys = list(grads[:-1])
    sink = GradSink(tensors, [t.requires_grad for t in tensors])
    bufs = [b if b is not None else x.new_empty((0,), dtype=torch.float32) for b in sink.buffers]
    dx = _backward_op(dys, x, weights, h, tensors, ctx.layout, ctx.scales, ctx.dropout_p, seed, x.requires_grad,
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
    return tuple(y.reshape(*x.shape[:-1], w.shape[0]) for y, w in zip(outs[:-1], weights))
