"""The planned compose call of plain and slice paths: structure resolved once, a call runs its GEMMs.

A layer's call plan (``ops.call_plan``) builds a ``DenseProgram`` once: the frozen base (or, for a
base autocast casts every call, each call's cast), each path's A / B window as a detached view of
its parameter, the scales, the slice pads, the dropout probability. ``DenseLean`` (no dropout,
nothing cast) and ``DenseCompose`` are its autograd Functions; a base that computes itself
(bitsandbytes) uses the program's adapter side (``add_into`` / ``lowrank_backward``, through
``lowrank_only.LowRankDense``). The math is the compose backend's (``compose``):

    forward    h = xd A^T (M, R), z = b + (h * s) B^T, y = z.addmm_(x, W^T)
    backward   dh = dy (B * s), dx = mask(dh A) / (1 - p) + dy W, dA = dh^T xd, dB = dy^T (h * s)

with several paths stacked into one (A (R, K), B (N, R), their scales folded into B) and each
slice's window gradient padded into its tensor's shape. ``path_program`` reuses ``stacked_output``,
``db_of`` and ``runner`` for gate and Kronecker paths.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from ..reference import LoRAPath
from .autocast import AutocastOff
from .compose import draw_dropout, lowrank_dtype
from .function import first_order, thin_apply


class Base(NamedTuple):
    """The frozen base of a planned call as its GEMMs read it: W (N, K), its transpose, the term the
    low-rank GEMM's epilogue adds (the bias (N,), or a 0-d zero) and that GEMM's beta (1 or 0)."""

    weight: Tensor
    wt: Tensor
    bias_term: Tensor
    beta: int


def base_of(weight: Tensor, bias: Tensor | None, zero: Tensor) -> Base:
    return Base(weight, weight.t(), zero if bias is None else bias, 0 if bias is None else 1)


def window_pads(path: LoRAPath, k: int, n: int) -> tuple[tuple[int, int], tuple[int, int, int, int]] | None:
    """``constant_pad_nd`` widths that put a slice path's (r, K) / (N, r) window gradients into its
    tensors' shapes (A's columns, B's rows); None for any other path."""
    if path.kind != "slice":
        return None
    return ((path.k_offset, path.tensors[0].shape[1] - k - path.k_offset),
            (0, 0, path.n_offset, path.tensors[1].shape[0] - n - path.n_offset))


def rank_scales(ranks_and_scales: Sequence[tuple[int, float]], dtype: torch.dtype, device) -> Tensor:
    """(R,) each stacked path's scale repeated over its rank: folded into the stacked B."""
    return torch.cat([torch.full((r,), float(s), dtype=dtype, device=device) for r, s in ranks_and_scales])


class DenseProgram:
    """What a compose call of plain and slice paths needs that does not change between calls, built
    once by a layer's call plan (``ops.call_plan``): the frozen weight (N, K) and bias, each slice's
    window (offsets), each path's A / B window as a detached view of its parameter (the forward
    without gradient reads them; in-place updates show through, a replaced parameter makes the plan
    rebuild), the scales (one float for a single path, else an (R,) vector in the low-rank dtype),
    the dropout probability. ``takes(paths)``: whether this program serves them (plain / slice
    paths, no tensor read twice, every adapter tensor in one floating dtype).

    Both the forward without gradient and ``DenseCompose`` read the detached windows; backward
    returns each slice's window gradient padded into its tensor's shape (``pads``). The frozen base
    is the program's own (``own``), or, for a base cast every call (``per_call``), each call's.
    """

    def __init__(self, weight: Tensor | None, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                 shape: tuple[int, int] | None = None, compute: torch.dtype | None = None, per_call: bool = False):
        """weight None: the adapter side alone (``add_into`` / ``lowrank_backward``) for a base that
        computes itself, of ``shape`` (N, K): its operands (x, dy, the adapters) rounded to the
        ``compute`` dtype, the GEMMs in that dtype's accumulation dtype (float32 or float64).
        per_call: weight and bias are one call's casts of the base (autocast casting a base of
        another dtype): the program keeps their dtype and shapes, and every call passes its own
        ``Base`` (``base_of``)."""
        n, k = weight.shape if weight is not None else shape
        self.p, self.k, self.n = dropout_p, k, n
        self.adapter_dtype = paths[0].tensors[0].dtype
        self.dtype = torch.promote_types(compute, torch.float32) if weight is None else lowrank_dtype(weight.dtype)
        self.compute = compute
        # a bfloat16 / float16 compute dtype on a quantized base: operands rounded to it, then cast
        self.operand = compute if weight is None and compute != self.dtype else None
        device = paths[0].tensors[0].device
        self.window = [(q.k_offset, q.n_offset) if q.kind == "slice" else None for q in paths]
        self.sliced = any(w is not None for w in self.window)
        self.pads = [window_pads(q, k, n) for q in paths]
        self.single = len(paths) == 1
        self.scale = float(paths[0].scale)
        self.ranks = [q.rank for q in paths]
        self.keep = 1.0 / (1.0 - dropout_p)
        self.scales = None if self.single else rank_scales([(q.rank, q.scale) for q in paths], self.dtype, device)
        self.zero = torch.zeros((), dtype=self.dtype, device=device)
        self.tall = TALL_ROWS if device.type == "cpu" else None  # see ``db_of``
        self.scales_col = None if self.single else self.scales.view(-1, 1)
        # z = addmm(bias_or_zero, h, B^T, beta=beta): the bias added by the low-rank GEMM's epilogue
        self.own = None if weight is None or per_call else base_of(weight, bias, self.zero)
        detached = self.windows([t.detach() for q in paths for t in q.tensors])
        # no dropout, nothing cast: DenseLean reads these views directly
        self.lean = self.own is not None and dropout_p == 0 and self.adapter_dtype == self.dtype and (
            weight.dtype == self.dtype) and (bias is None or bias.dtype == self.dtype)
        self.a_list, self.b_list = detached[0::2], detached[1::2]
        self.a, self.b = detached if self.single else (None, None)
        self.at, self.bt = (self.a.t(), self.b.t()) if self.single else (None, None)

    @staticmethod
    def takes(paths: Sequence[LoRAPath]) -> bool:
        tensors = [t for q in paths for t in q.tensors]
        return (bool(paths) and all(q.kind in ("plain", "slice") for q in paths)
                and len({id(t) for t in tensors}) == len(tensors) and len({t.dtype for t in tensors}) == 1)

    def windows(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Each path's (A, B), a slice's as the (r, K) / (N, r) window it reads (views of ``tensors``)."""
        if not self.sliced:
            return tensors
        out = []
        for w, a, b in zip(self.window, tensors[0::2], tensors[1::2]):
            out += (a, b) if w is None else (a.narrow(1, w[0], self.k), b.narrow(0, w[1], self.n))
        return out

    def project(self, x: Tensor, xd: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(h (M, R), A (R, K), B (N, R)) in the low-rank dtype, of x (M, K) or its dropped-out copy xd,
        from the detached windows (stacked for several paths)."""
        if self.single:
            a, b = self.a, self.b
        else:
            a, b = torch.cat(self.a_list), torch.cat(self.b_list, 1)
        if self.operand is not None:
            a, b = a.to(self.operand).to(self.dtype), b.to(self.operand).to(self.dtype)
        elif a.dtype != self.dtype:
            a, b = a.to(self.dtype), b.to(self.dtype)
        xl = x if xd is None else xd
        return torch.mm(xl if xl.dtype == self.dtype else xl.to(self.dtype), a.t()), a, b

    def forward(self, x: Tensor, xd: Tensor | None, base: Base | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(y (M, N) in x's dtype, h (M, R), A, B) of x (M, K) and its dropped-out copy xd (or None),
        on ``base`` (default: the program's own); B of several paths holds their scales."""
        base = base or self.own
        h, a, b = self.project(x, xd)
        z, b = stacked_output(self, h, b, base)
        y = (z if z.dtype == x.dtype else z.to(x.dtype)).addmm_(x, base.wt)
        return y, h, a, b

    def infer(self, x: Tensor, base: Base | None = None) -> Tensor:
        """y (M, N) of x (M, K) without autograd (dropout drawn here in training)."""
        return self.forward(x, draw_dropout(x, self.p)[0], base)[0]

    def add_into(self, y: Tensor, x: Tensor, xd: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """y (M, N) += the paths of x (M, K) in place (xd: its dropped-out copy, or None); x in the
        compute dtype, y in any float dtype (the term is rounded to it once); returns (h, A, B) as
        ``forward``."""
        h, a, b = self.project(x, xd)
        alpha = self.scale
        if not self.single:
            b, alpha = b * self.scales, 1.0
        if y.dtype == self.dtype:
            y.addmm_(h, b.t(), alpha=alpha)
        else:
            y.add_(torch.mm(h, b.t()), alpha=alpha)
        return h, a, b

    def backward(self, dy: Tensor, x: Tensor, mask: Tensor | None, h: Tensor, a: Tensor, b: Tensor,
                 needs: Sequence[bool], weight: Tensor) -> tuple[Tensor | None, ...]:
        """(dx, then each path's dA, dB) from dy (M, N); ``needs`` = (x, then each tensor); ``weight``
        the call's W (N, K) (the forward saved it)."""
        dx_low, *grads = self.lowrank_backward(dy, x, mask, h, a, b, needs)
        dx = None
        if needs[0]:
            dx = (dx_low if dx_low.dtype == x.dtype else dx_low.to(x.dtype)).addmm_(dy, weight)
        return (dx, *grads)

    def lowrank_backward(self, dy: Tensor, x: Tensor, mask: Tensor | None, h: Tensor, a: Tensor, b: Tensor,
                         needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
        """(the paths' part of dx (M, K) in the low-rank dtype, masked, then each path's dA, dB) from
        dy (M, N); ``needs`` = (x, then each tensor)."""
        if self.operand is not None:
            dy = dy.to(self.operand)
        dyl = dy if dy.dtype == self.dtype else dy.to(self.dtype)
        if self.single:
            dh = torch.addmm(self.zero, dyl, b, beta=0, alpha=self.scale if mask is None else self.scale * self.keep)
        else:
            dh = torch.mm(dyl, b) if mask is None else torch.mm(dyl, b).mul_(self.keep)  # b holds the scales
        dx = None
        if needs[0]:
            dx = torch.mm(dh, a)
            if mask is not None:
                dx.mul_(mask)
        if not any(needs[1:]):
            return (dx, *([None] * (len(needs) - 1)))
        xm = x if mask is None else x * mask
        ga = torch.mm(dh.t(), xm if xm.dtype == self.dtype else xm.to(self.dtype))  # (R, K), keep applied
        gb = db_of(self, dyl, h)  # (N, R), scaled
        if ga.dtype != self.adapter_dtype:
            ga, gb = ga.to(self.adapter_dtype), gb.to(self.adapter_dtype)
        return (dx, *self.tensor_grads(ga, gb))

    def tensor_grads(self, ga: Tensor, gb: Tensor) -> list[Tensor]:
        """Each path's (dA, dB) from the stacked dA (R, K) and dB (N, R): split by rank, a slice's
        window gradient padded into its tensor's shape. A path's rows of a stacked dA are copied:
        autograd would keep them as its .grad, and with them the whole (R, K) buffer (dB's column
        blocks it copies itself, their layout not the parameter's)."""
        if self.single:
            parts = ((self.pads[0], ga, gb),)
        else:
            parts = zip(self.pads, ga.split_with_sizes(self.ranks), gb.split_with_sizes(self.ranks, 1))
        grads = []
        for pad, da, db in parts:
            if pad is None:
                grads += (da if self.single else da.clone(), db)
            else:
                grads += (torch.constant_pad_nd(da, pad[0]), torch.constant_pad_nd(db, pad[1]))
        return grads


class DenseCompose(torch.autograd.Function):
    """One planned compose call of plain / slice paths: ``apply(program, x (M, K), dropped, weight,
    bias, *tensors)`` -> y (M, N), ``tensors`` each path's (A, B) parameters (what gets gradients;
    the forward reads the program's detached windows of them); dropped: the (dropout(x), mask) pair
    of ``draw_dropout`` an input group shares, or None (drawn here); weight / bias: this call's cast
    of a base cast every call, or None (the program's own). Saves x, the bool dropout mask, h, the
    (stacked) factors and the weight dx reads (so that autograd refuses a backward after it changed
    in place, as it refuses it for the torch backend); backward is ``DenseProgram.backward``."""

    @staticmethod
    def forward(ctx, program, x, dropped, weight, bias, *tensors):
        xd, mask = dropped if dropped is not None else draw_dropout(x, program.p)
        y, h, a, b = program.forward(x, xd, None if weight is None else base_of(weight, bias, program.zero))
        ctx.save_for_backward(x, mask, h, a, b, program.own.weight if weight is None else weight)
        ctx.program = program
        return y

    @staticmethod
    @first_order("the compose backend")
    def backward(ctx, dy):
        x, mask, h, a, b, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, *grads = ctx.program.backward(dy, x, mask, h, a, b, (needs[1], *needs[5:]), weight)
        return (None, dx, None, None, None, *grads)


dense_apply = thin_apply(DenseCompose)


def stacked_output(program, h: Tensor, b: Tensor, base: Base) -> tuple[Tensor, Tensor]:
    """(z = bias + h (B * s)^T (M, N), B as backward reads it) of the stacked dense paths of a
    program (``DenseProgram``, ``path_program.PathProgram``), h (M, R) and B (N, R) in its low-rank
    dtype: one path's scale is the GEMM's alpha, several paths' scales are folded into B (so
    backward's dh is one GEMM)."""
    bias = base.bias_term if base.bias_term.dtype == program.dtype else base.bias_term.to(program.dtype)
    if program.single:
        return torch.addmm(bias, h, b.t(), beta=base.beta, alpha=program.scale), b
    b = b * program.scales
    return torch.addmm(bias, h, b.t(), beta=base.beta), b


# From this many rows (tokens) on, a CPU computes dB^T = h^T dy as an (R, N) GEMM and hands its
# transposed view on: MKL takes about twice as long for the (N, R)-shaped dy^T h (M = 2048, K = N =
# 1024, r = 16, one thread: 2.1 ms against 1.1 ms), while below it the view only costs autograd a
# copy of the tiny gradient.
TALL_ROWS = 512


def db_of(program, dy: Tensor, h: Tensor) -> Tensor:
    """dB = dy^T (h * s) (N, R) of dy (M, N), h (M, R) in the low-rank dtype: the scale one float
    (``program.single``) or each row's (``program.scales``)."""
    if program.tall is not None and dy.shape[0] >= program.tall:
        if program.single:
            return torch.addmm(program.zero, h.t(), dy, beta=0, alpha=program.scale).t()
        return torch.mm(h.t(), dy).mul_(program.scales_col).t()
    if program.single:
        return torch.addmm(program.zero, dy.t(), h, beta=0, alpha=program.scale)
    return torch.mm(dy.t(), h).mul_(program.scales)


class DenseLean(torch.autograd.Function):
    """``DenseCompose`` without dropout, x, W, b and the adapters in one dtype (``DenseProgram.lean``:
    the common LoRA layer, a Bi-Share SS module): the same GEMMs on the program's prebuilt views
    (one path: A, B and their transposes; several: stacked, B scaled), nothing checked or cast per
    call. Saves x, h and the factors (one path's windows share the parameters' version counters: an
    in-place change before backward is reported as autograd does)."""

    @staticmethod
    def forward(ctx, program, x, *tensors):
        own = program.own
        if program.single:
            a, b = program.a, program.b
            h = torch.mm(x, program.at)
            z = torch.addmm(own.bias_term, h, program.bt, beta=own.beta, alpha=program.scale)
        else:
            a, b = torch.cat(program.a_list), torch.cat(program.b_list, 1).mul_(program.scales)
            h = torch.mm(x, a.t())
            z = torch.addmm(own.bias_term, h, b.t(), beta=own.beta)
        ctx.save_for_backward(x, h, a, b, own.weight)  # the weight for autograd's in-place check too
        ctx.program = program
        return z.addmm_(x, own.wt)

    @staticmethod
    @first_order("the compose backend")
    def backward(ctx, dy):
        x, h, a, b, weight = ctx.saved_tensors
        program = ctx.program
        needs = ctx.needs_input_grad
        dh = torch.addmm(program.zero, dy, b, beta=0, alpha=program.scale) if program.single else torch.mm(dy, b)
        grads = [None, torch.mm(dh, a).addmm_(dy, weight) if needs[1] else None]
        if not any(needs[2:]):
            return (*grads, *([None] * (len(needs) - 2)))
        return (*grads, *program.tensor_grads(torch.mm(dh.t(), x), db_of(program, dy, h)))


_lean_apply = thin_apply(DenseLean)


def runner(program, apply: Callable, tensors: Sequence[Tensor], grad: bool) -> Callable[[Tensor], Tensor]:
    """run(x) (..., K) -> (..., N) of a planned program (``DenseProgram``, ``path_program.PathProgram``):
    ``apply(program, x2, *tensors)`` (its autograd Function) when autograd will want a gradient
    (``grad``), else ``program.infer`` (the forward alone: no autograd node, no saved tensors)."""
    k, n = program.k, program.n
    if grad:
        def run(x: Tensor) -> Tensor:
            if x.dim() == 2:
                return apply(program, x, *tensors)
            return apply(program, x.reshape(-1, k), *tensors).view(*x.shape[:-1], n)
        return run
    infer = program.infer

    def run_alone(x: Tensor) -> Tensor:
        if x.dim() == 2:
            return infer(x)
        return infer(x.reshape(-1, k)).view(*x.shape[:-1], n)
    return run_alone


def dense_runner(program: DenseProgram, tensors: Sequence[Tensor], grad: bool) -> Callable[[Tensor], Tensor]:
    """``runner`` of a ``DenseProgram`` through ``DenseLean`` or ``DenseCompose`` (its dropped,
    weight and bias arguments None: its own dropout draw, the program's own base)."""
    if program.lean:
        return runner(program, _lean_apply, tensors, grad)
    return runner(program, dense_apply, [None, None, None, *tensors], grad)


def cast_base_runner(program: DenseProgram, weight: Tensor, bias: Tensor | None, tensors: Sequence[Tensor],
                     grad: bool, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """run(x) (..., K) -> (..., N) under autocast of a base of another dtype (a float32 model under
    bf16 autocast): x, W and b cast to the autocast ``dtype`` each call, as autocast's linear casts
    them (no copy kept between calls), then ``DenseCompose`` (or the forward alone) of a
    ``per_call`` program, autocast off inside."""
    device, k, n = weight.device.type, program.k, program.n

    def run(x: Tensor) -> Tensor:
        with AutocastOff(device):
            x2 = x.reshape(-1, k).to(dtype)
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            if grad:
                y = dense_apply(program, x2, None, w, b, *tensors)
            else:
                y = program.infer(x2, base_of(w, b, program.zero))
        return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
    return run
