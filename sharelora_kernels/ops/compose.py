"""The ``compose`` backend: every path kind as plain torch GEMMs (cuBLAS on a GPU), hand-written backward.

The composition a strong user would write instead of a fused kernel, with no extra pass over the
output. Shapes: x (M, K) and W (N, K), b (N,) or None, in one base dtype (float32, bfloat16 or
float16, W and b frozen); adapter tensors of any of those dtypes; y (M, N) in the base dtype.

The low-rank GEMMs run in ``lowrank_dtype(base)``: the base dtype, float32 under a float16 base
(h = x A^T may exceed float16's range). Their operands are cast inside each call: the adapter
factors (tiny) always, x and dy only under a float16 base, and no cast copy is ever saved. So
under a bf16 base the low-rank products take bf16 operands with fp32 accumulation, as autocast's
and the fused kernels' do; adapter gradients come back in each tensor's own dtype.

Forward (z is written once and becomes y):
    z  = (xd A_d^T) B_d^T + b      the plain, slice and gate paths stacked into one LoRA
                                   (``reference._dense_factors``: slice windows, a gate path as its
                                   rank-g pair C G_id / G_ou, scales folded into B_d)
    z += K_B (x) (s h B_s^T)       per Kronecker path, h = fold(xd; K_A) A_s^T: A and B never built
    y  = z.addmm_(x, W^T)          the base GEMM's epilogue adds z (beta = 1)
Backward (dh = dy B_d, mask and 1 / (1 - p) applied once to the (M, K) term):
    dx = mask(dh A_d + Kronecker tiles) / (1 - p), then dx.addmm_(dy, W)
    dA_d = dh^T xd, dB_d = dy^T h: chained to every adapter tensor by ``shared_grad`` (one fp32
    buffer per tensor, slice windows, the gate core); Kronecker: dA_s, dB_s from the folds of xd
    and dy, dK_A, dK_B by a batched contraction, never an (R, K) or (N, R) tensor.

Saved for backward: x itself, the dropout mask as bool (1 byte per element: the dropped-out x would
take 2-4 bytes and x is kept anyway, so backward recomputes x * mask in one pass), h (M, R), each
Kronecker fold (M, d), and the tiny factors. Dropout is drawn once (``torch.native_dropout``);
modules that read one x can share that draw (``grouped_lora_linear``).

A layer's call plan runs the same math through programs built once (``dense_program.DenseProgram``
with ``DenseLean`` / ``DenseCompose``; ``path_program.PathProgram`` for gate and Kronecker paths),
whose per-call work is only the GEMMs: no path objects, sinks or casts rebuilt, each tensor's
gradient returned directly (its tensors are distinct), slice windows padded into their tensors' shapes.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PATH_ROLES
from ..reference import LoRAPath, _dense_factors, add_path_output, kron_fold
from .autocast import no_autocast
from .encoding import check_linear
from .function import first_order, thin_apply, wants_grad
from .shared_grad import DirectSink, GradSink, chain_a, chain_b, sink_for

DENSE_KINDS = ("plain", "slice", "gate")  # one stacked dense LoRA; "kron" is folded instead


def lowrank_dtype(base: torch.dtype) -> torch.dtype:
    """The dtype of the low-rank GEMMs under a ``base`` dtype (float16 runs them in float32)."""
    return torch.float32 if base == torch.float16 else base


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype`` (itself when it already is: no call into torch)."""
    return t if t.dtype == dtype else t.to(dtype)


def _at_least_fp32(path: LoRAPath) -> LoRAPath:
    if all(t.dtype in (torch.float32, torch.float64) for t in path.tensors):
        return path
    return path._replace(tensors=tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in path.tensors))


def _factors(paths: Sequence[LoRAPath], k: int, n: int, dtype: torch.dtype) -> tuple[tuple[Tensor, Tensor] | None,
                                                                                      list[LoRAPath]]:
    """(A_d (R_d, K), B_d (N, R_d)) of the dense paths in ``dtype`` (built in float32 or better, cast
    once), or None; and the Kronecker paths with their tensors cast to ``dtype``."""
    dense = [_at_least_fp32(p) for p in paths if p.kind in DENSE_KINDS]
    factors = None
    if dense:
        a, b = _dense_factors(dense, k, n)
        factors = (_cast(a, dtype), _cast(b, dtype))
    krons = [p._replace(tensors=tuple(_cast(t, dtype) for t in p.tensors)) for p in paths if p.kind == "kron"]
    return factors, krons


def _kron_kernel_grad(t: Tensor, w: Tensor, d: int) -> Tensor:
    """g[j] = sum_{m, c} t[m, j*d + c] w[m, c]: t (M, J*d), w (M, d) -> (J,), the adjoint of ``kron_fold``
    with respect to its kernel, as one batched GEMM (no (M, J*d) temporary)."""
    m, j = t.shape[0], t.shape[1] // d
    return torch.bmm(w.view(m, 1, d), t.reshape(m, j, d).transpose(1, 2)).sum(0).view(j)


def compose_forward(x: Tensor, xd: Tensor | None, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath]):
    """y (M, N) of x (M, K) (xd: its dropped-out copy, or None), and what backward needs: h (M, R_d)
    of the dense paths, their stacked factors (or None), the Kronecker paths cast, folds and h's."""
    dtype = lowrank_dtype(x.dtype)
    with no_autocast(x.device.type):
        xl = _cast(x if xd is None else xd, dtype)
        dense, krons = _factors(paths, x.shape[1], weight.shape[0], dtype)
        z = h = None
        if dense is not None:
            h = xl @ dense[0].t()
            z = torch.mm(h, dense[1].t()) if bias is None else torch.addmm(_cast(bias, dtype), h, dense[1].t())
        folds = [kron_fold(xl, kp.tensors[2], kp.tensors[0].shape[1]) for kp in krons]
        hks = [u @ kp.tensors[0].t() for u, kp in zip(folds, krons)]
        y = F.linear(x, weight, bias) if z is None else None
        for kp, hk in zip(krons, hks):
            add_path_output(y if z is None else z, hk, kp)
        if z is not None:
            y = z.to(x.dtype).addmm_(x, weight.t())
    return y, h, dense, krons, folds, hks


class _ComposeLinear(torch.autograd.Function):
    """y = x W^T + b + sum_p s_p path_p(xd). x (M, K); xd (M, K) the dropped-out x and mask (M, K) bool,
    both None without dropout; ``meta`` = (p, ((kind, scale, k_offset, n_offset), ...)); ``tensors``
    every path's tensors in role order."""

    @staticmethod
    def forward(ctx, x, xd, mask, weight, bias, meta, *tensors):
        p, specs = meta
        y, h, dense, krons, folds, hks = compose_forward(x, xd, weight, bias, _paths(specs, tensors))
        kron_saved = [t for kp, u, hk in zip(krons, folds, hks) for t in (*kp.tensors, u, hk)]
        ctx.save_for_backward(x, mask, weight, h, *(dense or (None, None)), *kron_saved, *tensors)
        ctx.meta, ctx.kron_count = meta, len(krons)
        return y

    @staticmethod
    @first_order("the compose backend")
    def backward(ctx, dy):
        x, mask, weight, h, a_d, b_d, *rest = ctx.saved_tensors
        kron_saved, tensors = rest[:6 * ctx.kron_count], rest[6 * ctx.kron_count:]
        p, specs = ctx.meta
        paths = _paths(specs, tensors)
        need_x, need = ctx.needs_input_grad[0], ctx.needs_input_grad[6:]
        dtype = lowrank_dtype(x.dtype)
        keep = 1.0 / (1.0 - p) if mask is not None else 1.0
        sink = sink_for(tensors, need)
        with no_autocast(x.device.type):
            dyl = _cast(dy, dtype)
            xm = None  # dropout(x) * (1 - p), only when an adapter needs a gradient
            if any(need):
                xm = _cast(x if mask is None else x * mask, dtype)
            dx_low = None
            if a_d is not None:
                dh = dyl @ b_d  # (M, R_d); the 1 / (1 - p) of dx and dA applied here once
                dh = dh.mul_(keep) if mask is not None else dh
                if need_x:
                    dx_low = dh @ a_d
                _chain_dense(sink, paths, need, dh, xm, h, dyl)
            for kron in _kron_paths(kron_saved, paths):
                dx_low = _kron_backward(sink, kron, dyl, xm, keep, dx_low, need_x)
            dx = None
            if need_x and dx_low is None:  # no low-rank path
                dx = dy @ weight
            elif need_x:
                if mask is not None:
                    dx_low.mul_(mask)
                dx = dx_low.to(x.dtype).addmm_(dy, weight)
        return (dx, None, None, None, None, None, *sink.grads())


_compose_apply = thin_apply(_ComposeLinear)


class _Kron(NamedTuple):
    """What backward needs of one Kronecker path: the path (original dtypes), its tensors cast to the
    low-rank dtype (A_s, B_s, K_A, K_B), the fold u = fold(xd; K_A) (M, d), h = u A_s^T (M, r), and the
    index of its first tensor in the op's tensor list."""

    path: LoRAPath
    cast: tuple[Tensor, ...]
    fold: Tensor
    h: Tensor
    first: int


def _offsets(paths: Sequence[LoRAPath]) -> list[int]:
    """Index of each path's first tensor in the flat tensor list."""
    out, i = [], 0
    for p in paths:
        out.append(i)
        i += len(p.tensors)
    return out


def _kron_paths(saved: Sequence[Tensor], paths: Sequence[LoRAPath]) -> list[_Kron]:
    """The ``_Kron`` of every Kronecker path from the 6 tensors per path saved by forward."""
    krons = [(p, i0) for p, i0 in zip(paths, _offsets(paths)) if p.kind == "kron"]
    return [_Kron(p, tuple(saved[6 * j:6 * j + 4]), saved[6 * j + 4], saved[6 * j + 5], i0)
            for j, (p, i0) in enumerate(krons)]


def _chain_dense(sink: GradSink | DirectSink, paths: Sequence[LoRAPath], need: Sequence[bool], dh: Tensor, xm: Tensor,
                 h: Tensor, dyl: Tensor) -> None:
    """dA_d = dh^T xm and dB_d^T = h^T dy, chained to each dense path's tensors that need a gradient."""
    rows, r0 = [], 0
    for p, i0 in zip(paths, _offsets(paths)):
        if p.kind in DENSE_KINDS:
            rows.append((p, i0, r0, r0 + p.rank))
            r0 += p.rank
    if not any(any(need[i0:i0 + len(p.tensors)]) for p, i0, _, _ in rows):
        return
    grad_a = (dh.t() @ xm).float()  # (R_d, K)
    grad_b = (h.t() @ dyl).float()  # (R_d, N): the gradient of B_d^T, whose rows carry s_p
    for p, i0, r0, r1 in rows:
        for role, g, window in (*chain_a(p, grad_a[r0:r1]), *chain_b(p, grad_b[r0:r1] * p.scale)):
            sink.add(i0 + role, g, window)


def _kron_backward(sink: GradSink | DirectSink, kron: _Kron, dyl: Tensor, xm: Tensor, keep: float, dx_low: Tensor | None,
                   need_x: bool) -> Tensor | None:
    """One Kronecker path: its tensors' gradients into ``sink``; returns dx_low plus its (M, K) term
    (before the dropout mask)."""
    path, (a_s, b_s, k_a, k_b), u, h, i0 = kron
    d, s, m = a_s.shape[1], path.scale, dyl.shape[0]
    v = kron_fold(dyl, k_b, d)  # (M, d) = dy B folded by K_B
    hs = h * s
    dh = (v @ b_s) * s  # (M, r)
    du = (dh @ a_s).mul_(keep)  # (M, d), the gradient of the fold of dropout(x)
    if any(b is not None for b in sink.buffers[i0:i0 + 4]):
        sink.add(i0 + 0, (dh.t() @ u).float())  # dA_s
        sink.add(i0 + 1, (v.t() @ hs).float())  # dB_s
        sink.add(i0 + 2, _kron_kernel_grad(xm, du, d).float().view(1, -1))  # dK_A
        sink.add(i0 + 3, _kron_kernel_grad(dyl, hs @ b_s.t(), d).float().view(-1, 1))  # dK_B
    if not need_x:
        return dx_low
    j = k_a.numel()
    tile = (k_a.view(1, j, 1), du.view(m, 1, d))
    if dx_low is None:
        return (tile[0] * tile[1]).view(m, j * d)
    dx_low.view(m, j, d).addcmul_(*tile)
    return dx_low


def _paths(specs: Sequence[tuple], tensors: Sequence[Tensor]) -> list[LoRAPath]:
    paths, i = [], 0
    for kind, scale, k_offset, n_offset in specs:
        n = len(PATH_ROLES[kind])
        paths.append(LoRAPath(kind, tuple(tensors[i:i + n]), scale, k_offset, n_offset))
        i += n
    return paths


def draw_dropout(x: Tensor, p: float) -> tuple[Tensor | None, Tensor | None]:
    """(dropout(x), keep mask bool) of x (M, K), drawn once; (None, None) when p == 0."""
    if p == 0:
        return None, None
    with torch.no_grad():
        return torch.native_dropout(x, p, True)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float) -> None:
    """ValueError naming what does not fit one call (``encoding.check_linear``) or a base that trains."""
    check_linear(x, weight, bias, paths, dropout_p)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the compose backend takes a frozen weight and bias (requires_grad=False)")


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float = 0.0,
                training: bool = False, dropped: tuple[Tensor | None, Tensor | None] | None = None) -> Tensor:
    """The compose path of ``ops.lora_linear``: x (..., K) -> (..., N) in the base dtype.

    dropped: the (dropout(x), mask) pair of x reshaped to (M, K) from ``draw_dropout``, shared by
    modules that read the same x; None draws this module's own.
    """
    _check(x, weight, bias, paths, dropout_p)
    p = dropout_p if training else 0.0
    return _linear(x, weight, bias, paths, p, dropped if dropped is not None else
                   draw_dropout(x.reshape(-1, x.shape[-1]), p))


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], p: float,
            dropped: tuple[Tensor | None, Tensor | None]) -> Tensor:
    """``lora_linear`` of checked inputs, with dropout p applied as ``dropped`` says."""
    x2 = x.reshape(-1, x.shape[-1])
    xd, mask = dropped
    if not wants_grad(x2, (t for q in paths for t in q.tensors)):
        y = compose_forward(x2, xd, weight, bias, paths)[0]  # no gradient wanted: no autograd Function
        return y.reshape(*x.shape[:-1], weight.shape[0])
    specs = tuple((q.kind, float(q.scale), q.k_offset, q.n_offset) for q in paths)
    y = _ComposeLinear.apply(x2, xd, mask, weight, bias, (p if mask is not None else 0.0, specs),
                             *(t for q in paths for t in q.tensors))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def planned_call(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                 training: bool):
    """The run(x) of a call plan for any path list: ``lora_linear`` with its checks and the op's flat
    arguments done once."""
    p = dropout_p if training else 0.0
    _check(x, weight, bias, paths, p)
    paths = list(paths)
    tensors = [t for q in paths for t in q.tensors]
    meta = (p, tuple((q.kind, float(q.scale), q.k_offset, q.n_offset) for q in paths))
    n = weight.shape[0]

    def run(x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xd, mask = draw_dropout(x2, p)
        if wants_grad(x2, tensors):
            y = _compose_apply(x2, xd, mask, weight, bias, meta, *tensors)
        else:
            y = compose_forward(x2, xd, weight, bias, paths)[0]
        return y.view(*x.shape[:-1], n)
    return run


def grouped_lora_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                        paths: Sequence[Sequence[LoRAPath]], dropout_p: float = 0.0,
                        training: bool = False) -> tuple[Tensor, ...]:
    """``lora_linear`` of G modules that read x, one dropout draw for the group: one (..., N_g) per
    module. Every module is checked (the error naming it) before anything runs."""
    for g, (w, b, ps) in enumerate(zip(weights, biases, paths)):
        try:
            _check(x, w, b, ps, dropout_p)
        except ValueError as e:
            raise ValueError(f"module {g} of the group: {e}") from None
    p = dropout_p if training else 0.0
    dropped = draw_dropout(x.reshape(-1, x.shape[-1]), p)
    return tuple(_linear(x, w, b, ps, p, dropped) for w, b, ps in zip(weights, biases, paths))
