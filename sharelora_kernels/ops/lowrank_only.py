"""The low-rank-only op, for bases that compute their own output (bitsandbytes 4-bit / 8-bit):
``y += sum_p s_p B_p A_p dropout(x)`` in place, forward and backward, every path kind.

Shapes: y (..., N) the base's output (any float dtype, updated in place); x (..., K) with the same
leading dims (M tokens in all). Numerics: operands in the compute dtype c (x is cast to it; the
adapters, float32 by default, are rounded to it), products accumulated in float32 (float64 for a
float64 c, torch path only), ``h = dropout(x) A_eff^T`` (M, R) kept in that accumulation dtype, the
low-rank term added into y in y's dtype.

Forward: ``h`` for every path at once, then ``y += (h * s) B_eff^T`` in place (no (M, N) temporary
on the Triton path). Backward (the base's own backward gives the rest of dx; y's gradient passes
through): ``dh = s * dy B_eff``, ``dx = mask(dh A_eff) / (1 - p)``, ``dA_eff = dh^T dropout(x)``,
``dB_eff^T = (s h)^T dy`` in the accumulation dtype, then the chain to each parameter
(``shared_grad.path_grads``: slice window, Kronecker fold, gate core). Dropout draws one mask on x
from a seed; x is not copied (the torch path draws the mask again in backward, the kernels keep it
bit-packed, M * K / 8 bytes). A layer's call plan of plain / slice paths on the torch path runs
``LowRankDense`` instead, which keeps the mask as bool (M * K bytes), as the compose backend does.

Backends: ``torch`` (any device: the reference's helpers ``_dense_factors`` (plain, slice and gate
paths stacked, a gate as its rank-g pair: one pass over x) and ``path_input`` / ``add_path_output``
(Kronecker paths: nothing expanded), the mask from a ``torch.Generator`` seeded with a seed drawn on
the host); ``triton`` (CUDA, or the interpreter; ``lowrank_only_triton``: ``lowrank_project`` for h
and the mask, one kernel adding into y in place, ``dy_lowrank`` and ``lowrank_grad`` for dh, dB and
dA; the seed on x's device).

Registered as the custom ops ``sharelora::lowrank_add_`` (mutates y, returns h and the mask) and
``sharelora::lowrank_add_backward``, with fake kernels. ``torch.library`` attaches no autograd
formula to an op that mutates an input, so the formula is a ``torch.autograd.Function`` around the
mutable op (``ctx.mark_dirty(y)``); dynamo traces it into one graph (``torch.compile(fullgraph=True)``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..reference import LoRAPath, _add_lowrank, _dense_factors, add_path_output, path_input
from .autocast import no_autocast
from .compose import draw_dropout
from .dense_program import DenseProgram
from .encoding import check_devices, check_path, decode, encode
from .function import first_order, thin_apply, wants_grad
from .shared_grad import path_grads

DENSE_KINDS = ("plain", "slice", "gate")  # stacked into one LoRA by the torch path (gate: C G_id (g, K), G_ou)


# ----------------------------------------------------------------------------- torch path
def _keep(x: Tensor, p: float, seed: Tensor) -> Tensor | None:
    """The (M, K) keep mask of ``seed`` (a host tensor: reading it costs no device sync; None when
    p == 0): ``rand >= p`` from a generator on x's device seeded with it, so backward draws the
    forward's mask again."""
    if p == 0:
        return None
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed.item()))
    return torch.rand(x.shape, generator=gen, device=x.device) >= p


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products of ``dtype`` operands accumulate in: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _dropped(x: Tensor, keep: Tensor | None, p: float) -> Tensor:
    """dropout(x) rounded to x's dtype (the kernels' operand), in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    if keep is None:
        return x.to(acc)
    return (x.to(acc) * keep / (1.0 - p)).to(x.dtype).to(acc)


def _rounded(paths: Sequence[LoRAPath], dtype: torch.dtype) -> list[LoRAPath]:
    """``paths`` with every tensor rounded to the compute dtype, held in its accumulation dtype."""
    acc = accumulation_dtype(dtype)
    return [p._replace(tensors=tuple(t.to(dtype).to(acc) for t in p.tensors)) for p in paths]


def _kron_adjoint(path: LoRAPath) -> LoRAPath:
    """The Kronecker path of the transposed map, unscaled: its ``path_input`` is ``dy B_eff`` and its
    ``add_path_output`` adds ``dh A_eff``, neither built (roles A, B, K_A, K_B <- B^T, A^T, K_B^T, K_A^T)."""
    a, b, k_a, k_b = path.tensors
    return LoRAPath("kron", (b.t(), a.t(), k_b.t(), k_a.t()), 1.0)


def _dense_split(paths: Sequence[LoRAPath]) -> tuple[list[int], list[int]]:
    dense = [i for i, p in enumerate(paths) if p.kind in DENSE_KINDS]
    return dense, [i for i in range(len(paths)) if i not in dense]


def torch_forward(y: Tensor, x: Tensor, paths: Sequence[LoRAPath], p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    """y (M, N) += the paths of dropout(x) (M, K) in place; returns h (M, R) in the accumulation dtype
    (float32; float64 for a float64 x), in path order, and an empty mask (backward draws it again)."""
    paths = _rounded(paths, x.dtype)
    xd = _dropped(x, _keep(x, p, seed), p)
    dense, others = _dense_split(paths)
    hs: list[Tensor | None] = [None] * len(paths)
    if dense:
        a, b = _dense_factors([paths[i] for i in dense], x.shape[1], y.shape[1])
        h_dense = xd @ a.t()
        _add_lowrank(y, h_dense, b, 1.0)
        for i, h in zip(dense, h_dense.split([paths[i].rank for i in dense], 1)):
            hs[i] = h
    for i in others:
        hs[i] = path_input(xd, paths[i])
        add_path_output(y, hs[i], paths[i])
    return (hs[0] if len(hs) == 1 else torch.cat(hs, 1)), x.new_empty((0,), dtype=torch.int32)


def torch_backward(dy: Tensor, x: Tensor, h: Tensor, mask: Tensor, paths: Sequence[LoRAPath], p: float,
                   seed: Tensor, needs_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dx (M, K) in x's dtype (empty unless needs_dx), dA_eff (R, K) and dB_eff^T (R, N) in the
    accumulation dtype; the keep mask is drawn again from ``seed`` (``mask`` is empty here)."""
    paths = _rounded(paths, x.dtype)
    k, n = x.shape[1], dy.shape[1]
    dy = dy.to(x.dtype).to(accumulation_dtype(x.dtype))
    dense, others = _dense_split(paths)
    dhs: list[Tensor | None] = [None] * len(paths)
    dx = None
    if dense:
        a, b = _dense_factors([paths[i] for i in dense], k, n)  # b scaled: dh = s dy B
        dh_dense = dy @ b
        if needs_dx:
            dx = dh_dense @ a
        for i, dh in zip(dense, dh_dense.split([paths[i].rank for i in dense], 1)):
            dhs[i] = dh
    for i in others:  # Kronecker paths
        dhs[i] = path_input(dy, _kron_adjoint(paths[i])) * paths[i].scale
        if needs_dx:
            if dx is None:
                dx = torch.zeros(x.shape, device=x.device, dtype=dy.dtype)
            add_path_output(dx, dhs[i], _kron_adjoint(paths[i]))
    keep = _keep(x, p, seed)
    if needs_dx:
        dx = (dx if keep is None else dx * keep / (1.0 - p)).to(x.dtype)
    else:
        dx = x.new_empty((0,))
    dh = dhs[0] if len(dhs) == 1 else torch.cat(dhs, 1)
    grad_b = h.t() @ dy  # (R, N), each path's rows scaled below (no scale vector built from host data)
    r0 = 0
    for q in paths:
        grad_b[r0:r0 + q.rank].mul_(q.scale)
        r0 += q.rank
    return dx, dh.t() @ _dropped(x, keep, p), grad_b


def _backend(use_triton: bool):
    """(forward, backward) of the chosen backend; the Triton module is imported only when asked for."""
    if use_triton:
        from . import lowrank_only_triton

        return lowrank_only_triton.triton_forward, lowrank_only_triton.triton_backward
    return torch_forward, torch_backward


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sharelora::lowrank_add_", mutates_args=("y",))
def _forward_op(y: Tensor, x: Tensor, tensors: list[Tensor], layout: list[int], scales: list[float],
                dropout_p: float, seed: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
    """y (..., N) += the paths of dropout(x) (M, K) in place; returns h (M, R) and the dropout mask
    (the Triton path's (M, ceil(K / 32)) int32 bits; empty for the torch path or p == 0), both saved
    for backward."""
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are chosen by the caller
        return _backend(use_triton)[0](y.view(-1, y.shape[-1]), x, decode(tensors, layout, scales), dropout_p, seed)


@_forward_op.register_fake
def _(y, x, tensors, layout, scales, dropout_p, seed, use_triton):
    r = sum(p.rank for p in decode(tensors, layout, scales))
    bits = (x.shape[0], (x.shape[1] + 31) // 32) if use_triton and dropout_p > 0 else (0,)
    return x.new_empty((x.shape[0], r), dtype=accumulation_dtype(x.dtype)), x.new_empty(bits, dtype=torch.int32)


@torch.library.custom_op("sharelora::lowrank_add_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, h: Tensor, mask: Tensor, tensors: list[Tensor], layout: list[int],
                 scales: list[float], dropout_p: float, seed: Tensor, needs_dx: bool,
                 use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dx (M, K) in x's dtype (empty unless needs_dx), dA_eff (R, K) and dB_eff^T (R, N)."""
    with torch.autocast(x.device.type, enabled=False):
        return _backend(use_triton)[1](dy.reshape(-1, dy.shape[-1]), x, h, mask, decode(tensors, layout, scales),
                                       dropout_p, seed, needs_dx)


@_backward_op.register_fake
def _(dy, x, h, mask, tensors, layout, scales, dropout_p, seed, needs_dx, use_triton):
    r, n = h.shape[1], dy.shape[-1]
    dx = x.new_empty(x.shape if needs_dx else (0,))
    acc = accumulation_dtype(x.dtype)
    return dx, x.new_empty((r, x.shape[1]), dtype=acc), x.new_empty((r, n), dtype=acc)


class _LowRankAdd(torch.autograd.Function):
    """Autograd of ``sharelora::lowrank_add_``: y passes its gradient through; x and every path tensor
    get theirs from ``sharelora::lowrank_add_backward``."""

    @staticmethod
    def forward(ctx, y, x, seed, layout, scales, dropout_p, use_triton, *tensors):
        h, mask = _forward_op(y, x, list(tensors), layout, scales, dropout_p, seed, use_triton)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, h, mask, seed, *tensors)
        ctx.layout, ctx.scales, ctx.dropout_p, ctx.use_triton = layout, scales, dropout_p, use_triton
        return y

    @staticmethod
    @first_order("the low-rank op of a quantized base", torch_exact=False)
    def backward(ctx, dy):
        x, h, mask, seed, *tensors = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[1]
        dx, grad_a, grad_b = _backward_op(dy, x, h, mask, tensors, ctx.layout, ctx.scales, ctx.dropout_p, seed,
                                          needs_dx, ctx.use_triton)
        grads = path_grads(tensors, ctx.needs_input_grad[7:], decode(tensors, ctx.layout, ctx.scales), grad_a, grad_b)
        return (dy, dx if needs_dx else None, None, None, None, None, None, *grads)


# ----------------------------------------------------------------------------- public entry
def _check(y: Tensor, x: Tensor, paths: Sequence[LoRAPath], dropout_p: float, compute_dtype, use_triton: bool) -> None:
    """ValueError naming what does not fit."""
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype must be a floating-point torch.dtype or None, got {compute_dtype!r}")
    if use_triton:
        _check_triton_device(x)
    if x.dim() == 0 or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y {tuple(y.shape)} and x {tuple(x.shape)} must share their leading dims (..., N) / (..., K)")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise ValueError(f"x and y must be floating point, got {x.dtype} and {y.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    for i, p in enumerate(paths):
        check_path(i, p, x.shape[-1], y.shape[-1])
    check_devices(x, (("y", y),), paths)


def _check_triton_device(x: Tensor) -> None:
    """``utils.check_kernel_device``, imported only when the kernels are asked for (it imports Triton)."""
    from .utils import check_kernel_device

    check_kernel_device(x)


def lowrank_add(y: Tensor, x: Tensor, paths: Sequence[LoRAPath], dropout_p: float = 0.0, training: bool = False,
                compute_dtype: torch.dtype | None = None, use_triton: bool = False) -> Tensor:
    """``y += sum_p s_p B_p A_p dropout(x)`` in place; returns y (autograd's version of it), or the sum in a
    copy of y where y cannot take the in-place add: not contiguous, or a view (bitsandbytes returns
    views of its custom Function's output, with a bias or a 3-D x, which autograd forbids modifying).

    y (..., N): the base's output; x (..., K) its input, cast to ``compute_dtype`` (default: x's) for
    the low-rank products; paths: LoRAPaths (every adapter tensor of one dtype for the Triton path).
    ``use_triton``: the Triton kernels (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``), else torch.
    ValueError where y and x share memory (the paths read x after the first writes into y).
    """
    _check(y, x, paths, dropout_p, compute_dtype, use_triton)
    if (not torch.compiler.is_compiling() and y.numel() and x.numel() and y.device.type != "meta"
            and y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()):  # (storages are not traced)
        raise ValueError("y and x share memory: lowrank_add writes into y while it reads x; pass a copy of one")
    if not paths:
        return y
    if not y.is_contiguous() or y._base is not None:
        y = y.clone(memory_format=torch.contiguous_format)
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype or x.dtype)
    p = dropout_p if training else 0.0
    seed = _seed(x.device, use_triton) if p > 0 else torch.zeros(1, dtype=torch.int64, device=x.device)
    tensors, layout, scales = encode(paths)
    if not wants_grad(x2, (y, *tensors)):
        _forward_op(y, x2, tensors, layout, scales, p, seed, use_triton)  # no gradient wanted
        return y
    return _LowRankAdd.apply(y, x2, seed, layout, scales, p, use_triton, *tensors)


# ----------------------------------------------------------------------------- the planned eager call
class LowRankPlanned(torch.autograd.Function):
    """One planned eager call: ``apply(program, y, x (M, K), *tensors)`` adds the paths into y in
    place through the backend directly (no custom-op wrapper; ``torch.compile`` reaches the custom
    ops through ``lowrank_add``). ``program`` = (paths, p, zero seed, kernels): ``kernels`` the
    Triton path's ``lowrank_only_triton.LowRankPlan``, or None for the torch path. The adapter
    tensors, which backward reads through ``program``, are saved too, so that autograd raises its
    error for one changed in place since the forward (backward would read its new values)."""

    @staticmethod
    def forward(ctx, program, y, x, *tensors):
        with no_autocast(x.device.type):  # the dtypes are chosen by the plan
            h, mask, seed = _planned_add(program, y.view(-1, y.shape[-1]), x)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, h, mask, seed, *tensors)
        ctx.program = program
        return y

    @staticmethod
    @first_order("the low-rank op of a quantized base", torch_exact=False)
    def backward(ctx, dy):
        x, h, mask, seed = ctx.saved_tensors[:4]  # unpacking checks every saved tensor's version
        paths, p, _, kernels = ctx.program
        needs = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        with no_autocast(x.device.type):
            if kernels is not None:
                dx, grads = kernels.backward(dy2, x, h, mask, needs[2], needs[3:])
            else:
                dx, grad_a, grad_b = torch_backward(dy2, x, h, mask, paths, p, seed, needs[2])
                grads = path_grads([t for q in paths for t in q.tensors], needs[3:], paths, grad_a, grad_b)
        return (None, dy, dx if needs[2] else None, *grads)


_planned_apply = thin_apply(LowRankPlanned)


def _planned_add(program: tuple, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """y (M, N) += the paths of dropout(x) (M, K) in place on a planned call's path (the torch path,
    or its kernels' ``LowRankPlan``); returns h, the mask and the call's seed (drawn when p > 0)."""
    paths, p, seed, kernels = program
    if p > 0:
        seed = _seed(x.device, kernels is not None)
    if kernels is None:
        return (*torch_forward(y, x, paths, p, seed), seed)
    return (*kernels.forward(y, x, seed), seed)


class LowRankDense(torch.autograd.Function):
    """The planned eager call of plain / slice paths on the torch path: ``apply(program, y, x (M, K),
    *tensors)`` adds them into y in place with the GEMMs of ``dense_program.DenseProgram`` (its adapter
    side: ``add_into``, ``lowrank_backward``; x in the compute dtype, the products in its
    accumulation dtype; x cast to it here, its gradient cast back). Dropout draws one bool mask,
    saved with x (as the compose backend does: nothing read back from the device, no generator
    seeded per call)."""

    @staticmethod
    def forward(ctx, program, y, x, *tensors):
        ctx.x_dtype = x.dtype
        if x.dtype != program.compute:
            x = x.to(program.compute)
        xd, mask = draw_dropout(x, program.p)
        with no_autocast(x.device.type):  # the dtypes are chosen by the plan
            h, a, b = program.add_into(y.view(-1, program.n), x, xd)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, mask, h, a, b)
        ctx.program = program
        return y

    @staticmethod
    @first_order("the low-rank op of a quantized base", torch_exact=False)
    def backward(ctx, dy):
        x, mask, h, a, b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with no_autocast(x.device.type):
            dx, *grads = ctx.program.lowrank_backward(dy.reshape(-1, dy.shape[-1]), x, mask, h, a, b, needs[2:])
        return (None, dy, dx if dx is None or dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype), *grads)


_dense_apply = thin_apply(LowRankDense)


def _seed(device: torch.device, use_triton: bool) -> Tensor:
    """The dropout seed of one call: the kernels read it on x's device; the torch path reads it on
    the host (``_keep``), so it is drawn there (no device-to-host copy per call)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device if use_triton else "cpu")


def planned_call(x: Tensor, n: int, paths: Sequence[LoRAPath], dropout_p: float, training: bool,
                 compute_dtype: torch.dtype, use_triton: bool):
    """The run(y, x) of a call plan on this op: the checks, flat arguments and a zero seed made once;
    on the torch path, plain / slice paths (``DenseProgram.takes``) run ``LowRankDense``."""
    p = dropout_p if training else 0.0
    paths = list(paths)
    tensors = [t for q in paths for t in q.tensors]
    for i, q in enumerate(paths):
        check_path(i, q, x.shape[-1], n)
    kernels = None
    if use_triton:
        from .lowrank_only_triton import LowRankPlan

        _check_triton_device(x)
        kernels = LowRankPlan(paths, p, x.shape[-1], n, x.device)
    program = (paths, p, torch.zeros(1, dtype=torch.int64, device=x.device), kernels)
    dense = None
    if not use_triton and DenseProgram.takes(paths):
        dense = DenseProgram(None, None, paths, p, shape=(n, x.shape[-1]), compute=compute_dtype)

    def run(y: Tensor, x: Tensor) -> Tensor:
        _check(y, x, (), p, None, False)
        if not y.is_contiguous() or y._base is not None:
            y = y.clone(memory_format=torch.contiguous_format)
        x2 = x.reshape(-1, x.shape[-1])
        grad = wants_grad(x2, (y, *tensors))
        if dense is not None and grad:
            return _dense_apply(dense, y, x2, *tensors)  # casts x itself: one autograd node
        if x2.dtype != compute_dtype:
            x2 = x2.to(compute_dtype)
        if dense is not None:
            with no_autocast(x.device.type):
                dense.add_into(y.view(-1, n), x2, draw_dropout(x2, p)[0])
            return y
        if grad:
            return _planned_apply(program, y, x2, *tensors)
        with no_autocast(x.device.type):
            _planned_add(program, y.view(-1, n), x2)
        return y
    return run
