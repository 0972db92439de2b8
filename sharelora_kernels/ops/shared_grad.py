"""Gradients of (possibly shared) adapter tensors: one fp32 buffer (fp64 for a float64 tensor) per
tensor per backward call.

A shared A_s / B_s (similarity sets, share_a/b/ab, Bi-Share intra/inter) is read by many modules.
Within one backward call (one module, or one input group of modules), every contribution to a
tensor is added into the *window* it reads (slice offsets) of ONE fp32 buffer of the tensor's
shape, through the small chain rule below (slice window, Kronecker fold, gate core): no padded
full-size gradient per module. The buffer is cast once to the
tensor's dtype and handed to autograd as that call's gradient; autograd sums the calls of
different layers into ``.grad`` as they arrive (each buffer is freed once added), so the peak
memory of a shared tensor's gradient stays a few buffers, whatever the number of its users.

Why not one buffer across calls (the first call handing its buffer to autograd, later calls adding
into it in place): autograd may already have summed that buffer with another gradient of the
same tensor (e.g. a penalty on the adapter weights computed after the forward), after which later
in-place additions are silently lost. Every buffer here is complete when it is handed over.

Determinism: each element of a buffer is written by one program in a fixed order, so the default
mode is bitwise reproducible (the kernels split the token reduction across programs and add the
partial sums in a fixed order). ``SHARELORA_ATOMIC_GRADS=1`` (or ``atomic_grads=True``) lets the
grouped op's dA splits ``tl.atomic_add`` instead: one launch fewer, not bitwise reproducible.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import LoRAPath

ATOMIC_ENV = "SHARELORA_ATOMIC_GRADS"


def atomic_grads(flag: bool | None = None) -> bool:
    """The accumulation mode: ``flag`` if given, else ``SHARELORA_ATOMIC_GRADS`` (default off)."""
    if flag is not None:
        return bool(flag)
    value = os.environ.get(ATOMIC_ENV, "0").strip().lower()
    if value not in ("0", "1", "false", "true", ""):
        raise ValueError(f"{ATOMIC_ENV} must be 0 or 1, got {value!r}")
    return value in ("1", "true")


class GradSink:
    """The gradient buffers of one backward call over ``tensors`` (each needing grad or not): fp32, fp64
    for a float64 tensor.

    A tensor listed several times (shared by modules of one group) gets one buffer: ``buffers[i]``
    of every occurrence is the same tensor, to add into, or None when no gradient is needed.
    ``grads()`` is what the autograd formula returns for ``tensors``: the buffer, cast once, at the
    first occurrence and None at the others (autograd would otherwise add them up again).
    """

    def __init__(self, tensors: Sequence[Tensor], needs_grad: Sequence[bool]):
        first: dict[int, int] = {}
        self.buffers: list[Tensor | None] = []
        self._first: list[bool] = []
        for i, (t, need) in enumerate(zip(tensors, needs_grad)):
            j = first.setdefault(id(t), i)
            if j == i:
                self.buffers.append(torch.zeros(t.shape, device=t.device, dtype=torch.promote_types(t.dtype, torch.float32))
                                    if need else None)
            else:
                self.buffers.append(self.buffers[j])
            self._first.append(j == i)
        self._dtypes = [t.dtype for t in tensors]

    def add(self, i: int, grad: Tensor, window: tuple[int, int] = (0, 0)) -> None:
        """buffers[i][r0:r0+rows, c0:c0+cols] += grad, if tensor i needs a gradient."""
        buf = self.buffers[i]
        if buf is not None:
            r0, c0 = window
            buf[r0:r0 + grad.shape[0], c0:c0 + grad.shape[1]].add_(grad)

    def grads(self) -> list[Tensor | None]:
        return [buf.to(dtype) if (first and buf is not None) else None
                for buf, first, dtype in zip(self.buffers, self._first, self._dtypes)]


class DirectSink:
    """``GradSink``'s interface for tensors that are all distinct (no tensor listed twice), where
    each gets one contribution per path: that contribution is its gradient (a window padded into
    the tensor's shape), cast once; no fp32 buffer to zero and fill. ``buffers[i]`` only says
    whether tensor i needs a gradient (True or None)."""

    def __init__(self, tensors: Sequence[Tensor], needs_grad: Sequence[bool]):
        self.buffers: list[bool | None] = [True if need else None for need in needs_grad]
        self._tensors = tensors
        self._grads: list[Tensor | None] = [None] * len(tensors)

    def add(self, i: int, grad: Tensor, window: tuple[int, int] = (0, 0)) -> None:
        if self.buffers[i] is None:
            return
        rows, cols = self._tensors[i].shape
        if window != (0, 0) or tuple(grad.shape) != (rows, cols):
            r0, c0 = window
            grad = F.pad(grad, (c0, cols - grad.shape[1] - c0, r0, rows - grad.shape[0] - r0))
        self._grads[i] = grad if self._grads[i] is None else self._grads[i] + grad

    def grads(self) -> list[Tensor | None]:
        return [None if need is None else (torch.zeros_like(t) if g is None else g.to(t.dtype))
                for need, g, t in zip(self.buffers, self._grads, self._tensors)]


def sink_for(tensors: Sequence[Tensor], needs_grad: Sequence[bool]) -> GradSink | DirectSink:
    """A ``DirectSink`` when no tensor is listed twice, else a ``GradSink`` (one buffer per tensor)."""
    if len({id(t) for t in tensors}) == len(tensors):
        return DirectSink(tensors, needs_grad)
    return GradSink(tensors, needs_grad)


# ----------------------------------------------------------------------------- chain rule
def direct_window(path: LoRAPath, factor: str) -> tuple[int, tuple[int, int]] | None:
    """(role index, window) of a plain or slice path's dA_eff / dB_eff^T inside its tensor's buffer
    (the gradient is the factor's, added at its offsets), else None (gate, kron: a chain rule)."""
    if path.kind not in ("plain", "slice"):
        return None
    return (0, (0, path.k_offset)) if factor == "a" else (1, (path.n_offset, 0))


def chain_a(path: LoRAPath, ga: Tensor) -> Iterator[tuple[int, Tensor, tuple[int, int]]]:
    """(role index, gradient, window) of the tensors behind A_eff, from ga = dA_eff (r, K) (fp32, or
    fp64 for float64 tensors: the chain runs in ga's dtype)."""
    if path.kind in ("plain", "slice"):
        role, window = direct_window(path, "a")
        yield role, ga, window
        return
    # Kronecker chains as batched matmuls: einsum's Python front end costs several times more here
    if path.kind == "kron":  # A = K_A (x) A_s: A[:, j d + c] = K_A[0, j] A_s[:, c]
        a_s, k_a = path.tensors[0].to(ga.dtype), path.tensors[2].to(ga.dtype)
        r, d = a_s.shape
        ga3 = ga.reshape(r, -1, d)  # (r, J, d)
        yield 0, torch.bmm(k_a.expand(r, 1, -1), ga3).view(r, d), (0, 0)
        yield 2, torch.bmm(ga3, a_s.unsqueeze(2)).sum(0).t(), (0, 0)
    else:  # gate: A_eff = C G_id, C = P Q with P = G_od B, Q = A G_iu
        a, b, g_id, g_iu, g_od, _ = [u.to(ga.dtype) for u in path.tensors]
        p, q = g_od @ b, a @ g_iu
        d_c = ga @ g_id.t()
        d_p, d_q = d_c @ q.t(), p.t() @ d_c
        for role, g in enumerate((d_q @ g_iu.t(), g_od.t() @ d_p, (p @ q).t() @ ga, a.t() @ d_q, d_p @ b.t())):
            yield role, g, (0, 0)


def chain_b(path: LoRAPath, gb: Tensor) -> Iterator[tuple[int, Tensor, tuple[int, int]]]:
    """(role index, gradient, window) of the tensors behind B_eff, from gb = dB_eff^T (r, N) (in its dtype,
    as ``chain_a``)."""
    if path.kind in ("plain", "slice"):
        role, window = direct_window(path, "b")
        yield role, gb.t(), window
    elif path.kind == "kron":  # B = K_B (x) B_s: B[i c + e, :] = K_B[i, 0] B_s[e, :], batched matmuls
        b_s, k_b = path.tensors[1].to(gb.dtype), path.tensors[3].to(gb.dtype)
        c, r = b_s.shape
        gb3 = gb.reshape(r, -1, c)  # (r, I, c)
        yield 1, torch.bmm(k_b.t().expand(r, 1, -1), gb3).view(r, c).t(), (0, 0)
        yield 3, torch.bmm(gb3, b_s.t().unsqueeze(2)).sum(0), (0, 0)
    else:  # gate: B_eff = G_ou
        yield 5, gb.t(), (0, 0)


def path_grads(tensors: Sequence[Tensor], needs_grad: Sequence[bool], paths: Sequence[LoRAPath], grad_a: Tensor,
               grad_b: Tensor) -> list[Tensor | None]:
    """What an autograd formula returns for ``tensors`` (the flat tensors of ``paths``), from the
    effective-factor gradients of every path at once: grad_a = dA_eff (R, K), grad_b = dB_eff^T (R, N)."""
    sink = sink_for(tensors, needs_grad)
    i0, r0 = 0, 0
    for p in paths:
        r1 = r0 + p.rank
        for role, g, window in (*chain_a(p, grad_a[r0:r1]), *chain_b(p, grad_b[r0:r1])):
            sink.add(i0 + role, g, window)
        i0, r0 = i0 + len(p.tensors), r1
    return sink.grads()

