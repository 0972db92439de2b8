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
  2. every ``y_g`` in ONE grouped GEMM launch (``_grouped_linear_kernel``): a per-module table
     (W_g, b_g, the module's columns of h, its B_eff factor table) and a flat grid of the modules'
     output tiles; the low-rank term is one more K-chunk of the accumulator, as in the single op.
Backward:
  1. per module, ``s * dy_g B_eff_g`` and ``dB_eff_g^T = (s h_g)^T dy_g`` from one read of dy_g
     (``dy_lowrank``); the first summed into the distinct columns: ``dh_u``.
  2. ``dx = sum_g dy_g W_g + mask(dh_u A_u) / (1 - p)``: ONE GEMM whose K-reduction runs over the
     concatenation of the modules' N_g (the same kernel, one problem with G segments).
  3. ``dA_u = dh_u^T dropout(x)`` once for the distinct views (``lowrank_grad``, M split with an
     ordered reduction, or atomic with ``SHARELORA_ATOMIC_GRADS=1``); every factor gradient is
     added into the windows of the call's fp32 gradient buffers (``shared_grad``) by its chain.

Loads. The strides the group shares (the unit strides, W's row stride) are kernel arguments, and
when the launcher has checked that every pointer, row stride and size is a 16-byte multiple the
kernel states so (``tl.multiple_of``): the base-GEMM loop then compiles to 16-byte loads, as the
single-module kernel's does (``compile_check`` reports the narrow loads it finds). Operands in
another layout (a transposed x or dy, a non-contiguous W_g) are copied contiguous first.

No host work per call. Everything the kernel reads from tables depends on the plan only (W_g's,
b_g's and the factor tables' addresses, sizes, h's column indices: ``GroupLaunch``, cached like the
factor tables, ``tables.cached``); the tensors of one call (x or the dy_g, the outputs, h) are
pointer arguments, at most ``MAX_MODULES`` of each per launch (larger groups launch in chunks).
An eager call runs ``GroupedEager`` on a ``GroupedPlan`` (the decoded paths, the tables, both
launches, the gradient routes), which an input group builds once and keeps (``grouping``).

Registered as ``sharelora::grouped_lora_linear`` (returns [y_0..y_{G-1}, h]) and
``sharelora::grouped_lora_linear_backward`` (mutates the gradient buffers), with fake impls.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import PATH_ROLES
from ..reference import LoRAPath
from .autotune import TunedKernel
from .function import first_order, thin_apply, wants_grad
from .grad_routes import Route, RouteCache
from .dy_lowrank import dy_lowrank
from .encoding import check_group_sizes
from .fused_lora_linear import SPACES, _check
from .gemm_tiles import LOWRANK_CHUNK, lowrank_tile, matmul_tile, tile_coords
from .lowrank_grad import lowrank_grad
from .lowrank_input import lowrank_project
from .shared_grad import GradSink, atomic_grads, chain_a, chain_b
from .tables import (FactorTables, cached, index_tensor, path_rank, paths_key, refresh_gates, tables_for,
                     tensor_key)
from .utils import TL_DTYPES, cdiv, dot_precision, dropout_seed, mask_words, needs_int64_index, next_power_of_2, on_device

KINDS = tuple(PATH_ROLES)


# ----------------------------------------------------------------------------- grouped GEMM kernel
MAX_MODULES = 4  # input and output pointers one launch takes as arguments; larger groups launch in chunks


@triton.jit
def _pick(i, p0, p1, p2, p3):
    """Pointer argument number ``i`` (0..3)."""
    return tl.where(i == 0, p0, tl.where(i == 1, p1, tl.where(i == 2, p2, p3)))


@triton.jit(do_not_specialize=["M"])
def _grouped_linear_kernel(
    prob_ptr, seg_ptr, hcol_ptr, a0, a1, a2, a3, out0, out1, out2, out3, h_ptr, mask_ptr, p,
    M, G, N_SUM, K_SUM, R_MAX, M_BUCKET, stride_hm, stride_ak, stride_wk, stride_wn, stride_mm,
    APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr, ALIGNED: tl.constexpr,
    INT64: tl.constexpr, DOT_PRECISION: tl.constexpr, DTYPE: tl.constexpr, FACTOR_DTYPE: tl.constexpr,
    PERIODIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """For each problem g (a row of 9 int64 of prob_ptr: N_g, output slot, bias, B table, scales,
    R_g, first h column index, first segment, segments; built once per plan by ``GroupLaunch``):
    out_g (M, N_g) (+)= sum over its segments s (4 int64: input slot, row stride, w, K_s) of
    a_s (M, K_s) @ w_s (K_s, N_g) + bias_g + mask((h[:, hcol_g] * scale_g) @ U_g) / (1 - p).
    The per-call tensors (inputs, outputs, h) are the pointer arguments; every output is contiguous,
    every input shares stride_ak, every w stride_wk / stride_wn; ALIGNED: every pointer, row stride,
    K_s and N_g is a multiple of 16 bytes; INT64: a W has 2**31 or more elements (its offsets in
    int64). Programs are the problems' output tiles end to end."""
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
        start += grid_m * tl.cdiv(tl.load(prob_ptr + g * 9).to(tl.int32), BLOCK_N)
    row = prob_ptr + prob * 9
    N = tl.multiple_of(tl.load(row).to(tl.int32), vec)
    _, pid_n, rows64, row_mask, cols, col_mask = tile_coords(pid - tile0, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = lowrank_tile(h_ptr, hcol_ptr + tl.load(row + 6), tl.load(row + 3).to(tl.pointer_type(tl.int64)),
                       tl.load(row + 4).to(tl.pointer_type(tl.float32)), mask_ptr, p, stride_mm, rows64, row_mask,
                       pid_n * BLOCK_N, cols, col_mask, N, tl.load(row + 5).to(tl.int32), stride_hm, 1, True,
                       APPLY_SCALE, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, DTYPE, FACTOR_DTYPE, PERIODIC)
    seg_first = tl.load(row + 7).to(tl.int32)
    for s in range(seg_first, seg_first + tl.load(row + 8).to(tl.int32)):
        seg = seg_ptr + s * 4
        w_ptr = tl.multiple_of(tl.load(seg + 2).to(tl.pointer_type(DTYPE)), vec * (DTYPE.primitive_bitwidth // 8))
        acc = matmul_tile(acc, _pick(tl.load(seg), a0, a1, a2, a3), tl.multiple_of(tl.load(seg + 1), vec), stride_ak,
                          w_ptr, stride_wk, stride_wn, rows64, row_mask, cols, col_mask,
                          tl.multiple_of(tl.load(seg + 3).to(tl.int32), vec), DOT_PRECISION, BLOCK_K,
                          INT64)  # x's row stride is an int64 table entry; INT64: W's offsets too
    bias_addr = tl.load(row + 2)
    if bias_addr != 0:
        acc += tl.load(bias_addr.to(tl.pointer_type(DTYPE)) + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = _pick(tl.load(row + 1), out0, out1, out2, out3) + rows64[:, None] * N + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(DTYPE), mask=mask)


grouped_kernel = TunedKernel(_grouped_linear_kernel, SPACES,
                             key=["N_SUM", "K_SUM", "R_MAX", "M_BUCKET", "G", "DROPOUT", "stride_wk", "FACTOR_DTYPE",
                                  "PERIODIC"],
                             restore_value=["out0", "out1", "out2", "out3"])  # a dx chunk adds onto dx


class Chunk(NamedTuple):
    """One launch of a ``GroupLaunch``: its problem and segment tables (device, int64), the output
    width of each problem, the summed reduction width, the largest rank, and whether it adds onto
    the outputs (a later chunk of dx's segments)."""

    prob: Tensor
    seg: Tensor
    ns: list[int]
    k_sum: int
    r_max: int
    accumulate: bool


class GroupLaunch(NamedTuple):
    """Everything of a grouped GEMM that depends on the plan only, built once and cached: the
    chunks of at most ``MAX_MODULES`` problems (forward) or segments (dx), the column index of h
    per problem, what they point at that must stay alive (the factor tables; the copies of a
    non-contiguous W_g or b_g, in a launch built for one call), W's strides, whether the static
    sizes and addresses are 16-byte aligned. A cached launch holds no parameter: its key is their
    addresses, so a replaced parameter gets a new launch and the old one is never read again."""

    chunks: list[Chunk]
    hcols: Tensor
    keep: tuple
    w_strides: tuple[int, int]
    aligned: bool
    factor_dtype: tl.dtype
    periodic: bool
    int64: bool  # W offsets in int64 (``needs_int64_index`` of the weights)


def _table(rows: list[list[int]], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1).to(device)


def forward_launch(weights: Sequence[Tensor], biases: Sequence[Tensor | None], module_tables: Sequence[FactorTables],
                   cols: Sequence[list[int]], device: torch.device, keep: tuple = ()) -> GroupLaunch:
    """The forward: problem g is y_g = x W_g^T + b_g + (h[:, cols_g] s_g) B_eff_g^T (W_g, b_g contiguous)."""
    k = weights[0].shape[1]
    offsets = [sum(len(c) for c in cols[:g]) for g in range(len(cols))]
    chunks = []
    for c0 in range(0, len(weights), MAX_MODULES):
        prob = [[w.shape[0], g - c0, 0 if b is None else b.data_ptr(), t.b.data_ptr(), t.scale.data_ptr(),
                 t.b.shape[0], offsets[g], g - c0, 1]
                for g, (w, b, t) in enumerate(zip(weights, biases, module_tables)) if c0 <= g < c0 + MAX_MODULES]
        seg = [[0, k, w.data_ptr(), k] for w in weights[c0:c0 + MAX_MODULES]]
        chunks.append(Chunk(_table(prob, device), _table(seg, device), [r[0] for r in prob], k, max(r[5] for r in prob),
                            False))
    aligned = _aligned_static([k, *(w.shape[0] for w in weights)], [w.data_ptr() for w in weights] +
                              [b.data_ptr() for b in biases if b is not None], weights[0].element_size())
    return GroupLaunch(chunks, index_tensor([c for cs in cols for c in cs], device, torch.int32),
                       (*module_tables, *keep), (1, k), aligned, module_tables[0].dtype,
                       any(t.periodic for t in module_tables), needs_int64_index(*weights))


def dx_launch(weights: Sequence[Tensor], views: FactorTables, device: torch.device, keep: tuple = ()) -> GroupLaunch:
    """dx = sum_g dy_g W_g + mask(dh A_u) / (1 - p): one problem, a segment per module (W_g contiguous);
    chunks of MAX_MODULES segments, the first with the low-rank term, the others adding onto dx."""
    k, r = weights[0].shape[1], views.a.shape[0]
    chunks = []
    for c0 in range(0, len(weights), MAX_MODULES):
        part = weights[c0:c0 + MAX_MODULES]
        rank = r if c0 == 0 else 0
        prob = [[k, 0, 0, views.a.data_ptr(), views.scale.data_ptr(), rank, 0, 0, len(part)]]
        seg = [[i, w.shape[0], w.data_ptr(), w.shape[0]] for i, w in enumerate(part)]
        chunks.append(Chunk(_table(prob, device), _table(seg, device), [k], sum(w.shape[0] for w in part), rank,
                            c0 > 0))
    aligned = _aligned_static([k, *(w.shape[0] for w in weights)], [w.data_ptr() for w in weights],
                              weights[0].element_size())
    return GroupLaunch(chunks, index_tensor(list(range(r)), device, torch.int32), (views, *keep), (k, 1), aligned,
                       views.dtype, views.periodic, needs_int64_index(*weights))


def _aligned_static(sizes: list[int], addresses: list[int], elem_bytes: int) -> bool:
    return all((n * elem_bytes) % 16 == 0 for n in sizes) and all(a % 16 == 0 for a in addresses)


def grouped_linear(launch: GroupLaunch, inputs: Sequence[Tensor], outputs: Sequence[Tensor], h: Tensor,
                   apply_scale: bool, dropout_p: float, mask: Tensor) -> None:
    """Run ``launch``'s chunks: forward (inputs [x], one output per module) or dx (one input dy_g
    per module, outputs [dx]); h (M, R) fp32 (forward: h, dx: dh); ``mask``: the bit-packed dropout
    mask of the outputs' coordinates, read when ``dropout_p > 0``. Inputs and outputs contiguous."""
    m = outputs[0].shape[0]
    if m == 0:
        return
    dtype = outputs[0].dtype
    aligned = launch.aligned and all(t.data_ptr() % 16 == 0 for t in (*inputs, *outputs))
    dropout = dropout_p > 0
    for c, chunk in enumerate(launch.chunks):
        ins = inputs if len(inputs) == 1 else inputs[c * MAX_MODULES:(c + 1) * MAX_MODULES]
        outs = outputs if len(outputs) == 1 else outputs[c * MAX_MODULES:(c + 1) * MAX_MODULES]
        ins, outs = [*ins, *[ins[0]] * (4 - len(ins))], [*outs, *[outs[0]] * (4 - len(outs))]
        grid = lambda meta: (sum(cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]) for n in chunk.ns),)
        with on_device(h):
            grouped_kernel[grid](
                chunk.prob, chunk.seg, launch.hcols, *ins, *outs, h, mask if dropout else h, dropout_p,
                m, len(chunk.ns), sum(chunk.ns), chunk.k_sum, chunk.r_max, next_power_of_2(m), h.stride(0), 1,
                *launch.w_strides, mask.stride(0) if dropout else 0,
                APPLY_SCALE=apply_scale, DROPOUT=dropout, ACCUMULATE=chunk.accumulate, ALIGNED=aligned,
                INT64=launch.int64,
                DOT_PRECISION=dot_precision(dtype), DTYPE=TL_DTYPES[dtype], FACTOR_DTYPE=launch.factor_dtype,
                PERIODIC=launch.periodic, BLOCK_R=LOWRANK_CHUNK,
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
    """h[:, cols]: a view when the columns are one contiguous run, else a copy (cached device index)."""
    if cols and cols == list(range(cols[0], cols[0] + len(cols))):
        return h[:, cols[0]:cols[0] + len(cols)]
    return h.index_select(1, index_tensor(cols, h.device))


# ----------------------------------------------------------------------------- custom ops
def _contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _forward_launch(weights: list[Tensor], biases: list[Tensor | None], grp: Group,
                    device: torch.device) -> GroupLaunch:
    """The cached forward launch of the group (built per call, from contiguous copies, for a W_g or
    b_g that is not contiguous: an unusual layout this does not optimise)."""
    module_tables = [tables_for(ps, device) for ps in grp.paths]
    if all(t is None or t.is_contiguous() for t in (*weights, *biases)):
        key = ("grouped forward", *map(tensor_key, weights), *map(tensor_key, biases),
               *(paths_key(ps, device) for ps in grp.paths), tuple(map(tuple, grp.cols)))
        return cached(key, lambda: forward_launch(weights, biases, module_tables, grp.cols, device))
    copies = [w.contiguous() for w in weights], [_contiguous(b) for b in biases]
    return forward_launch(*copies, module_tables, grp.cols, device, keep=(*copies[0], *copies[1]))


@torch.library.custom_op("sharelora::grouped_lora_linear", mutates_args=())
def _forward_op(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], tensors: list[Tensor],
                layout: list[int], scales: list[float], dropout_p: float, seed: Tensor) -> list[Tensor]:
    """Returns [y_0 (M, N_0), ..., y_{G-1}, h (M, R_u) float32 = dropout(x) A_u^T, the dropout mask
    (M, ceil(K / 32)) int32 bit-packed (empty when dropout_p == 0)]; h and the mask are saved for backward."""
    return forward_impl(x, weights, biases, tensors, layout, scales, dropout_p, seed)


def forward_impl(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], tensors: Sequence[Tensor],
                 layout: Sequence[int], scales: Sequence[float], dropout_p: float, seed: Tensor) -> list[Tensor]:
    """The forward of ``sharelora::grouped_lora_linear`` (what its custom op and the eager Function run)."""
    grp = decode(tensors, layout, scales, len(weights))
    views = tables_for(grp.views, x.device)
    h, mask = lowrank_project(x, views.a, views.dtype, views.periodic, dropout_p, seed)
    ys = [x.new_empty((x.shape[0], w.shape[0])) for w in weights]
    launch = _forward_launch(list(weights), list(biases), grp, x.device)
    grouped_linear(launch, [x.contiguous()], ys, h, True, 0.0, mask)
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
    return backward_impl(dys, x, weights, h, mask, tensors, layout, scales, dropout_p, needs_dx, bufs, atomic)


def backward_impl(dys: list[Tensor], x: Tensor, weights: Sequence[Tensor], h: Tensor, mask: Tensor,
                  tensors: Sequence[Tensor], layout: Sequence[int], scales: Sequence[float], dropout_p: float,
                  needs_dx: bool, bufs: list[Tensor], atomic: bool) -> Tensor:
    """The backward of ``sharelora::grouped_lora_linear_backward``."""
    grp = decode(tensors, layout, scales, len(weights))
    views = tables_for(grp.views, x.device)
    dh = torch.zeros_like(h)
    dys = [dy.contiguous() for dy in dys]
    for dy, module_paths, module_roles, cols in zip(dys, grp.paths, grp.roles, grp.cols):
        tables = tables_for(module_paths, x.device)
        dh_g, grad_b = dy_lowrank(dy, _columns(h, cols), tables.b, tables.scale, tables.dtype, tables.periodic)
        dh.index_add_(1, index_tensor(cols, x.device), dh_g)  # index_add_: two paths of one module may read one view
        _add_chain(module_paths, module_roles, "b", grad_b, bufs)
    dx = x.new_empty((0,))
    if needs_dx:
        dx = x.new_empty(x.shape)
        if all(w.is_contiguous() for w in weights):
            key = ("grouped dx", *map(tensor_key, weights), *paths_key(grp.views, x.device))
            launch = cached(key, lambda: dx_launch(weights, views, x.device))
            refresh_gates(launch.keep[0], grp.views)  # its A table, if evicted from the table cache since
        else:
            copies = [w.contiguous() for w in weights]
            launch = dx_launch(copies, views, x.device, keep=tuple(copies))
        grouped_linear(launch, dys, [dx], dh, False, dropout_p, mask)
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


@first_order("the triton backend")
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
    check_group_sizes(weights, biases, paths)
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
    if torch.compiler.is_compiling():  # dynamo sees the custom op (fake kernel, autograd formula)
        tensors, layout, scales = encode(paths)
        outs = _forward_op(x2, list(weights), list(biases), tensors, layout, scales, p, dropout_seed(p, x.device))[:-2]
    else:  # eager: one Function, no custom-op wrapper
        plan = GroupedPlan(weights, biases, paths, p, x.device)
        outs = _eager_apply(plan, x2, *plan.tensors)
    return tuple(y.reshape(*x.shape[:-1], w.shape[0]) for y, w in zip(outs, weights))


class GroupedPlan:
    """What an eager call of the group reads that does not change between calls, built once per
    group plan: the weights and biases, the flat tensors and their decoded ``Group``, the factor
    tables of the distinct A-views and of each module, both grouped launches (``GroupLaunch``: their
    problem and segment tables), where each module's dh lands in the group's (its columns), dropout
    p and the zero seed, the accumulation mode, and where each factor gradient goes (``grad_routes``).
    Weights or biases that are not contiguous get their launches per call (built from copies)."""

    __slots__ = ("weights", "biases", "tensors", "group", "views", "module_tables", "launch", "dx", "h_cols",
                 "dh_index", "dh_concat", "ns", "p", "seed", "atomic", "routes", "reads")

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Tensor | None], paths: Sequence[Sequence[LoRAPath]],
                 p: float, device: torch.device, atomic: bool | None = None):
        self.weights, self.biases = list(weights), list(biases)
        self.tensors, layout, scales = encode(paths)
        self.group = grp = decode(self.tensors, layout, scales, len(weights))
        self.views = tables_for(grp.views, device)
        self.module_tables = [tables_for(ps, device) for ps in grp.paths]
        contiguous = all(t is None or t.is_contiguous() for t in (*self.weights, *self.biases))
        self.launch = _forward_launch(self.weights, self.biases, grp, device) if contiguous else None
        self.dx = None
        if contiguous:  # cached like the forward's (an unplanned call builds its GroupedPlan per call)
            key = ("grouped dx", *map(tensor_key, self.weights), *paths_key(grp.views, device))
            self.dx = cached(key, lambda: dx_launch(self.weights, self.views, device))
            self.views = self.dx.keep[0]  # the tables its A table reads (the same unless evicted since)
        self.h_cols = [(c[0], c[-1] + 1) if c == list(range(c[0], c[0] + len(c))) else index_tensor(c, device)
                       for c in grp.cols]
        self.dh_index = [index_tensor(c, device) for c in grp.cols]
        self.dh_concat = [c for cs in grp.cols for c in cs] == list(range(self.views.a.shape[0]))  # disjoint, in order
        self.ns = [w.shape[0] for w in self.weights]
        self.p, self.seed = p, dropout_seed(0.0, device)
        self.atomic = atomic_grads(atomic)
        k, starts = self.weights[0].shape[1], [0]
        for v in grp.views:
            starts.append(starts[-1] + path_rank(v))
        route_list = [Route(0, r0, r1, v, "a", tuple(idx), k)
                      for v, idx, r0, r1 in zip(grp.views, grp.view_roles, starts, starts[1:])]
        for g, (module_paths, module_roles) in enumerate(zip(grp.paths, grp.roles)):
            r0 = 0
            for path, idx in zip(module_paths, module_roles):
                route_list.append(Route(1 + g, r0, r0 + path_rank(path), path, "b", tuple(idx), self.ns[g]))
                r0 += path_rank(path)
        self.routes = RouteCache(self.tensors, route_list)
        self.reads = [frozenset(i for roles in module_roles for i in roles) for module_roles in grp.roles]

    def reached(self, needs: Sequence[bool], dys: Sequence[Tensor | None]) -> tuple[bool, ...]:
        """``needs`` (one per tensor) less the tensors that no module with an output gradient reads."""
        reads = frozenset().union(*(r for r, dy in zip(self.reads, dys) if dy is not None))
        return tuple(need and i in reads for i, need in enumerate(needs))

    def forward(self, x: Tensor) -> list[Tensor]:
        """[y_0, ..., y_{G-1}, h (M, R_u) float32, the bit-packed dropout mask] of x (M, K) (two launches)."""
        views, p = self.views, self.p
        if views.gates:
            refresh_gates(views, self.group.views)
        h, mask = lowrank_project(x, views.a, views.dtype, views.periodic, p,
                                  self.seed if p == 0 else dropout_seed(p, x.device))
        ys = [torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype) for n in self.ns]
        launch = self.launch or _forward_launch(self.weights, self.biases, self.group, x.device)
        grouped_linear(launch, [x.contiguous()], ys, h, True, 0.0, mask)
        return [*ys, h, mask]

    def columns(self, h: Tensor, g: int) -> Tensor:
        """Module g's columns of h: a view when they are one run, else a copy."""
        cols = self.h_cols[g]
        return h[:, cols[0]:cols[1]] if isinstance(cols, tuple) else h.index_select(1, cols)


class GroupedEager(torch.autograd.Function):
    """The eager call of the group: ``apply(plan, x (M, K), *tensors)`` -> (y_0, ..., y_{G-1}), ``plan``
    a ``GroupedPlan``; the same kernels as the custom ops, called directly. Backward: one dy pass
    per module, one grouped dx launch (when x needs it), dA over the distinct views (when a tensor
    behind some A_eff needs a gradient), then the factor gradients routed. The adapter tensors
    (backward reads them through the plan's tables) and the weights dx reads are saved too, so
    autograd refuses a backward after one of them changed in place since the forward. A member
    whose output took no part in the loss (its gradient None: not materialized) gives no gradient to
    the tensors only it reads (None, as its own op would leave them) and contributes nothing to the
    others."""

    @staticmethod
    def forward(ctx, plan, x, *tensors):
        *ys, h, mask = plan.forward(x)
        ctx.save_for_backward(x, h, mask, *tensors, *plan.weights)
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        return tuple(ys)

    @staticmethod
    @first_order("the triton backend")
    def backward(ctx, *dys):
        x, h, mask = ctx.saved_tensors[:3]  # unpacking checks every saved tensor's version
        plan = ctx.plan
        needs_dx, needs = ctx.needs_input_grad[1], ctx.needs_input_grad[2:]
        if any(dy is None for dy in dys):  # an unused output
            needs = plan.reached(needs, dys)
            dys = [torch.zeros((x.shape[0], n), device=x.device, dtype=x.dtype) if dy is None else dy
                   for dy, n in zip(dys, plan.ns)]  # dx reads every module's dy: zeros add nothing
        routes = plan.routes(needs)
        dys = [dy.contiguous() for dy in dys]
        dhs, grads = [], [None]
        for g, (dy, tables) in enumerate(zip(dys, plan.module_tables)):
            dh_g, grad_b = dy_lowrank(dy, plan.columns(h, g), tables.b, tables.scale, tables.dtype, tables.periodic)
            dhs.append(dh_g)
            grads.append(grad_b)
        if not (needs_dx or routes.uses(0)):  # dB alone: dh is not read
            return (None, None, *routes(grads))
        if plan.dh_concat:
            dh = torch.cat(dhs, 1) if len(dhs) > 1 else dhs[0]
        else:
            dh = torch.zeros_like(h)
            for dh_g, index in zip(dhs, plan.dh_index):  # index_add_: modules may read one view
                dh.index_add_(1, index, dh_g)
        dx = None
        if needs_dx:
            dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
            launch = plan.dx
            if launch is None:
                copies = [w.contiguous() for w in plan.weights]
                launch = dx_launch(copies, plan.views, x.device, keep=tuple(copies))
            grouped_linear(launch, dys, [dx], dh, False, plan.p, mask)
        if routes.uses(0):
            grads[0] = lowrank_grad(dh, x, mask, plan.p, plan.atomic)
        return (None, dx, *routes(grads))


_eager_apply = thin_apply(GroupedEager)


def planned_call(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                 paths: Sequence[Sequence[LoRAPath]], dropout_p: float, training: bool):
    """The run(x) -> (y_0, ..., y_{G-1}) of a group's call plan on the kernels: the checks of
    ``grouped_lora_linear`` and its ``GroupedPlan`` made once (rebuilt when a tensor it read is replaced)."""
    _check_group(x, weights, biases, paths, dropout_p)
    plan = GroupedPlan(weights, biases, paths, dropout_p if training else 0.0, x.device)
    tensors = plan.tensors
    # a plan is rebuilt when grad mode or a requires_grad changes: no gradient wanted, no Function
    call = _eager_apply if wants_grad(x, tensors) else lambda plan, x, *tensors: tuple(plan.forward(x)[:-2])

    def run(x: Tensor) -> tuple[Tensor, ...]:
        if x.dim() == 2:
            return call(plan, x, *tensors)
        outs = call(plan, x.reshape(-1, x.shape[-1]), *tensors)
        return tuple(y.view(*x.shape[:-1], n) for y, n in zip(outs, plan.ns))
    return run
