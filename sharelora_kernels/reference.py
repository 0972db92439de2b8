"""Exact torch math of every path kind (the README's "The methods"): the single source of truth.

Every fused kernel is tested against these functions run in float64, and CPU tensors run them
directly. Plain and slice paths are dense windows of their A/B: ``lora_linear`` stacks them into
one LoRA fused with the base matmul (``_LinearPlusLoRA``, a hand-written backward). Gate and
Kronecker paths are split the way the kernels split them (autograd gives the backward):

    h = path_input(x, path)              (M, r_p)   the skinny projection of the (dropped-out) input
    y += scale * add_path_output(h, path)           added into the base output (M, N) in place

Nothing Kronecker- or gate-expanded is built here: a Kronecker path folds ``x`` by ``K_A`` and tiles
its output by ``K_B``; a gate path collapses to a rank-g pair through the (g, g) core
``C = G_od B A G_iu``. ``path_factors`` gives the effective (r, K) / (N, r) factors: windows (no
copy) for plain and slice paths; built for gate and Kronecker paths, for merge and export only.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class LoRAPath(NamedTuple):
    """One low-rank path with its tensors in the role order of ``config.PATH_ROLES[kind]``.

    plain (A (r,K), B (N,r)); slice (A (r,K_max), B (N_max,r)) read at k_offset / n_offset;
    gate (A (r,m), B (n,r), G_id (g,K), G_iu (m,g), G_od (g,n), G_ou (N,g));
    kron (A (r,d), B (d,r), K_A (1,K/d), K_B (N/d,1)).
    """

    kind: str
    tensors: tuple[Tensor, ...]
    scale: float
    k_offset: int = 0
    n_offset: int = 0

    @property
    def rank(self) -> int:
        """The rank this path adds to a module's low-rank product (g for a gate path)."""
        return self.tensors[2].shape[0] if self.kind == "gate" else self.tensors[0].shape[0]


def gate_core(path: LoRAPath) -> Tensor:
    """The (g, g) core C = G_od B A G_iu of a gate path, multiplied in the cheap order."""
    a, b, _, g_iu, g_od, _ = path.tensors
    return (g_od @ b) @ (a @ g_iu)


def kron_fold(x: Tensor, k_a: Tensor, d: int) -> Tensor:
    """fold(x)[:, c] = sum_j K_A[j] x[:, j*d + c]: (M, K) -> (M, d), K_A any shape of K/d elements.

    One batched GEMM, (1, K/d) @ (K/d, d) per row, K_A broadcast (no copy): no (M, K) temporary,
    and autograd keeps a view of x (``torch.matmul`` here would fold x into a transposed copy).
    """
    m, j = x.shape[0], x.shape[1] // d
    return torch.bmm(k_a.reshape(1, 1, j).expand(m, 1, j), x.reshape(m, j, d)).view(m, d)


def path_input(x: Tensor, path: LoRAPath) -> Tensor:
    """h = x A_eff^T of a gate or Kronecker path, (M, K) -> (M, r_p), without building A_eff."""
    kind, t = path.kind, path.tensors
    if kind == "gate":
        return (x @ t[2].t()) @ gate_core(path).t()
    if kind == "kron":
        return kron_fold(x, t[2], t[0].shape[1]) @ t[0].t()
    raise ValueError(f"unknown path kind {kind!r} for path_input (gate, kron; plain/slice go through _dense_factors)")


def add_path_output(y: Tensor, h: Tensor, path: LoRAPath) -> Tensor:
    """y += scale * h B_eff^T of a gate or Kronecker path in place, (M, r_p) -> (M, N), without building B_eff."""
    kind, t, s = path.kind, path.tensors, path.scale
    if kind == "gate":
        return _add_lowrank(y, h, t[5], s)
    if kind == "kron":
        b, k_b = t[1], t[3]
        scaled = _scale_first(y, s)
        hb = (_scaled_product(h, b, s) if scaled else h @ b.t()).to(y.dtype)  # (M, d)
        y.view(y.shape[0], y.shape[1] // b.shape[0], b.shape[0]).addcmul_(k_b.to(y.dtype).unsqueeze(0), hb.unsqueeze(1),
                                                                          value=1.0 if scaled else s)
        return y
    raise ValueError(f"unknown path kind {kind!r} for add_path_output (gate, kron; plain/slice: _dense_factors)")


def _add_lowrank(y: Tensor, h: Tensor, b: Tensor, s: float) -> Tensor:
    """y += s * h b^T in place; h, b in the adapter dtype, y in the base's."""
    if _scale_first(y, s):
        return y.add_(_scaled_product(h, b, s).to(y.dtype))
    if h.dtype == y.dtype:
        return y.addmm_(h, b.t().to(y.dtype), alpha=s)
    return y.add_((h @ b.t()).to(y.dtype), alpha=s)


def _scale_first(y: Tensor, s: float) -> bool:
    """Whether s h b^T must be formed before it meets y: a float16 y (h b^T may overflow where s h b^T
    does not), or s = 0 (a product keeps a NaN, as PEFT's ``lora_B(lora_A(x)) * scaling`` does,
    where an ``alpha=0`` would skip it)."""
    return y.dtype == torch.float16 or s == 0


def _scaled_product(h: Tensor, b: Tensor, s: float) -> Tensor:
    """s * h b^T (M, rows of b) in float32 or better, scaled before any rounding to y's dtype."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    return torch.mm(h.to(dtype), b.t().to(dtype)).mul_(s)


def _dense_factors(paths: Sequence[LoRAPath], k: int, n: int) -> tuple[Tensor, Tensor]:
    """Plain, slice (and gate) paths stacked into one LoRA: A (sum r_p, K), B (N, sum r_p) with s_p folded in.

    Their A/B windows are already dense (no expansion), so one pass over x and one update of y
    serve them all. A gate path enters as its rank-g pair (C G_id (g, K), G_ou); Kronecker paths
    never go through here.
    """
    factors = [path_factors(p, k, n) for p in paths]
    if len(factors) == 1:
        return factors[0][0], factors[0][1] * paths[0].scale
    return torch.cat([a for a, _ in factors]), torch.cat([b * p.scale for (_, b), p in zip(factors, paths)], 1)


class _LinearPlusLoRA(torch.autograd.Function):
    """y = x W^T + bias + (xd A^T) B^T, x (M, K), xd (M, K) the adapter input (None: x), A (R, K), B (N, R).

    The same math as autograd over F.linear + two matmuls, with a leaner backward: when the adapter
    input is x itself, dx = dy W + dh A is one GEMM plus an in-place addmm (no second (M, K) tensor
    and sum). (x is not passed twice: dynamo refuses a tensor given to two inputs.) The backward is
    made of differentiable ops on the inputs, so second derivatives (``create_graph=True``) are exact:
    there it recomputes h from xd and A, as the saved h is outside the graph.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, a, b):
        ctx.same_input = xd is None
        xd = x if xd is None else xd
        y = F.linear(x, weight, bias)
        h = xd @ a.t()
        _add_lowrank(y, h, b, 1.0)
        ctx.save_for_backward(x, xd, weight, a, b, h)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xd, weight, a, b, h = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: h as a function of xd and A
            h = xd @ a.t()
        need = ctx.needs_input_grad
        dh = dy.to(b.dtype) @ b
        dx = dxd = None
        if need[0]:
            dx = dy @ weight.to(dy.dtype)
            if ctx.same_input:  # under autocast dy (bf16) and the adapters (fp32) differ
                dx.addmm_(dh.to(dx.dtype), a.to(dx.dtype))
        if need[1] and not ctx.same_input:
            dxd = dh @ a
        d_weight = dy.t() @ x if need[2] else None
        d_bias = dy.sum(0) if need[3] else None
        d_a = dh.t() @ xd if need[4] else None
        d_b = (h.t() @ dy.to(h.dtype)).t() if need[5] else None  # (r, M) @ (M, N): BLAS's faster layout
        return dx, dxd, d_weight, d_bias, d_a, d_b


def adapter_compute_dtype(paths: Sequence[LoRAPath]) -> torch.dtype:
    """The one dtype the low-rank paths run in: the promotion of every adapter tensor's dtype, with
    float16 raised to float32 (h = x A^T may exceed float16's range where the output does not)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for p in paths for t in p.tensors))
    return torch.float32 if dtype == torch.float16 else dtype


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath],
                dropout_p: float = 0.0, training: bool = False, x_dropped: Tensor | None = None) -> Tensor:
    """y = x W^T + b + sum_p s_p B_p A_p dropout(x).

    x: (..., K) any float dtype; weight: (N, K); bias: (N,) or None; returns (..., N) in the base's
    result dtype. The low-rank paths run in ``adapter_compute_dtype(paths)`` (x is cast to it;
    adapters of mixed dtypes are promoted; float16 runs in float32, as the kernels keep h in
    float32), one dropout mask on x is shared by every path, as PEFT applies dropout to the adapter input only. The plain and
    slice paths run as one stacked LoRA fused with the base matmul (``_LinearPlusLoRA``).
    x_dropped: an already dropped-out x (x's shape) to use as the adapter input instead of drawing a
    mask here (modules that share x share one mask).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not paths:
        return F.linear(x2, weight, bias).reshape(*lead, weight.shape[0])
    if x_dropped is not None:
        xd = x_dropped.reshape(x2.shape)
    else:
        xd = F.dropout(x2, dropout_p, training=True) if (training and dropout_p > 0) else x2
    dtype = adapter_compute_dtype(paths)
    if any(t.dtype != dtype for p in paths for t in p.tensors):
        paths = [p._replace(tensors=tuple(t.to(dtype) for t in p.tensors)) for p in paths]
    xd = xd.to(dtype)
    dense = [p for p in paths if p.kind in ("plain", "slice")]
    if dense:
        a, b = _dense_factors(dense, x2.shape[1], weight.shape[0])
        y = _LinearPlusLoRA.apply(x2, None if xd is x2 else xd, weight, bias, a, b)
    else:
        y = F.linear(x2, weight, bias)
    for p in paths:
        if p.kind not in ("plain", "slice"):
            y = add_path_output(y, path_input(xd, p), p)
    return y.reshape(*lead, weight.shape[0])


def path_factors(path: LoRAPath, in_features: int, out_features: int) -> tuple[Tensor, Tensor]:
    """Effective (A (r_p, K), B (N, r_p)) of one path, unscaled. Materialises: merge/export only."""
    kind, t = path.kind, path.tensors
    if kind == "plain":
        return t[0], t[1]
    if kind == "slice":
        return (t[0][:, path.k_offset:path.k_offset + in_features],
                t[1][path.n_offset:path.n_offset + out_features])
    if kind == "gate":
        return gate_core(path) @ t[2], t[5]
    if kind == "kron":
        return torch.kron(t[2], t[0]), torch.kron(t[3], t[1])
    raise ValueError(f"unknown path kind {kind!r}")


def delta_weight(paths: Sequence[LoRAPath], in_features: int, out_features: int) -> Tensor:
    """sum_p s_p B_p A_p as an (N, K) matrix. Merge only."""
    total = None
    for p in paths:
        a, b = path_factors(p, in_features, out_features)
        d = p.scale * (b @ a)
        total = d if total is None else total + d
    return total
