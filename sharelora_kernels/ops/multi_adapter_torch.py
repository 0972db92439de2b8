"""Torch path of the multi-adapter op (``ops.multi_adapter``): the CPU default, any device and dtype.

Numerics as ``ops.lowrank_only``'s torch path: operands rounded to the compute dtype c and held in
the accumulation dtype (float32; float64 for float64), the low-rank term added into y once, in y's dtype.

Adapters of one structure (the same path kinds, ranks, window shapes and dtypes in the same order:
every tenant of one method and configuration) run together, whatever their number: their segments are
padded to the longest one, (S, C_max) token ids built once per batch (``segment_plan``, cached on the
batch; none at all when the segments are x's own rows in order, as in a decode batch of distinct
adapters), and every path slot is a few batched GEMMs over the S adapters, their tensors stacked
(nothing Kronecker- or gate-expanded). Each structure group's tensors are stacked once for every
adapter of the layer's tables at the first call of each batch (``cached_factors``: every forward of
one batch, whichever of the adapters it uses, reads the same stacks, the adapters' values when the
batch started; a batch using some of them picks their lanes with one ``index_select``). Made anew for
each batch, not kept while version counters say the tensors are unchanged: a fused optimizer step and
a write through ``.data`` change values without a version. A copy never counted as the bank's, held in
the accumulation dtype (float32: twice a 16-bit bank): the adapters as each module reads them, a stack
that several modules read alike made once for all of them (``_shared_stack``: ShareLoRA's shared A or
B, Bi-Share's Kronecker A_s and B_s, a slice window read by modules with no other plain / slice /
gate path). So plain LoRA, ShareLoRA and Kronecker adapters take the bank's size; slice paths read
beside other paths are concatenated with them per module (each module's windows of a shared tensor
copied for it): up to the same adapters' size unshared, several times a Bi-Share slice bank:

    plain / slice   h = x A^T,  out += h (s B)^T                     (A, B: the windows)
    gate            C = G_od B A G_iu (S, g, g),  h = x (C G_id)^T,  out += h (s G_ou)^T
    kron            h = fold_{K_A}(x) A_s^T,  out[:, i d + c] += K_B[i] (h (s B_s)^T)[:, c]

(plain, slice and gate paths concatenated along the rank into one bmm pair; the gate's A_eff and the
scaled B's are part of the stacks).

Per structure the shortest segments run batched, as many as keep the padded rows within ``PAD_LIMIT``
times the real ones; the longer ones (and a structure with one adapter in the batch) run one
segment at a time through ``lowrank_only.torch_forward`` (the reference's helpers).
"""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..reference import LoRAPath, path_factors
from .lowrank_only import accumulation_dtype, torch_forward

PAD_LIMIT = 2.0  # padded rows / real rows above which a structure's segments run one at a time


def storage_state(t: Tensor) -> tuple:
    """Where t's values live: its data pointer and its storage, by a weak reference (equal to another
    state only while both name one live storage, so a freed storage never matches a new one at the
    same address). ``.to()``, ``.float()`` and ``p.data = ...`` change it; an in-place write does not."""
    return t.data_ptr(), weakref.ref(t.untyped_storage())


def structure(paths: Sequence[LoRAPath], k: int, n: int) -> tuple:
    """What adapters must share to run batched: per path its kind, scale-free window shapes and dtypes."""
    def shapes(p: LoRAPath) -> tuple:
        if p.kind in ("plain", "slice"):
            return (p.rank, k), (n, p.rank)
        return tuple(tuple(t.shape) for t in p.tensors)
    return tuple((p.kind, shapes(p), tuple(t.dtype for t in p.tensors)) for p in paths)


def segment_plan(batch, groups: tuple[tuple[int, ...], ...]) -> list:
    """For each structure group (adapter ids), the batch's work: ("batched", adapters, group index,
    their lanes in the group's stacks (None: the whole group in order), tokens (S * C,) (padding
    repeats a segment's last token; None: x's own rows in order, nothing padded), the real lanes'
    positions, their tokens (both None when nothing is padded), C) for padded segments run together,
    else ("single", adapter, tokens; None: every token) per segment. Cached on the batch (every
    layer with the same groups reuses it)."""
    key = ("plan", groups)
    if key in batch.cache:
        return batch.cache[key]
    group_of = {a: g for g, members in enumerate(groups) for a in members}
    segments: dict[int, list] = {}
    for a, start, count in batch.segments:
        if a in group_of:
            segments.setdefault(group_of[a], []).append((a, start, count))
    plan, order = [], batch.order
    for g, segs in segments.items():
        segs = sorted(segs, key=lambda seg: seg[2])  # the most segments padding keeps within PAD_LIMIT
        batched, real = 0, 0
        for i, (_, _, c) in enumerate(segs, 1):
            real += c
            if i * c <= PAD_LIMIT * real:
                batched = i
        batched = batched if batched > 1 else 0
        plan += [("single", a, None if c == batch.num_tokens else order[s:s + c]) for a, s, c in segs[batched:]]
        segs = sorted(segs[:batched], key=lambda seg: seg[1])  # in order: their tokens may be x's rows as they are
        if segs:
            plan.append(_batched_item(batch, g, groups[g], segs))
    batch.cache[key] = plan
    return plan


def _batched_item(batch, g: int, group: tuple[int, ...], segs: list) -> tuple:
    """The plan item of segments ``segs`` (adapter, start, count) of group ``g`` run padded together."""
    order = batch.order
    members = tuple(a for a, _, _ in segs)
    lanes_in_group = None if members == group else \
        torch.tensor([group.index(a) for a in members], dtype=torch.int64, device=order.device)
    longest = max(c for _, _, c in segs)
    lanes = torch.arange(longest, device=order.device)
    starts = torch.tensor([s for _, s, _ in segs], device=order.device)[:, None]
    counts = torch.tensor([c for _, _, c in segs], device=order.device)[:, None]
    valid = (lanes[None, :] < counts).reshape(-1)
    tokens = order[(starts + torch.minimum(lanes[None, :], counts - 1)).reshape(-1)]
    if all(c == longest for _, _, c in segs):
        real, dest = None, None  # nothing padded
        if tokens.numel() == batch.num_tokens and torch.equal(tokens, torch.arange(tokens.numel(), device=tokens.device)):
            tokens = None  # x's own rows, in order
    else:
        real, dest = valid.nonzero().view(-1), tokens[valid]
    return ("batched", members, g, lanes_in_group, tokens, real, dest, longest)


def _stack(ts: Sequence[Tensor], dtype: torch.dtype, acc: torch.dtype) -> Tensor:
    """The tensors stacked (S, ...), rounded to the compute dtype, held in the accumulation dtype."""
    return torch.stack(ts).to(dtype).to(acc)


def _shared_stack(shared: dict, role: str, ps: Sequence[LoRAPath], index: int, extra: tuple, dtype: torch.dtype,
                  acc: torch.dtype, build: Callable[[], Tensor]) -> Tensor:
    """``build()``, or the stack another layer built in this batch (``shared``: the batch's cache) from
    the same tensors (tensor ``index`` of every path of ``ps``, on the same storage) with the same
    ``extra`` (window, scales): a tensor shared across layers is stacked once per batch, not once per layer."""
    tensors = [p.tensors[index] for p in ps]
    key = ("stack", role, tuple(map(id, tensors)), tuple(map(storage_state, tensors)), extra, dtype, acc)
    stack = shared.get(key)
    if stack is None:
        stack = shared[key] = build()
    return stack


def group_factors(adapters: Sequence[Sequence[LoRAPath]], k: int, n: int, dtype: torch.dtype, acc: torch.dtype,
                  device, shared: dict) -> tuple:
    """The stacked operands of S adapters of one structure (``batched_paths`` reads them), each
    tensor rounded to the compute dtype, held in the accumulation dtype, scales folded into B:

    dense: (A (S, R, K), (s B)^T (S, R, N)) over every plain, slice and gate path (a gate's
    A_eff = (G_od B A G_iu) G_id, its B G_ou), concatenated along the rank, or None;
    krons: per Kronecker path (A_s (S, r, d), K_A (S, K / d), (s B_s)^T (S, r, d), K_B (S, N / d)).
    The stacks of tensors other layers read too (a shared A_s, a ShareLoRA pair's A and B) are
    built once for all of them, kept in ``shared`` (``_shared_stack``)."""
    dense_a, dense_bt, krons = [], [], []
    for slot in range(len(adapters[0])):
        ps = [paths[slot] for paths in adapters]
        scales = tuple(p.scale for p in ps)
        scale = lambda: torch.tensor(scales, dtype=acc, device=device).view(-1, 1, 1)  # noqa: E731
        kind = ps[0].kind
        if kind in ("plain", "slice"):
            windows = [path_factors(p, k, n) for p in ps]
            k_offsets, n_offsets = (tuple(p.k_offset for p in ps), tuple(p.n_offset for p in ps)) \
                if kind == "slice" else ((), ())  # an A window depends on K's, a B window on N's
            dense_a.append(_shared_stack(shared, "a", ps, 0, (k, k_offsets), dtype, acc,
                                         lambda: _stack([w[0] for w in windows], dtype, acc)))
            dense_bt.append(_shared_stack(shared, "bt", ps, 1, (n, n_offsets, scales), dtype, acc, lambda: (
                _stack([w[1] for w in windows], dtype, acc).transpose(1, 2) * scale()).contiguous()))
            continue
        if kind == "gate":
            f = [_stack([p.tensors[r] for p in ps], dtype, acc) for r in range(len(ps[0].tensors))]
            core = torch.bmm(torch.bmm(f[4], f[1]), torch.bmm(f[0], f[3]))  # (S, g, g)
            dense_a.append(torch.bmm(core, f[2]))
            dense_bt.append((f[5].transpose(1, 2) * scale()).contiguous())
        else:  # kron
            a_s = _shared_stack(shared, "a", ps, 0, (), dtype, acc, lambda: _stack([p.tensors[0] for p in ps], dtype, acc))
            bt_s = _shared_stack(shared, "bt", ps, 1, (scales,), dtype, acc, lambda: (
                _stack([p.tensors[1] for p in ps], dtype, acc).transpose(1, 2) * scale()).contiguous())
            k_a, k_b = (_stack([p.tensors[r] for p in ps], dtype, acc).flatten(1) for r in (2, 3))
            krons.append((a_s, k_a, bt_s, k_b))
    if len(dense_a) > 1:
        dense = (torch.cat(dense_a, 1), torch.cat(dense_bt, 1))
    else:
        dense = (dense_a[0], dense_bt[0]) if dense_a else None
    return dense, tuple(krons)


def cached_factors(owner: tuple, key: tuple, adapters: Sequence[Sequence[LoRAPath]], k: int, n: int,
                   dtype: torch.dtype, acc: torch.dtype, device, batch) -> tuple:
    """``group_factors``, kept in ``batch``'s cache (its metadata: every decode step of one mixed batch
    reuses it) under ``owner`` (a layer's tables' adapters: each layer its own) and ``key``, made anew
    for the next batch: a batch reads the adapters as they were when it started. A cache of copies,
    which goes with the batch (the adapter bank itself stays unique)."""
    slot = ("stacks", id(owner), key)
    hit = batch.cache.get(slot)
    if hit is not None and hit[1] is owner:
        return hit[0]
    factors = group_factors(adapters, k, n, dtype, acc, device, batch.cache)
    batch.cache[slot] = (factors, owner)
    return factors


def _lanes(factors: tuple, lanes: Tensor) -> tuple:
    """``group_factors`` of the adapters at ``lanes`` only."""
    dense, krons = factors
    pick = lambda ts: tuple(t.index_select(0, lanes) for t in ts)
    return (None if dense is None else pick(dense)), tuple(pick(kron) for kron in krons)


def batched_paths(xs: Tensor, n: int, factors: tuple, lanes: Tensor | None = None) -> Tensor:
    """Every path of adapter ``lanes[s]`` of the stacked ``factors`` (``group_factors``: S adapters of
    one structure) applied to xs[s] (S, C, K): (S, C, N) in xs's dtype (lanes None: every adapter, in
    order). One bmm pair for every plain, slice and gate path together; per Kronecker path a fold, a
    bmm pair and the K_B tiling, nothing expanded:

        dense   out = (xs A^T) (s B)^T
        kron    h = fold_{K_A}(xs) A_s^T,  out[:, i d + c] += K_B[i] (h (s B_s)^T)[:, c]
    """
    s_count, c, k = xs.shape
    dense, krons = factors if lanes is None else _lanes(factors, lanes)
    if dense is not None:
        out = torch.bmm(torch.bmm(xs, dense[0].transpose(1, 2)), dense[1])
    else:
        out = torch.zeros((s_count, c, n), dtype=xs.dtype, device=xs.device)
    for a_s, k_a, bt_s, k_b in krons:
        d = a_s.shape[2]
        hb = torch.bmm(torch.bmm(_fold(xs, k_a, d), a_s.transpose(1, 2)), bt_s)  # (S, C, d)
        blocks = out.view(s_count, c, n // d, d)
        if c == 1:  # decode: one broadcast op
            blocks.addcmul_(k_b.view(s_count, 1, n // d, 1), hb.view(s_count, c, 1, d))
        else:  # prefill: one op per block of d columns, no (S, C, N / d, d) broadcast
            for i in range(n // d):
                blocks[:, :, i].addcmul_(hb, k_b[:, i, None, None])
    return out


def _fold(xs: Tensor, k_a: Tensor, d: int) -> Tensor:
    """fold(xs)[s, c, :] = sum_j K_A[s, j] xs[s, c, j d : (j + 1) d]: (S, C, K) -> (S, C, d)."""
    s_count, c, k = xs.shape
    blocks = xs.view(s_count, c, k // d, d)
    if c == 1:  # decode: one broadcast product and sum
        return (blocks * k_a.view(s_count, 1, k // d, 1)).sum(2)
    fold = blocks[:, :, 0] * k_a[:, 0, None, None]  # prefill: one op per block, no (S, C, K) product
    for j in range(1, k // d):
        fold.addcmul_(blocks[:, :, j], k_a[:, j, None, None])
    return fold


def torch_add(y: Tensor, x: Tensor, batch, adapters: tuple[tuple[LoRAPath, ...], ...],
              groups: tuple[tuple[int, ...], ...]) -> None:
    """y (M, N) += each token's adapter paths of x (M, K) (x in the compute dtype) in place; each
    structure group's stacked operands are made once per batch (``cached_factors``)."""
    acc = accumulation_dtype(x.dtype)
    n, k = y.shape[1], x.shape[1]
    for item in segment_plan(batch, groups):
        if item[0] == "single":
            _, a, rows = item
            if rows is None:  # every token: no gather
                torch_forward(y, x, adapters[a], 0.0, None)
                continue
            ys = y.index_select(0, rows)
            torch_forward(ys, x.index_select(0, rows), adapters[a], 0.0, None)  # p = 0: no dropout seed read
            y.index_copy_(0, rows, ys)
            continue
        _, members, g, lanes, tokens, real, dest, c = item
        xs = (x if tokens is None else x.index_select(0, tokens)).to(acc).reshape(len(members), c, k)
        factors = cached_factors(adapters, (groups[g], x.dtype, acc), [adapters[a] for a in groups[g]], k, n,
                                 x.dtype, acc, y.device, batch)
        out = batched_paths(xs, n, factors, lanes).view(-1, n)
        if tokens is None:
            y.add_(out.to(y.dtype))
        elif real is None:
            y.index_add_(0, tokens, out.to(y.dtype))
        else:
            y.index_add_(0, dest, out.index_select(0, real).to(y.dtype))
