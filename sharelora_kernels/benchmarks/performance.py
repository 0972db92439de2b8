"""gpu-check phase (c): fwd and fwd+bwd of every variant of each case, interleaved in one run.

Times are device times (``timing.device_time_mode``: calls back to back between CUDA events, one
sync), with the host's issue time per call (µs) beside them; ratios use device time.

LoRA cases (``ops.lora_case``) time ``base`` (the frozen GEMM: cuBLAS on a GPU), ``triton_gemm``
(the fused kernel's launcher with no low-rank path: the Triton base GEMM alone, its dx launch as
backward), ``fused``, ``compose``, ``auto``, ``unsloth_order`` and ``peft`` (a real PEFT layer, its
default fp32 adapters). The layer case is one LLaMA-7B layer's q/k/v and gate/up groups with
Bi-Share slice paths: ``grouped`` (the grouped kernel) against ``per_module`` (the fused kernel
per module), ``compose``, ``auto`` and ``peft``. Cases are listed most important first, so a run
stopped by its budget keeps the numbers that matter most.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..reference import LoRAPath
from .ops import Case, lora_case, peft_layer, plain_paths, slice_paths
from .timing import device_time_mode

LORA_VARIANTS = ("base", "triton_gemm", "fused", "compose", "auto", "unsloth_order", "peft")
MODES = ("fwd", "fwd+bwd")


class Shapes(NamedTuple):
    """The sizes of one profile: tokens, the (K, N) pairs, ranks, the layer's dims, repeats."""

    m: int
    kn: tuple[tuple[int, int], ...]
    ranks: tuple[int, int]
    layer: tuple[int, tuple[int, ...], tuple[int, ...]]  # K, q/k/v widths, gate/up widths
    warmup: int
    repeats: int
    calls: int  # back to back per timed round (device time, one sync)


# M = 8192 x K = 4096 bf16 is 64 MiB, over an H100's / H200's 50 / 60 MiB L2: inputs need no rotation
GPU = Shapes(8192, ((4096, 4096), (4096, 14336), (14336, 4096)), (16, 64), (4096, (4096,) * 3, (11008,) * 2), 2, 7, 3)
TINY = Shapes(16, ((32, 32), (16, 48)), (4, 8), (16, (16, 8, 8), (24, 24)), 1, 1, 1)


def case_list(shapes: Shapes, tiny: bool = False) -> list[dict]:
    """Every case of the phase, most important first: plain at the square shape (both ranks), the
    other shapes, dropout 0.1, Kronecker, gate, then the grouped layer. ``tiny`` (the interpreter's
    smoke run) keeps one plain case per shape: the others run the same code."""
    (k0, n0), (r_lo, r_hi) = shapes.kn[0], shapes.ranks
    if tiny:
        cases = [dict(op="plain", k=k, n=n, r=r) for (k, n), r in zip(shapes.kn, (r_lo, r_hi))]
    else:
        cases = [dict(op="plain", k=k0, n=n0, r=r) for r in (r_lo, r_hi)]
        cases += [dict(op="plain", k=k, n=n, r=r) for k, n in shapes.kn[1:] for r in (r_lo, r_hi)]
    cases += [dict(op="plain", k=k0, n=n0, r=r_lo, dropout=0.1), dict(op="kron", k=k0, n=n0, r=r_lo),
              dict(op="gate", k=k0, n=n0), dict(op="layer")]
    return cases


def case_name(spec: dict) -> str:
    if spec["op"] == "layer":
        return "layer q/k/v + gate/up"
    extra = f" r={spec['r']}" if "r" in spec else ""
    return f"{spec['op']}{extra} {spec['k']}x{spec['n']}" + (f" dropout {spec['dropout']}" if spec.get("dropout") else "")


# ------------------------------------------------------------------------------ triton_gemm
def _launcher():
    """The fused kernel's launcher (``fused_linear``), or the reason it cannot be used here."""
    try:
        from ..ops.fused_lora_linear import fused_linear
        from ..ops.utils import TL_DTYPES
    except ImportError as e:
        return None, f"the fused kernel's launcher is not importable ({e})"
    return (fused_linear, TL_DTYPES), None


def triton_gemm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + b by the fused kernel with no low-rank path (rank 0); backward: its dx launch."""
    return _TritonGemm.apply(x, weight, bias)


class _TritonGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _gemm(x, weight.t(), bias)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return _gemm(dy, weight, None, scaled=False), None, None


def _gemm(a: Tensor, w_kn: Tensor, bias: Tensor | None, scaled: bool = True) -> Tensor:
    """One launch with rank 0, specialised as the fused forward (``scaled``) or dx launch is."""
    launcher, reason = _launcher()
    if launcher is None:
        raise RuntimeError(reason)
    launch, tl_dtypes = launcher
    m, device = a.shape[0], a.device
    empty = torch.empty((m, 0), device=device, dtype=torch.float32)
    table = torch.empty((0, 5), device=device, dtype=torch.int64)
    scale = torch.empty(0, device=device) if scaled else None
    return launch(a, w_kn, bias, empty, table, tl_dtypes[a.dtype], False, scale, 0.0,
                  torch.zeros(1, dtype=torch.int64, device=device))


# ------------------------------------------------------------------------------ cases
def lora_variants(spec: dict, shapes: Shapes, device: torch.device, dtype: torch.dtype) -> Case:
    """``ops.lora_case`` restricted to ``LORA_VARIANTS``, plus ``triton_gemm``."""
    kw = {key: spec[key] for key in ("r", "dropout") if key in spec}
    case = lora_case(spec["op"], shapes.m, spec["k"], spec["n"], device, dtype, **kw)
    x, weight, bias = case.live[:3]
    available = dict(case.forwards)
    if "fused" in available:
        available["triton_gemm"] = lambda: triton_gemm(x, weight, bias)
    else:
        case.skipped["triton_gemm"] = case.skipped["fused"]
    case.forwards = {name: available[name] for name in LORA_VARIANTS if name in available}
    return case


def layer_variants(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> Case:
    """One layer's q/k/v and gate/up groups on x (M, K), Bi-Share slice paths (local r=2 per module,
    intra r=4 per group, inter r=32 over both); every variant returns the outputs concatenated."""
    k, qkv, gate_up = shapes.layer
    ad = torch.float32 if dtype != torch.float32 else dtype
    x = torch.randn(shapes.m, k, device=device, dtype=dtype, requires_grad=True)
    n_max = max(*qkv, *gate_up)
    inter = slice_paths(k, n_max // 2, device, ad, r=32)[0].tensors  # (32, 2K) / (n_max, 32)
    groups = []
    for ns in (qkv, gate_up):
        intra = slice_paths(k, max(ns) // 2, device, ad, r=4)[0].tensors
        weights = [torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k) for n in ns]
        paths = [[*plain_paths(k, n, device, ad, r=2), LoRAPath("slice", intra, 2.0, k // 2, (max(ns) - n) // 2),
                  LoRAPath("slice", inter, 2.0, 0, (n_max - n) // 2)] for n in ns]
        groups.append((weights, paths))
    grad_out = torch.randn(shapes.m, sum(sum(w.shape[0] for w in ws) for ws, _ in groups), device=device, dtype=dtype)

    def grouped(backend):
        return lambda: torch.cat([y for ws, ps in groups for y in ops.grouped_lora_linear(x, ws, [None] * len(ws), ps,
                                                                                          backend=backend)], -1)

    def per_module(backend):
        return lambda: torch.cat([ops.lora_linear(x, w, None, p, backend=backend) for ws, ps in groups
                                  for w, p in zip(ws, ps)], -1)

    forwards = {"base": lambda: torch.cat([F.linear(x, w) for ws, _ in groups for w in ws], -1),
                "grouped": grouped("triton"), "per_module": per_module("triton"), "compose": grouped("compose"),
                "auto": grouped("auto")}
    skipped = {}
    if device.type != "cuda" and not ops.INTERPRET:
        skipped = {name: "fused Triton kernels run on CUDA only" for name in ("grouped", "per_module")}
        forwards = {k: v for k, v in forwards.items() if k not in skipped}
    try:
        rank = sum(p.rank for p in groups[0][1][0])
        pefts = [peft_layer(w, None, rank).to(device) for ws, _ in groups for w in ws]
    except ImportError as e:
        skipped["peft"] = f"peft is not installed ({e})"
    else:
        forwards["peft"] = lambda: torch.cat([layer(x) for layer in pefts], -1)
    tensors = {id(t): t for _, ps in groups for p_list in ps for p in p_list for t in p.tensors}
    return Case(forwards, skipped, grad_out, [x, *tensors.values()],
                {"K": k, "qkv": list(qkv), "gate_up": list(gate_up), "ranks": [2, 4, 32], "adapter_dtype": str(ad)})


def run_case(spec: dict, shapes: Shapes, device: torch.device, dtype: torch.dtype) -> dict:
    """Build one case and time it: per variant the stats of each mode (ms), ratios to base, skips."""
    torch.manual_seed(0)
    case = layer_variants(shapes, device, dtype) if spec["op"] == "layer" else lora_variants(spec, shapes, device, dtype)
    _drop_failing(case)
    variants: dict[str, dict] = {name: {} for name in case.forwards}
    for mode in MODES:
        timed = device_time_mode(mode, case.forwards, case.grad_out, device, shapes.warmup, shapes.repeats,
                                 shapes.calls)
        for name, stats in timed.items():
            variants[name][f"{mode}_ms"] = stats["device_ms"]  # device time: the ratios use it
            variants[name][f"{mode}_host_us"] = stats["host_us"]
    ratios = {name: {mode: row[f"{mode}_ms"]["median"] / variants["base"][f"{mode}_ms"]["median"] for mode in MODES}
              for name, row in variants.items()}
    variants.update({name: {"skipped": reason} for name, reason in case.skipped.items()})
    return {"name": case_name(spec), "spec": spec, "M": shapes.m, "dtype": str(dtype), "params": case.params,
            "variants": variants, "ratio_vs_base": ratios}


def _drop_failing(case: Case) -> None:
    """Run each variant's fwd+bwd once (it compiles and autotunes here); one that raises is moved to
    ``case.skipped`` as ``failed: ...`` and the others are timed without it."""
    for name, forward in list(case.forwards.items()):
        try:
            forward().backward(case.grad_out)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            case.skipped[name] = f"failed: {type(e).__name__}: {e}"
            del case.forwards[name]


def goals(case: dict) -> dict[str, bool]:
    """The GPU goals judged on one LoRA case's medians (reported, never asserted)."""
    med = {name: {mode: row[f"{mode}_ms"]["median"] for mode in MODES}
           for name, row in case["variants"].items() if "skipped" not in row}
    out = {}
    if {"auto", "fused", "compose"} <= set(med):
        out["auto <= 1.02x min(fused, compose), fwd+bwd"] = (
            med["auto"]["fwd+bwd"] <= 1.02 * min(med["fused"]["fwd+bwd"], med["compose"]["fwd+bwd"]))
    if {"fused", "base"} <= set(med):
        out["fused fwd <= 1.05x base"] = med["fused"]["fwd"] <= 1.05 * med["base"]["fwd"]
        out["fused fwd+bwd <= 1.10x base"] = med["fused"]["fwd+bwd"] <= 1.10 * med["base"]["fwd+bwd"]
    if {"fused", "compose"} <= set(med):
        out["fused fwd+bwd <= 0.92x compose"] = med["fused"]["fwd+bwd"] <= 0.92 * med["compose"]["fwd+bwd"]
    if {"fused", "peft"} <= set(med):
        out["fused >= 1.35x faster than peft, fwd+bwd"] = 1.35 * med["fused"]["fwd+bwd"] <= med["peft"]["fwd+bwd"]
    return out
