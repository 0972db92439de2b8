"""gpu-check phase (b2): the configs phase (c) times, verified at the shapes it times them.

Each autotuned GEMM kernel (TMA, pointer, grouped) runs each config (c) may pick (the first ``cap``
of its ``perf`` space), forced one at a time, forward and backward at (c)'s M (more tiles than SMs:
every persistent program runs several), with every floating-point allocation NaN-poisoned so an
unwritten tile shows. Compared: y, dx and every adapter gradient against ``compose`` on the same
inputs (max |diff| / max |compose|, the dtype's tolerance of ``correctness``), and y and dx on a
sample of rows against float64. Cases, most important first so a stopped phase keeps what matters:
plain r = 16 (every config of the TMA and pointer kernels); dropout 0.1, Kronecker and gate (the
first config such a launch tries); grouped groups of 3 and 5 modules (every config). With
dropout the two backends draw different masks, so its low-rank term is scaled to 1e-4 of the
output: every tile written and the GEMM right is what it shows. The pointer kernel is forced by
refusing TMA; TMA cases are "not applicable" on a GPU without TMA (compute capability < 9).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from .. import ops, reference
from ..reference import LoRAPath
from .correctness import GRAD_TOL, OUT_TOL, Check, _leaves, random_path, rel_err


class Shapes(NamedTuple):
    m: int
    k: int
    n: int
    r: int
    sample_rows: int


GPU = Shapes(8192, 4096, 4096, 16, 64)
TINY = Shapes(70, 48, 40, 5, 9)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """``torch.empty`` / ``empty_like`` / ``empty_strided`` return NaN-filled floating tensors inside."""
    real = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poisoned(fn):
        def alloc(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t
        return alloc

    for name, fn in real.items():
        setattr(torch, name, poisoned(fn))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(torch, name, fn)


@contextlib.contextmanager
def forced(kernel, config, use_tma: bool) -> Iterator[None]:
    """``kernel`` restricted to ``config`` (SHARELORA_AUTOTUNE=perf), TMA allowed or refused."""
    from ..ops import tma_linear

    usable, mode = tma_linear.usable, os.environ.get("SHARELORA_AUTOTUNE")
    if not use_tma:
        tma_linear.usable = lambda a, w_kn: False
    os.environ["SHARELORA_AUTOTUNE"] = "perf"
    try:
        with kernel.restricted(lambda configs: [config]):
            yield
    finally:
        tma_linear.usable = usable
        if mode is None:
            os.environ.pop("SHARELORA_AUTOTUNE")
        else:
            os.environ["SHARELORA_AUTOTUNE"] = mode


def _paths(kind: str, shapes: Shapes, n: int, device) -> list[LoRAPath]:
    if kind == "gate":
        return [random_path("gate", shapes.k, n, shapes.r, torch.float32, device)]
    if kind == "kron":
        return [random_path("kron", shapes.k, n, shapes.r, torch.float32, device)]
    return [random_path("plain", shapes.k, n, shapes.r, torch.float32, device)]


def _run(backend: str, x, weights, biases, paths, dys, p: float) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    if len(weights) > 1:
        ys = list(ops.grouped_lora_linear(x, weights, biases, paths, p, p > 0, backend=backend))
    else:
        ys = [ops.lora_linear(x, weights[0], biases[0], paths[0], p, p > 0, backend=backend)]
    return [y.detach() for y in ys], torch.autograd.grad(ys, _leaves(x, paths), dys)


def case_check(shapes: Shapes, device, ns: tuple[int, ...], kind: str = "plain", p: float = 0.0,
               dtype=torch.bfloat16) -> dict:
    """One case at (c)'s shapes on the kernels (as forced by the caller) vs compose and float64."""
    torch.manual_seed(11)
    m, k = shapes.m, shapes.k
    x = torch.randn(m, k, device=device).to(dtype).requires_grad_()
    weights = [(torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype) for n in ns]
    biases = [torch.randn(n, device=device).to(dtype) for n in ns]
    paths = [_paths(kind, shapes, n, device) for n in ns]
    if p > 0:  # different masks: the low-rank term made negligible
        paths = [[q._replace(scale=q.scale * 1e-4) for q in ps] for ps in paths]
    dys = [torch.randn(m, n, device=device).to(dtype) for n in ns]
    with poisoned_allocations():
        ys, grads = _run("triton", x, weights, biases, paths, dys, p)
    torch.manual_seed(12)
    ys_c, grads_c = _run("compose", x, weights, biases, paths, dys, p)
    scale = max((g.abs().max().item() for g in grads_c[1:] if g.numel()), default=0.0)
    vs_compose = {"y": max(rel_err(y, r.double()) for y, r in zip(ys, ys_c)), "dx": rel_err(grads[0], grads_c[0].double())}
    if p == 0:  # with dropout the adapter gradients follow each backend's own mask
        vs_compose["adapters"] = max((rel_err(g, r.double(), 0.1 * scale) for g, r in zip(grads[1:], grads_c[1:])),
                                     default=0.0)
    vs_float64 = _sampled_float64(shapes, x, weights, biases, paths, dys, ys, grads[0]) if p == 0 else {}
    unwritten = sum(int((~torch.isfinite(t)).sum()) for t in (*ys, *grads))
    worst = max([*vs_compose.values(), *vs_float64.values()])
    passed = (unwritten == 0 and vs_compose["y"] < OUT_TOL[dtype] and vs_compose["dx"] < GRAD_TOL[dtype]
              and vs_compose.get("adapters", 0.0) < GRAD_TOL[dtype]
              and all(v < GRAD_TOL[dtype] for v in vs_float64.values()))
    return {"passed": bool(passed), "max_rel_err": worst, "vs_compose": vs_compose, "vs_float64_sampled": vs_float64,
            "non_finite_elements": unwritten, "tol": {"output": OUT_TOL[dtype], "grad": GRAD_TOL[dtype]},
            "shape": {"M": m, "K": k, "N": list(ns), "r": shapes.r}}


def _sampled_float64(shapes: Shapes, x, weights, biases, paths, dys, ys, dx) -> dict:
    """y and dx on ``sample_rows`` random rows against float64 (each row depends on its own x / dy row)."""
    rows = torch.randperm(shapes.m, device=x.device)[:shapes.sample_rows]
    x64 = x.detach()[rows].double().requires_grad_()
    outs = [reference.lora_linear(x64, w.double(), b.double(),
                                  [q._replace(tensors=tuple(t.detach().double() for t in q.tensors)) for q in ps])
            for w, b, ps in zip(weights, biases, paths)]
    (dx64,) = torch.autograd.grad(outs, [x64], [dy[rows].double() for dy in dys])
    return {"y": max(rel_err(y[rows], o.detach()) for y, o in zip(ys, outs)), "dx": rel_err(dx[rows], dx64)}


def _has_tma(device) -> bool:
    from ..ops.utils import INTERPRET
    return INTERPRET or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def checks(shapes: Shapes, device, cap: int) -> list[Check]:
    """Every check of the phase, most important first (see the module docstring)."""
    from ..ops.autotune import kronecker_fits
    from ..ops.fused_lora_linear import pointer_kernel
    from ..ops.grouped_lora_linear import grouped_kernel
    from ..ops.tma_linear import tma_kernel

    n, r = shapes.n, shapes.r
    out = []

    def add(name, kernel, config, use_tma, **case):
        label = f"{name}, config {config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']} " \
                f"w{config.num_warps} s{config.num_stages}"
        if use_tma and not _has_tma(device):
            run = lambda: {"passed": True, "not_applicable": "this GPU has no TMA (compute capability < 9)"}  # noqa: E731
        else:
            def run(kernel=kernel, config=config, use_tma=use_tma, case=case):
                with forced(kernel, config, use_tma):
                    return case_check(shapes, device, **case)
        out.append(Check(label, "triton", run))

    tma_configs, pointer_configs = tma_kernel.spaces["perf"][:cap], pointer_kernel.spaces["perf"][:cap]
    for c in tma_configs:
        add(f"TMA plain r={r} fwd+bwd", tma_kernel, c, True, ns=(n,))
    for c in pointer_configs:
        add(f"pointer plain r={r} fwd+bwd", pointer_kernel, c, False, ns=(n,))
    for name, case in (("dropout 0.1", dict(p=0.1)), ("Kronecker", dict(kind="kron")), ("gate", dict(kind="gate"))):
        periodic = case.get("kind") == "kron"  # Kronecker launches try only the tiles kronecker_fits keeps
        first = lambda configs: kronecker_fits(configs, {}, PERIODIC=periodic)[0]  # noqa: E731
        add(f"TMA {name} fwd+bwd", tma_kernel, first(tma_configs), True, ns=(n,), **case)
        add(f"pointer {name} fwd+bwd", pointer_kernel, first(pointer_configs), False, ns=(n,), **case)
    for c in grouped_kernel.spaces["perf"][:cap]:
        add("grouped 3 modules (N, N/4, N/4)", grouped_kernel, c, False, ns=(n, n // 4, n // 4))
        add("grouped 5 modules (N/2 each)", grouped_kernel, c, False, ns=(n // 2,) * 5)
    return out
