"""Per-op benchmark cases: each op builds, for one shape, the variants timed side by side.

A LoRA op is one entry of ``LORA_OPS``: a function giving the low-rank paths of one module. Every
LoRA op is then run as these variants on the same x, W, b and output gradient, on every device:

    base           F.linear(x, W, b): the frozen matmul alone, the 1.00x every ratio refers to
    peft           a real PEFT LoRA layer (get_peft_model on a one-Linear module) of the same total rank
    torch          reference.lora_linear: the torch backend
    compose        the compose backend (z = (x A^T s) B^T + b, then z.addmm_(x, W^T); hand-written backward)
    auto           ops.lora_linear(backend="auto"): the measured choice of fused and compose
    unsloth_order  the base GEMM first, then out.addmm_(x A^T, B^T, alpha=s) (autograd backward)
    fused          the fused Triton kernels (CUDA only; skipped with the reason elsewhere)

Another kind of op (grouped q/k/v, similarity) is one more entry of ``OPS``: a function from
(shape, device, dtype) to a ``Case``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops as fused_ops
from .. import reference
from ..base import adapter_dtype
from ..reference import LoRAPath

Forward = Callable[[], Tensor]


@dataclass
class Case:
    """What one (op, shape) runs: variant name -> forward (or a skip reason), and its inputs."""

    forwards: dict[str, Forward]
    skipped: dict[str, str]
    grad_out: Tensor | None  # None: forward-only op
    live: list[Tensor]  # inputs and parameters, not counted as saved activations
    params: dict[str, object] = field(default_factory=dict)


# ------------------------------------------------------------------------------ LoRA path sets
def _t(*shape: int, device, dtype) -> Tensor:
    """A small random trainable tensor (nonzero so no path is skipped by a zero shortcut)."""
    return (torch.randn(*shape, device=device, dtype=dtype) / math.sqrt(shape[-1])).requires_grad_()


def plain_paths(k: int, n: int, device, dtype, r: int = 16) -> list[LoRAPath]:
    return [LoRAPath("plain", (_t(r, k, device=device, dtype=dtype), _t(n, r, device=device, dtype=dtype)), 2.0)]


def slice_paths(k: int, n: int, device, dtype, r: int = 16) -> list[LoRAPath]:
    """A slice of a shared (r, 2K) / (2N, r) pair at centered offsets (Bi-Share SS)."""
    a, b = _t(r, 2 * k, device=device, dtype=dtype), _t(2 * n, r, device=device, dtype=dtype)
    return [LoRAPath("slice", (a, b), 2.0, k // 2, n // 2)]


def gate_paths(k: int, n: int, device, dtype, r: int = 8, g: int = 1) -> list[LoRAPath]:
    """A gate path around a shared (r, m) / (n_s, r) core, m = n_s = min(1024, K, N) (Bi-Share GT)."""
    m = min(1024, k, n)
    t = (_t(r, m, device=device, dtype=dtype), _t(m, r, device=device, dtype=dtype), _t(g, k, device=device, dtype=dtype),
         _t(m, g, device=device, dtype=dtype), _t(g, m, device=device, dtype=dtype), _t(n, g, device=device, dtype=dtype))
    return [LoRAPath("gate", t, 2.0)]


def kron_paths(k: int, n: int, device, dtype, r: int = 16, d: int = 256) -> list[LoRAPath]:
    """A Kronecker path on a shared (r, d) / (d, r) pair, d = 256 (or ``d``) or the largest power of 2
    dividing it, K and N."""
    d = math.gcd(d, k, n)
    t = (_t(r, d, device=device, dtype=dtype), _t(d, r, device=device, dtype=dtype),
         _t(1, k // d, device=device, dtype=dtype), _t(n // d, 1, device=device, dtype=dtype))
    return [LoRAPath("kron", t, 2.0)]


def bishare_slice_paths(k: int, n: int, device, dtype) -> list[LoRAPath]:
    """One Bi-Share SS module at the paper's ranks: local plain r=2, intra slice r=4, inter slice r=32."""
    return bishare_paths(k, n, device, dtype, "slice")


def bishare_paths(k: int, n: int, device, dtype, transform: str) -> list[LoRAPath]:
    """One Bi-Share module of a shape transform (slice, gate, kron) at the paper's ranks: local plain
    r=2, intra r=4, inter r=32 (gates of rank 1; Kronecker d = K / 4 at most)."""
    part = {"slice": slice_paths, "gate": gate_paths,
            "kron": lambda *a, r: kron_paths(*a, r=r, d=max(k // 4, 1))}[transform]
    return plain_paths(k, n, device, dtype, r=2) + part(k, n, device, dtype, r=4) + part(k, n, device, dtype, r=32)


# name -> (paths builder, rank of the equivalent plain LoRA: what PEFT runs)
LORA_OPS: dict[str, tuple[Callable[..., list[LoRAPath]], int]] = {
    "plain": (plain_paths, 16),
    "slice": (slice_paths, 16),
    "gate": (gate_paths, 1),
    "kron": (kron_paths, 16),
    "bishare_slice": (bishare_slice_paths, 38),
}


class _OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.lin = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def peft_layer(weight: Tensor, bias: Tensor | None, r: int, dropout: float = 0.0) -> nn.Module:
    """PEFT's LoRA layer itself (``peft.tuners.lora.Linear``: r, alpha 2r, ``dropout``) around a frozen
    Linear sharing ``weight`` and ``bias``, as a model calls it: without the ``PeftModel`` wrapper,
    whose per-forward work a model pays once, not per layer."""
    from peft import LoraConfig, get_peft_model

    n, k = weight.shape
    lin = nn.Linear(k, n, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    model = get_peft_model(_OneLinear(lin), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["lin"]))
    layer = model.base_model.model.lin
    for name, p in layer.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; any value times the same
            nn.init.normal_(p, std=0.02)
    return layer


def unsloth_order(x: Tensor, weight: Tensor, bias: Tensor | None, paths: list[LoRAPath], dropout_p: float = 0.0) -> Tensor:
    """The base GEMM first, then ``out.addmm_(dropout(x) A^T, B^T, alpha=s)`` in x's dtype (the order
    Unsloth's LoRA layers use), autograd's backward. Every path's factors stacked (Kronecker ones
    expanded: a baseline, not our path)."""
    k, n = weight.shape[1], weight.shape[0]
    factors = [reference.path_factors(p, k, n) for p in paths]
    alpha = paths[0].scale if len(paths) == 1 else 1.0
    a = torch.cat([f[0] for f in factors]).to(x.dtype)
    b = torch.cat([f[1] * (1.0 if len(paths) == 1 else p.scale) for f, p in zip(factors, paths)], 1).to(x.dtype)
    x2 = x.reshape(-1, k)
    out = F.linear(x2, weight, bias)
    return out.addmm_(F.dropout(x2, dropout_p) @ a.t(), b.t(), alpha=alpha).reshape(*x.shape[:-1], n)


RANKED_OPS = ("plain", "slice", "kron")  # ops whose ``r`` is the rank PEFT runs too


def lora_case(op: str, m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, *, r: int | None = None,
              dropout: float = 0.0) -> Case:
    """Every variant of one LoRA op on x (M, K), W (N, K); ``r`` (plain, slice, kron: default the
    op's) and adapter ``dropout`` (training mode) apply to every variant. PEFT is skipped, with the
    reason, where it is not installed."""
    build, peft_rank = LORA_OPS[op]
    if r is not None and op not in RANKED_OPS:
        raise ValueError(f"op {op!r} has a fixed rank; r applies to {RANKED_OPS}")
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)
    bias = torch.randn(n, device=device, dtype=dtype)
    grad_out = torch.randn(m, n, device=device, dtype=dtype)
    paths = build(k, n, device, adapter_dtype(dtype), **({"r": r} if r is not None else {}))
    peft_rank = r or peft_rank
    train = dropout > 0

    def ours(backend: str) -> Forward:
        return lambda: fused_ops.lora_linear(x, weight, bias, paths, dropout, train, backend=backend)

    forwards: dict[str, Forward] = {
        "base": lambda: F.linear(x, weight, bias),
        "torch": lambda: reference.lora_linear(x, weight, bias, paths, dropout, train),
        "compose": ours("compose"),
        "auto": ours("auto"),
        "unsloth_order": lambda: unsloth_order(x, weight, bias, paths, dropout),
    }
    skipped, live = {}, [x, weight, bias, grad_out, *(t for p in paths for t in p.tensors)]
    try:
        peft = peft_layer(weight, bias, peft_rank, dropout).to(device).train(train)
    except ImportError as e:
        skipped["peft"] = f"peft is not installed ({e})"
    else:
        forwards["peft"] = lambda: peft(x)
        live += list(peft.parameters())
    reason = _fused_skip_reason(x)
    if reason:
        skipped["fused"] = reason
    else:
        forwards["fused"] = ours("triton")
    return Case(forwards, skipped, grad_out, live, {"paths": [p.kind for p in paths], "peft_rank": peft_rank,
                                                   "rank": sum(p.rank for p in paths), "dropout": dropout,
                                                   "x_requires_grad": True, "adapter_dtype": str(adapter_dtype(dtype))})


# ------------------------------------------------------------------------------ grouped q/k/v
GROUP = 3  # q, k, v: three modules of output width N on one input


def grouped_qkv_case(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> Case:
    """q, k, v (each W (N, K)) on one x (M, K), Bi-Share SS paths; every variant returns cat(q, k, v).

    Each module has its own plain r=2 path plus slices of an intra (r=4) and an inter (r=32) pair
    that all three share, at different offsets. base: three F.linear; peft: three PEFT LoRA layers of
    rank 38; torch: reference.lora_linear per module; compose: the compose backend's group (one
    dropout draw); auto: ops.grouped_lora_linear under auto (module by module); unsloth_order per
    module; fused: the grouped kernel (one launch). The concatenation (one (M, 3N) copy) is the same
    for every variant.
    """
    ad = adapter_dtype(dtype)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    weights = [torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k) for _ in range(GROUP)]
    grad_out = torch.randn(m, GROUP * n, device=device, dtype=dtype)
    intra, inter = (slice_paths(k, n, device, ad, r=r)[0].tensors for r in (4, 32))
    paths = [[*plain_paths(k, n, device, ad, r=2),
              LoRAPath("slice", intra, 2.0, i * k // 2, i * n // 2),
              LoRAPath("slice", inter, 2.0, (2 - i) * k // 2, (2 - i) * n // 2)] for i in range(GROUP)]
    pefts = [peft_layer(w, None, 38).to(device) for w in weights]
    forwards: dict[str, Forward] = {
        "base": lambda: torch.cat([F.linear(x, w) for w in weights], -1),
        "peft": lambda: torch.cat([layer(x) for layer in pefts], -1),
        "torch": lambda: torch.cat([reference.lora_linear(x, w, None, ps) for w, ps in zip(weights, paths)], -1),
    }
    def grouped(backend: str) -> Forward:
        return lambda: torch.cat(fused_ops.grouped_lora_linear(x, weights, [None] * GROUP, paths, backend=backend), -1)

    forwards["compose"], forwards["auto"] = grouped("compose"), grouped("auto")
    forwards["unsloth_order"] = lambda: torch.cat([unsloth_order(x, w, None, ps) for w, ps in zip(weights, paths)], -1)
    skipped = {}
    reason = _fused_skip_reason(x)
    if reason:
        skipped["fused"] = reason
    else:
        forwards["fused"] = grouped("triton")
    tensors = {id(t): t for ps in paths for p in ps for t in p.tensors}
    live = [x, *weights, grad_out, *tensors.values(), *(p for layer in pefts for p in layer.parameters())]
    return Case(forwards, skipped, grad_out, live, {"modules": GROUP, "paths": [p.kind for p in paths[0]],
                                                   "peft_rank": 38, "adapter_dtype": str(ad)})


def _fused_skip_reason(x: Tensor) -> str | None:
    """Why the fused Triton kernels are not timed on x, or None when they are: CUDA tensors, or CPU
    ones under the interpreter when ``dispatch.TIME_INTERPRETED_KERNELS`` asks for it (gpu-check --tiny)."""
    if not fused_ops.HAS_TRITON:
        return "triton cannot be imported"
    interpreted = fused_ops.INTERPRET and fused_ops.dispatch.TIME_INTERPRETED_KERNELS
    return None if x.device.type == "cuda" or interpreted else "fused Triton kernels run on CUDA only"


# ------------------------------------------------------------------------------- similarity
def similarity_case(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> Case:
    """angular_distance on (L=n, samples=m, d=k) representations vs the plain torch formula."""
    reps = torch.randn(n, m, k, device=device, dtype=dtype)
    forwards: dict[str, Forward] = {"base": lambda: naive_angular_distance(reps)}
    skipped = {}
    try:
        from ..similarity import angular_distance
    except ImportError as e:
        skipped["torch"] = f"sharelora_kernels.similarity is not importable ({e})"
    else:
        forwards["torch"] = lambda: angular_distance(reps)
    return Case(forwards, skipped, None, [reps], {"layers": n, "samples": m, "dim": k})


def naive_angular_distance(reps: Tensor) -> Tensor:
    """D(i, j) = mean_n arccos(cos(x_i, x_j)) / pi in float32: the plain torch formula (the README's "The methods")."""
    u = F.normalize(reps.float(), dim=-1).transpose(0, 1)  # (n, L, d)
    cos = torch.bmm(u, u.transpose(1, 2)).clamp_(-1, 1)
    return (torch.arccos(cos) / math.pi).mean(0)


# name -> case builder (M, K, N, device, dtype). Shapes for similarity read M=samples, K=dim, N=layers.
OPS: dict[str, Callable[..., Case]] = {name: (lambda m, k, n, device, dtype, _op=name: lora_case(_op, m, k, n, device, dtype))
                                       for name in LORA_OPS}
OPS["grouped_qkv"] = grouped_qkv_case
OPS["similarity"] = similarity_case

# Shapes (M, K, N) per profile. GPU: LLaMA-7B's q/k/v/o (4096x4096), up (11008x4096), down (4096x11008).
SHAPES = {
    "quick": {"lora": [(256, 256, 256)], "similarity": [(16, 256, 8)]},
    "cpu": {"lora": [(2048, 1024, 1024), (512, 2048, 4096)], "similarity": [(256, 2048, 32)]},
    "cuda": {"lora": [(4096, 4096, 4096), (4096, 4096, 11008), (4096, 11008, 4096)],
             "similarity": [(256, 4096, 32)]},
}


def shapes_for(op: str, profile: str) -> list[tuple[int, int, int]]:
    """Shapes of ``op`` in ``profile``; grouped q/k/v runs the first (square, K = N) LoRA shape."""
    if op == "similarity":
        return SHAPES[profile]["similarity"]
    return SHAPES[profile]["lora"][:1] if op == "grouped_qkv" else SHAPES[profile]["lora"]
