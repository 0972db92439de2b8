"""Where a planned call's effective-factor gradients go: the parameter gradients, routed once per plan.

The kernels' backward ends with the gradients of the effective factors of every path, ranks
concatenated: ``dA_eff`` (R, K) and ``dB_eff^T`` (R, N) (the grouped op: one ``dA`` over its
distinct A-views and one ``dB^T`` per module). Each parameter tensor's gradient is a function of
rows of those (``shared_grad.chain_a / chain_b``: a slice window, a Kronecker fold, a gate core),
and which rows, which chain and which window do not change between calls. ``GradRoutes`` resolves
them once, for one set of tensors needing a gradient:

    direct    a tensor read whole by one plain or slice path: its gradient IS rows r0:r1 of a
              factor gradient (transposed for B), cast to the tensor's dtype where it differs;
              no buffer; a copy only of some rows of a larger one (as a .grad, autograd would
              keep the whole buffer alive)
    single    a tensor with one contribution through a chain (Kronecker, gate) or a window
              (a slice of a larger tensor): that contribution, padded to the tensor's shape
    summed    a tensor read by several paths (shared tensors within one call): one fp32 buffer,
              zeroed, each contribution added into its window, cast once

and skips what no tensor needs (a route whose tensors are all frozen; ``uses(source)`` tells the
backward whether a factor gradient is wanted at all, so a call with frozen A factors launches no
dA kernel). Every gradient handed to autograd is a tensor of this call: nothing is reused across
calls.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import LoRAPath
from .shared_grad import chain_a, chain_b

# the roles of a path's tensors that each factor's chain yields a gradient for
_ROLES = {("plain", "a"): (0,), ("slice", "a"): (0,), ("kron", "a"): (0, 2), ("gate", "a"): (0, 1, 2, 3, 4),
          ("plain", "b"): (1,), ("slice", "b"): (1,), ("kron", "b"): (1, 3), ("gate", "b"): (5,)}


class Route(NamedTuple):
    """Rows ``r0:r1`` of factor gradient number ``source`` are the gradient of ``path``'s A_eff
    (``factor`` "a", (r, width)) or B_eff^T ("b", (r, width)); ``slots[role]`` is the index of the
    tensor of each role in the call's tensor list."""

    source: int
    r0: int
    r1: int
    path: LoRAPath
    factor: str
    slots: tuple[int, ...]
    width: int


class GradRoutes:
    """What an autograd formula returns for ``tensors`` (None where ``needs[i]`` is false or where
    tensor i is an earlier tensor listed again), from the factor gradients of one call."""

    def __init__(self, tensors: Sequence[Tensor], needs: Sequence[bool], routes: Sequence[Route]):
        first: dict[int, int] = {}
        slot_of = [first.setdefault(id(t), i) for i, t in enumerate(tensors)]
        wanted = {slot_of[i] for i, need in enumerate(needs) if need}
        contributions: dict[int, int] = {}
        live = []
        for route in routes:
            roles = [r for r in _ROLES[route.path.kind, route.factor] if slot_of[route.slots[r]] in wanted]
            if roles:
                live.append((route, roles))
                for r in roles:
                    contributions[slot_of[route.slots[r]]] = contributions.get(slot_of[route.slots[r]], 0) + 1
        self.count = len(tensors)
        rows = {s: max(r.r1 for r in routes if r.source == s) for s in {r.source for r in routes}}  # R per source
        self.direct: list[tuple[int, int, int, int, bool, torch.dtype | None, bool]] = []
        self.chained: list[tuple[int, int, int, LoRAPath, str, dict[int, int]]] = []
        for route, roles in live:
            slots = {r: slot_of[route.slots[r]] for r in roles}
            slot = next(iter(slots.values())) if len(slots) == 1 else None
            if slot is not None and contributions[slot] == 1 and _reads_whole(route, tensors[slot]):
                dtype = None if tensors[slot].dtype == torch.float32 else tensors[slot].dtype
                transpose, r = route.factor == "b", route.r1 - route.r0
                # Some rows of a factor gradient handed on as a view that autograd keeps as the .grad
                # (rows of A; a rank-1 B^T, whose transpose is contiguous: a wider one it copies) keep
                # all of it alive until zero_grad, the other rows too (another path's, a shared
                # tensor's it adds elsewhere): copied instead. The whole gradient stays a view.
                copy = dtype is None and r < rows[route.source] and (not transpose or r == 1)
                self.direct.append((slot, route.source, route.r0, route.r1, transpose, dtype, copy))
            else:
                self.chained.append((route.source, route.r0, route.r1, route.path, route.factor, slots))
        self.summed = [(slot, tuple(tensors[slot].shape), tensors[slot].device)
                       for slot, n in contributions.items() if n > 1]
        self.shapes = {slot: tuple(tensors[slot].shape) for slot in contributions}
        direct = {d[0] for d in self.direct}
        self.casts = [(slot, tensors[slot].dtype) for slot in contributions
                      if slot not in direct and tensors[slot].dtype != torch.float32]
        self.sources = {route.source for route, _ in live}

    def uses(self, source: int) -> bool:
        """Whether any wanted gradient reads factor gradient number ``source``."""
        return source in self.sources

    def __call__(self, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The gradients of the tensors from ``grads``, the factor gradients by source number (fp32;
        None for a source no route ``uses``)."""
        out: list[Tensor | None] = [None] * self.count
        for slot, source, r0, r1, transpose, dtype, copy in self.direct:
            g = grads[source]
            if r0 or r1 != g.shape[0]:  # a view only where needed (autograd adds a view slower)
                g = g[r0:r1]
            if transpose:
                g = g.t()
            if dtype is not None:
                g = g.to(dtype)
            elif copy:  # as its .grad, autograd would keep these rows, and with them the whole buffer
                g = g.clone(memory_format=torch.contiguous_format)
            out[slot] = g
        if not self.chained:
            return out
        buffers = {slot: torch.zeros(shape, device=device, dtype=torch.float32) for slot, shape, device in self.summed}
        for source, r0, r1, path, factor, slots in self.chained:
            for role, g, (w0, w1) in (chain_a if factor == "a" else chain_b)(path, grads[source][r0:r1]):
                slot = slots.get(role)
                if slot is None:
                    continue
                buffer = buffers.get(slot)
                if buffer is not None:
                    buffer[w0:w0 + g.shape[0], w1:w1 + g.shape[1]].add_(g)
                    continue
                rows, cols = self.shapes[slot]
                if (w0, w1) != (0, 0) or tuple(g.shape) != (rows, cols):
                    g = F.pad(g, (w1, cols - g.shape[1] - w1, w0, rows - g.shape[0] - w0))
                out[slot] = g
        for slot, buffer in buffers.items():
            out[slot] = buffer
        for slot, dtype in self.casts:
            out[slot] = out[slot].to(dtype)
        return out


def _reads_whole(route: Route, t: Tensor) -> bool:
    """Whether a plain / slice route's factor gradient (rows r0:r1, ``width`` wide) is the whole of
    tensor ``t`` (no window inside a larger shared tensor)."""
    if route.path.kind not in ("plain", "slice"):
        return False
    r = route.r1 - route.r0
    if route.factor == "a":
        return route.path.k_offset == 0 and tuple(t.shape) == (r, route.width)
    return route.path.n_offset == 0 and tuple(t.shape) == (route.width, r)


def path_routes(paths: Sequence[LoRAPath], k: int, n: int) -> list[Route]:
    """The routes of one module's paths over its flat tensor list (``[t for p in paths for t in
    p.tensors]``), from dA_eff (source 0, (R, K)) and dB_eff^T (source 1, (R, N)), ranks concatenated."""
    routes, i0, r0 = [], 0, 0
    for p in paths:
        slots = tuple(range(i0, i0 + len(p.tensors)))
        r1 = r0 + p.rank
        routes += [Route(0, r0, r1, p, "a", slots, k), Route(1, r0, r1, p, "b", slots, n)]
        i0, r0 = i0 + len(p.tensors), r1
    return routes


class RouteCache:
    """A plan's ``GradRoutes``, one per marking of the tensors that need a gradient, made on first use:
    ``cache(needs)``. ``routes``: every route over the plan's flat ``tensors``."""

    __slots__ = ("tensors", "routes", "_made")

    def __init__(self, tensors: Sequence[Tensor], routes: Sequence[Route]):
        self.tensors, self.routes = list(tensors), list(routes)
        self._made: dict[tuple[bool, ...], GradRoutes] = {}

    def __call__(self, needs: tuple[bool, ...]) -> GradRoutes:
        routes = self._made.get(needs)
        if routes is None:
            routes = self._made[needs] = GradRoutes(self.tensors, needs, self.routes)
        return routes
