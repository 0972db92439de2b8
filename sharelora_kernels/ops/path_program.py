"""The planned compose call of a path list with gate or Kronecker paths: structure resolved once.

``dense_program.DenseProgram`` serves plain and slice paths; ``PathProgram`` serves any mix of plain,
slice, gate and Kronecker paths whose tensors are all distinct and of one dtype (a layer's Bi-Share
GT / KE module: local, intra and inter parts are different tensors). Built once by a layer's call
plan: which path is what, each tensor's index in the flat list, the scales, the slice windows and
pads, a (R,) scale vector for the stacked dense paths, the dropout probability. A call then runs
only GEMMs; the backward applies each transform's chain rule directly (no gradient buffers to
zero: every tensor gets exactly one contribution, returned in its own dtype).

Shapes (x (M, K), W (N, K), b (N,) or None; the low-rank GEMMs in ``compose.lowrank_dtype``):

    dense paths   A_d (R_d, K), B_d (N, R_d) stacked: plain, a slice's window, a gate's rank-g pair
                  (C G_id, G_ou) with C = (G_od B) (A G_iu) (g, g); h = xd A_d^T (M, R_d)
    Kronecker     u = fold(xd; K_A) (M, d), h = u A_s^T (M, r), y += K_B (x) (s h B_s^T)
    y             z = b + (h * s) B_d^T, then the Kronecker terms, then z.addmm_(x, W^T)

The chain rule of the gate core and Kronecker kernels runs in float32 or better (their tensors are
tiny); everything of size M runs in the low-rank dtype.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..reference import LoRAPath, _scale_first
from .compose import _check, draw_dropout, lowrank_dtype
from .dense_program import TALL_ROWS, base_of, db_of, rank_scales, runner, stacked_output, window_pads
from .function import first_order, thin_apply


class PathProgram:
    """What a planned compose call of ``paths`` needs that does not change between calls.

    ``takes(paths)``: a gate or Kronecker path among them, every tensor distinct, one floating dtype.
    Dense paths (``dense``): (kind, first tensor index, rank, scale, pads); Kronecker paths
    (``krons``): (first tensor index, d, scale, K / d, N / d)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float):
        k, n = weight.shape[1], weight.shape[0]
        self.weight, self.bias, self.p, self.k, self.n = weight, bias, dropout_p, k, n
        self.dtype = lowrank_dtype(weight.dtype)
        self.chain = torch.promote_types(self.dtype, torch.float32)
        self.adapter_dtype = paths[0].tensors[0].dtype
        self.keep = 1.0 / (1.0 - dropout_p)
        self.count = sum(len(q.tensors) for q in paths)
        self.dense, self.krons, i = [], [], 0
        for q in paths:
            if q.kind == "kron":
                d = q.tensors[0].shape[1]
                self.krons.append((i, d, float(q.scale), k // d, n // d))
            else:
                self.dense.append((q.kind, i, q.rank, float(q.scale), window_pads(q, k, n), (q.k_offset, q.n_offset)))
            i += len(q.tensors)
        self.single = len(self.dense) == 1
        self.ranks = [r for _, _, r, _, _, _ in self.dense]
        self.scale = self.dense[0][3] if self.single else 1.0
        self.scales = None if self.single or not self.dense else rank_scales(
            [(r, s) for _, _, r, s, _, _ in self.dense], self.dtype, weight.device)
        self.zero = torch.zeros((), dtype=self.dtype, device=weight.device)
        self.tall = TALL_ROWS if weight.device.type == "cpu" else None  # see ``dense_program.db_of``
        self.scales_col = None if self.scales is None else self.scales.view(-1, 1)
        self.own = base_of(weight, bias, self.zero)
        # the tensors and their transposes as detached views (in-place updates show through; a
        # replaced tensor makes the plan rebuild), read by every call when no cast is needed
        self.views = self._views([t.detach() for q in paths for t in q.tensors])  # after self.krons

    @staticmethod
    def takes(paths: Sequence[LoRAPath]) -> bool:
        tensors = [t for q in paths for t in q.tensors]
        return (any(q.kind in ("gate", "kron") for q in paths) and len({id(t) for t in tensors}) == len(tensors)
                and len({t.dtype for t in tensors}) == 1)

    # ------------------------------------------------------------------------- forward
    def _views(self, tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, ...]]]:
        """(tensors, their transposes, each Kronecker path's kernels as (1, 1, K/d) and (1, K/d, 1)
        views of K_A, (1, 1, N/d) and (1, N/d, 1) of K_B: the fold's and the tile's operands)."""
        kernels = [(t[i + 2].view(1, 1, jk), t[i + 2].view(1, jk, 1), t[i + 3].view(1, 1, jn), t[i + 3].view(1, jn, 1))
                   for t in (tensors,) for i, _, _, jk, jn in self.krons]
        return list(tensors), [t.t() for t in tensors], kernels

    def operands(self) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, ...]]]:
        """``_views`` of every tensor in the low-rank dtype: the detached views, or their casts."""
        if self.adapter_dtype == self.dtype:
            return self.views
        return self._views([t.to(self.dtype) for t in self.views[0]])

    def _dense_factors(self, t: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        """Each dense path's (A window (r, K), B window (N, r)) of the tensors ``t``, and for a gate
        path its (P, Q, C)."""
        a_list, b_list, cores = [], [], []
        for kind, i, _, _, _, (k0, n0) in self.dense:
            if kind == "gate":
                p, q = torch.mm(t[i + 4], t[i + 1]), torch.mm(t[i], t[i + 3])  # G_od B (g, r), A G_iu (r, g)
                c = torch.mm(p, q)
                a_list.append(torch.mm(c, t[i + 2]))
                b_list.append(t[i + 5])
                cores.append((p, q, c))
            elif kind == "slice":
                a_list.append(t[i].narrow(1, k0, self.k))
                b_list.append(t[i + 1].narrow(0, n0, self.n))
                cores.append(None)
            else:
                a_list.append(t[i])
                b_list.append(t[i + 1])
                cores.append(None)
        return a_list, b_list, cores

    def forward(self, x: Tensor, xd: Tensor | None) -> tuple:
        """(y (M, N) in x's dtype, saved) of x (M, K) and its dropped-out copy xd (or None);
        ``saved``: what ``backward`` reads."""
        t, tt, kernels = self.operands()
        xl = x if xd is None else xd
        if xl.dtype != self.dtype:
            xl = xl.to(self.dtype)
        h = a = b = cores = None
        z = None
        if self.dense:
            a_list, b_list, cores = self._dense_factors(t)
            a, b = (a_list[0], b_list[0]) if self.single else (torch.cat(a_list), torch.cat(b_list, 1))
            h = torch.mm(xl, a.t())
            z, b = stacked_output(self, h, b, self.own)
            z = z if z.dtype == x.dtype else z.to(x.dtype)
        else:
            z = torch.nn.functional.linear(x, self.weight, self.bias)
        folds = []
        m = x.shape[0]
        for (i, d, s, jk, jn), (ka_row, _, _, kb_tile) in zip(self.krons, kernels):
            u = torch.bmm(ka_row.expand(m, 1, jk), xl.reshape(m, jk, d)).view(m, d)  # fold(xd; K_A)
            hk = torch.mm(u, tt[i])  # (M, r)
            hb = torch.mm(hk, tt[i + 1])  # (M, d), unscaled
            scaled = _scale_first(z, s)  # a float16 z (no dense path: the base's output), or s = 0
            term = (hb * s if scaled else hb).to(z.dtype).view(m, 1, d)
            z.view(m, jn, d).addcmul_(kb_tile.to(z.dtype), term, value=1.0 if scaled else s)
            folds.append((u, hk, hb))
        y = z.addmm_(x, self.own.wt) if self.dense else z
        return y, (t, tt, kernels, h, a, b, cores, folds)

    def infer(self, x: Tensor) -> Tensor:
        """y (M, N) of x (M, K) without autograd (dropout drawn here in training)."""
        return self.forward(x, draw_dropout(x, self.p)[0])[0]

    # ------------------------------------------------------------------------- backward
    def backward(self, dy: Tensor, x: Tensor, mask: Tensor | None, saved: tuple, need_x: bool,
                 need: bool) -> list[Tensor | None]:
        """(dx, then every tensor's gradient) from dy (M, N); ``need``: whether any tensor needs one."""
        t, tt, kernels, h, a, b, cores, folds = saved
        dyl = dy if dy.dtype == self.dtype else dy.to(self.dtype)
        keep = self.keep if mask is not None else 1.0
        xm = None
        if need:
            xm = x if mask is None else x * mask
            if xm.dtype != self.dtype:
                xm = xm.to(self.dtype)
        grads: list[Tensor | None] = [None] * self.count
        dx_low = None
        if self.dense:
            if self.single:
                dh = torch.addmm(self.zero, dyl, b, beta=0, alpha=self.scale * keep)
            else:
                dh = torch.mm(dyl, b) if keep == 1.0 else torch.mm(dyl, b).mul_(keep)  # b holds the scales
            if need_x:
                dx_low = torch.mm(dh, a)
            if need:
                ga = torch.mm(dh.t(), xm)  # (R, K)
                gb = db_of(self, dyl, h)  # (N, R), scaled
                gas = (ga,) if self.single else ga.split_with_sizes(self.ranks)
                gbs = (gb,) if self.single else gb.split_with_sizes(self.ranks, 1)
                for (kind, i, _, _, pads, _), da, db, core in zip(self.dense, gas, gbs, cores):
                    if kind == "gate":
                        self._gate_grads(grads, i, t, tt, core, da, db)
                    elif pads is None:
                        grads[i], grads[i + 1] = da, db
                    else:
                        grads[i], grads[i + 1] = torch.constant_pad_nd(da, pads[0]), torch.constant_pad_nd(db, pads[1])
        for kron, views, fold in zip(self.krons, kernels, folds):
            dx_low = self._kron_grads(grads, kron, t, views, fold, dyl, xm, keep, dx_low, need_x, need)
        dx = None
        if need_x:
            if dx_low is None:
                dx = torch.mm(dy, self.weight)
            else:
                if mask is not None:
                    dx_low.mul_(mask)
                dx = (dx_low if dx_low.dtype == x.dtype else dx_low.to(x.dtype)).addmm_(dy, self.weight)
        adapter = self.adapter_dtype
        return [dx, *(g if g is None or g.dtype == adapter else g.to(adapter) for g in grads)]

    def _gate_grads(self, grads: list, i: int, t: Sequence[Tensor], tt: Sequence[Tensor], core: tuple, da: Tensor,
                    db: Tensor) -> None:
        """A gate path's six gradients from dA_eff = da (g, K) and dG_ou = db (N, g)."""
        p, q, c = core
        chain, j = self.chain, i
        if da.dtype != chain:
            da, p, q, c = da.to(chain), p.to(chain), q.to(chain), c.to(chain)
            t = [u.to(chain) for u in t[i:i + 6]]
            tt = [u.t() for u in t]
            j = 0
        d_c = torch.mm(da, tt[j + 2])  # (g, g)
        d_p, d_q = torch.mm(d_c, q.t()), torch.mm(p.t(), d_c)  # (g, r), (r, g)
        grads[i + 0] = torch.mm(d_q, tt[j + 3])  # dA (r, m)
        grads[i + 1] = torch.mm(tt[j + 4], d_p)  # dB (n_s, r)
        grads[i + 2] = torch.mm(c.t(), da)  # dG_id (g, K)
        grads[i + 3] = torch.mm(tt[j], d_q)  # dG_iu (m, g)
        grads[i + 4] = torch.mm(d_p, tt[j + 1])  # dG_od (g, n_s)
        grads[i + 5] = db  # dG_ou (N, g)

    def _kron_grads(self, grads: list, kron: tuple, t: Sequence[Tensor], kernels: tuple, fold: tuple, dyl: Tensor,
                    xm: Tensor | None, keep: float, dx_low: Tensor | None, need_x: bool, need: bool) -> Tensor | None:
        """A Kronecker path's four gradients; returns dx_low plus its (M, K) term (before the mask).
        The kernels' gradients are batched GEMVs summed over M: dK_A[j] = sum xm[m, j, :] . du[m],
        dK_B[i] = s sum dy[m, i, :] . hb[m] (no (M, K) or (M, N) temporary)."""
        i, d, s, jk, jn = kron
        _, ka_tile, kb_row, _ = kernels
        u, hk, hb = fold
        m = dyl.shape[0]
        dy3 = dyl.reshape(m, jn, d)
        v = torch.bmm(kb_row.expand(m, 1, jn), dy3).view(m, d)  # dy folded by K_B
        dh = torch.addmm(self.zero, v, t[i + 1], beta=0, alpha=s)  # (M, r)
        du = torch.addmm(self.zero, dh, t[i], beta=0, alpha=keep)  # (M, d): the gradient of the fold of dropout(x)
        if need:
            grads[i + 0] = torch.mm(dh.t(), u)  # dA_s (r, d)
            grads[i + 1] = torch.addmm(self.zero, v.t(), hk, beta=0, alpha=s)  # dB_s (d, r)
            grads[i + 2] = torch.bmm(xm.reshape(m, jk, d), du.view(m, d, 1)).sum(0).view(1, jk)  # dK_A
            grads[i + 3] = torch.baddbmm(self.zero, dy3, hb.view(m, d, 1), beta=0, alpha=s).sum(0)  # dK_B (N/d, 1)
        if not need_x:
            return dx_low
        if dx_low is None:
            return torch.mul(ka_tile, du.view(m, 1, d)).view(m, jk * d)
        dx_low.view(m, jk, d).addcmul_(ka_tile, du.view(m, 1, d))
        return dx_low


class PathCompose(torch.autograd.Function):
    """One planned compose call: ``apply(program, x (M, K), dropped, *tensors)`` -> y (M, N),
    ``tensors`` every path's tensors in role order (what gets gradients), dropped the (dropout(x),
    mask) pair an input group shares or None (drawn here). Saves x, the bool dropout mask, the
    tensors, h, the stacked dense factors, each gate's core products and each Kronecker fold."""

    @staticmethod
    def forward(ctx, program, x, dropped, *tensors):
        xd, mask = dropped if dropped is not None else draw_dropout(x, program.p)
        y, saved = program.forward(x, xd)
        ctx.save_for_backward(x, mask, *tensors, program.weight)
        ctx.program, ctx.saved = program, saved
        return y

    @staticmethod
    @first_order("the compose backend")
    def backward(ctx, dy):
        x, mask = ctx.saved_tensors[:2]  # the tensors and the weight are saved for autograd's in-place check
        needs = ctx.needs_input_grad
        dx, *grads = ctx.program.backward(dy, x, mask, ctx.saved, needs[1], any(needs[3:]))
        return (None, dx, None, *grads)


path_apply = thin_apply(PathCompose)


def path_runner(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                grad: bool) -> Callable[[Tensor], Tensor]:
    """run(x) (..., K) -> (..., N) of ``paths`` (``PathProgram.takes``) with dropout ``dropout_p``
    (``dense_program.runner`` through ``PathCompose``), the checks of a call made once."""
    _check(x, weight, bias, paths, dropout_p)
    program = PathProgram(weight, bias, paths, dropout_p)
    return runner(program, path_apply, [None, *(t for q in paths for t in q.tensors)], grad)
