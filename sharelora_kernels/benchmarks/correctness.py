"""gpu-check phase (b): every kernel variant against the float64 reference, on the device.

Each check runs one backend (``triton``: the fused kernels, ``compose``, ``auto``; the grouped
kernel) on fresh random inputs and compares the output and every gradient (x and each adapter
tensor) with ``reference.lora_linear`` in float64 by relative error (max |err| / max |ref|; a
gradient is also judged against 0.1 x the case's largest, as a gate core's is a cancelling sum).
Checks: every path kind, bf16 / fp16 / fp32 bases with fp32 and bf16 adapters, ragged shapes,
M = 1, transposed x, forced int64 offsets, the dropout mask of forward = of backward, grouped vs
per-module, bitwise repeatability, and the low-rank-only op of quantized bases (kernels and torch path). A check returns a row: name, backend, passed, max_rel_err, tol.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from .. import ops, reference
from ..reference import LoRAPath

OUT_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GRAD_TOL = {torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float16: 8e-3}
KINDS = ("plain", "slice", "gate", "kron")
KRON_D = 8


class Sizes(NamedTuple):
    """Ragged sizes of one profile: M, K, N (K, N and N / 2 multiples of KRON_D, off every tile size),
    and the width of the dropout-mask check."""

    m: int
    k: int
    n: int
    mask_k: int


GPU = Sizes(97, 200, 144, 128)
TINY = Sizes(7, 40, 32, 16)


def random_path(kind: str, k: int, n: int, r: int, dtype: torch.dtype, device: torch.device) -> LoRAPath:
    """A path of ``kind`` with random non-zero trainable tensors; shared dims a bit larger than (K, N)."""
    t = lambda *shape: (torch.randn(*shape, device=device) / math.sqrt(shape[-1])).to(dtype).requires_grad_()
    if kind == "plain":
        return LoRAPath("plain", (t(r, k), t(n, r)), 0.5)
    if kind == "slice":
        return LoRAPath("slice", (t(r, k + 7), t(n + 5, r)), 0.25, 3, 5)
    if kind == "gate":
        return LoRAPath("gate", (t(r, 12), t(10, r), t(2, k), t(12, 2), t(2, 10), t(n, 2)), 0.75)
    return LoRAPath("kron", (t(r, KRON_D), t(KRON_D, r), t(1, k // KRON_D), t(n // KRON_D, 1)), 0.4)


def _leaves(x: Tensor, paths) -> list[Tensor]:
    """x, then every distinct adapter tensor of ``paths`` (a list of LoRAPath lists)."""
    return [x] + list({id(t): t for ps in paths for p in ps for t in p.tensors}.values())


def float64_outputs(x: Tensor, weights, biases, paths, dys, masks=None) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """Outputs and gradients (``_leaves`` order) of the float64 reference, one module per weight;
    ``masks``: per module, the dropout keep mask / (1 - p) applied to x, or None."""
    leaves = _leaves(x, paths)
    d = {id(t): t.detach().double().requires_grad_() for t in leaves}
    x64 = d[id(x)]
    ys = [reference.lora_linear(x64, w.double(), None if b is None else b.double(),
                                [p._replace(tensors=tuple(d[id(t)] for t in p.tensors)) for p in ps],
                                x_dropped=None if masks is None else x64 * masks[g].double())
          for g, (w, b, ps) in enumerate(zip(weights, biases, paths))]
    return [y.detach() for y in ys], torch.autograd.grad(ys, [d[id(t)] for t in leaves], [dy.double() for dy in dys])


def rel_err(a: Tensor, ref: Tensor, floor: float = 0.0) -> float:
    return ((a.double() - ref).abs().max() / max(ref.abs().max().item(), floor, 1e-12)).item() if ref.numel() else 0.0


def compare(ys, grads, ys_ref, grads_ref, dtype: torch.dtype) -> dict:
    """max relative errors of outputs and gradients and whether both are within the dtype's tolerance."""
    out = max((rel_err(y, r) for y, r in zip(ys, ys_ref)), default=0.0)
    scale = max((g.abs().max().item() for g in grads_ref if g.numel()), default=0.0)
    grad = max((rel_err(g, r, 0.1 * scale) for g, r in zip(grads, grads_ref)), default=0.0)
    return {"max_rel_err": max(out, grad), "output_rel_err": out, "grad_rel_err": grad,
            "tol": {"output": OUT_TOL[dtype], "grad": GRAD_TOL[dtype]},
            "passed": bool(out < OUT_TOL[dtype] and grad < GRAD_TOL[dtype])}


class Check(NamedTuple):
    name: str
    backend: str
    run: Callable[[], dict]


# ------------------------------------------------------------------------------ one module
def module_check(backend: str, kinds, sizes: Sizes, device, base=torch.bfloat16, adapters=torch.float32, m=None,
                 transposed=False, seed=0) -> dict:
    """One module of ``kinds`` (ranks 3, 5, 2, 4, ...) on ``backend`` vs float64."""
    torch.manual_seed(seed)
    m, k, n = m or sizes.m, sizes.k, sizes.n
    x = (torch.randn(k, m, device=device).t() if transposed else torch.randn(m, k, device=device)).to(base)
    x.requires_grad_()
    weight = (torch.randn(n, k, device=device) / math.sqrt(k)).to(base)
    bias = torch.randn(n, device=device).to(base)
    paths = [random_path(kind, k, n, r, adapters, device) for kind, r in zip(kinds, (3, 5, 2, 4))]
    y = ops.lora_linear(x, weight, bias, paths, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, _leaves(x, [paths]), dy)
    ys_ref, grads_ref = float64_outputs(x, [weight], [bias], [paths], [dy])
    low = max((base, adapters), key=OUT_TOL.get)
    return compare([y], grads, ys_ref, grads_ref, low)


def group_check(backend: str, sizes: Sizes, device, base=torch.bfloat16) -> dict:
    """A q/k/v-like group (outputs N, N/2, N/2: GQA) on ``backend``, every kind (a shared A, a shared
    slice pair, own gates and Kronecker kernels) vs the float64 reference per module."""
    torch.manual_seed(1)
    k = sizes.k
    ns = (sizes.n, sizes.n // 2, sizes.n // 2)
    x = torch.randn(sizes.m, k, device=device).to(base).requires_grad_()
    weights = [(torch.randn(n, k, device=device) / math.sqrt(k)).to(base) for n in ns]
    biases = [torch.randn(n, device=device).to(base) for n in ns]
    shared = {kind: random_path(kind, k, max(ns), 3, torch.float32, device) for kind in ("plain", "slice")}
    own_b = lambda n: random_path("plain", k, n, 3, torch.float32, device).tensors[1]  # noqa: E731
    paths = [[LoRAPath("plain", (shared["plain"].tensors[0], own_b(n)), 0.5),  # share_a: one A, own B
              shared["slice"]._replace(n_offset=(max(ns) - n) // 2),
              random_path("gate", k, n, 2, torch.float32, device), random_path("kron", k, n, 2, torch.float32, device)]
             for n in ns]
    ys = ops.grouped_lora_linear(x, weights, biases, paths, backend=backend)
    dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, _leaves(x, paths), dys)
    ys_ref, grads_ref = float64_outputs(x, weights, biases, paths, dys)
    return compare(ys, grads, ys_ref, grads_ref, base)


def lowrank_only_check(backend: str, sizes: Sizes, device, base=torch.bfloat16) -> dict:
    """The low-rank-only op of quantized bases (``ops.lowrank_add``: the base computed y itself, here an
    ``F.linear``) on ``backend``: every kind added into y in place, output and gradients vs float64."""
    torch.manual_seed(5)
    m, k, n = sizes.m, sizes.k, sizes.n
    x = torch.randn(m, k, device=device).to(base).requires_grad_()
    weight = (torch.randn(n, k, device=device) / math.sqrt(k)).to(base)
    bias = torch.randn(n, device=device).to(base)
    paths = [random_path(kind, k, n, r, torch.float32, device) for kind, r in zip(KINDS, (3, 5, 2, 4))]
    y = ops.lowrank_add(torch.nn.functional.linear(x, weight, bias), x, paths, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, _leaves(x, [paths]), dy)
    ys_ref, grads_ref = float64_outputs(x, [weight], [bias], [paths], [dy])
    return compare([y], grads, ys_ref, grads_ref, base)


# ------------------------------------------------------------------------------ dropout masks
def mask_check(backend: str, sizes: Sizes, device, grouped: bool = False, p: float = 0.3) -> dict:
    """Forward and backward apply one dropout mask: with W = 0, b = 0 and identity factors (A = B = I,
    s = 1) the output *is* dropout(x) and dx = mask * dy / (1 - p), so both masks can be read off
    exactly; dA is then checked against float64 with the forward's mask. (W = 0 only exposes the
    mask: every other check uses random bases.)"""
    torch.manual_seed(2)
    k = sizes.mask_k
    x = torch.randn(2 * k, k, device=device).requires_grad_()
    weight = torch.zeros(k, k, device=device)
    modules = 2 if grouped else 1
    paths = [[LoRAPath("plain", (torch.eye(k, device=device).requires_grad_(), torch.eye(k, device=device)), 1.0)]
             for _ in range(modules)]
    if grouped:
        ys = list(ops.grouped_lora_linear(x, [weight] * modules, [None] * modules, paths, p, True, backend=backend))
    else:
        ys = [ops.lora_linear(x, weight, None, paths[0], p, True, backend=backend)]
    dys = [torch.randn_like(y) for y in ys]
    leaves = _leaves(x, paths)  # x, then each module's A (trained) and B (frozen)
    grads = torch.autograd.grad(ys, [t for t in leaves if t.requires_grad], dys)
    fwd = [y != 0 for y in ys]
    bwd = grads[0] != 0
    masks = [f.float() / (1 - p) for f in fwd]
    ys_ref, grads_ref = float64_outputs(x, [weight] * modules, [None] * modules, paths, dys, masks)
    grads_ref = [g for g, t in zip(grads_ref, leaves) if t.requires_grad]
    row = compare(ys, grads, ys_ref, grads_ref, torch.float32)
    keep = fwd[0].float().mean().item()
    agree = all(torch.equal(f, fwd[0]) for f in fwd) and torch.equal(bwd, fwd[0])
    row.update(keep_fraction=keep, masks_agree=bool(agree))
    row["passed"] = bool(row["passed"] and row["masks_agree"] and abs(keep - (1 - p)) < 0.1)
    return row


# ------------------------------------------------------------------------------ repeatability, int64
def repeat_check(backend: str, sizes: Sizes, device, grouped: bool = False) -> dict:
    """Two identical fwd+bwd runs give bitwise-equal outputs and gradients."""
    def once():
        torch.manual_seed(3)
        if grouped:
            ns = (sizes.n, sizes.n)
            x = torch.randn(sizes.m, sizes.k, device=device).to(torch.bfloat16).requires_grad_()
            shared = random_path("slice", sizes.k, sizes.n, 3, torch.float32, device)
            paths = [[shared, random_path("plain", sizes.k, n, 2, torch.float32, device)] for n in ns]
            weights = [torch.randn(n, sizes.k, device=device).to(torch.bfloat16) for n in ns]
            ys = list(ops.grouped_lora_linear(x, weights, [None, None], paths, backend=backend))
        else:
            x = torch.randn(sizes.m, sizes.k, device=device).to(torch.bfloat16).requires_grad_()
            paths = [[random_path(kind, sizes.k, sizes.n, 3, torch.float32, device) for kind in KINDS]]
            ys = [ops.lora_linear(x, torch.randn(sizes.n, sizes.k, device=device).to(torch.bfloat16), None, paths[0],
                                  backend=backend)]
        grads = torch.autograd.grad(ys, _leaves(x, paths), [torch.ones_like(y) for y in ys])
        return [*ys, *grads]

    first, second = once(), once()
    equal = all(torch.equal(a, b) for a, b in zip(first, second))
    return {"passed": equal, "bitwise_equal": equal, "max_rel_err": 0.0 if equal else
            max(rel_err(a, b.double()) for a, b in zip(first, second))}


@contextlib.contextmanager
def forced_int64() -> Iterator[list[str]]:
    """Make the kernel launchers index in int64 (as for tensors of 2**31+ elements), yielding the
    modules patched (none: the launchers no longer decide it by ``needs_int64_index``)."""
    from ..ops import dy_lowrank, fused_lora_linear, lowrank_grad, lowrank_input
    modules = [mod for mod in (fused_lora_linear, lowrank_grad, lowrank_input, dy_lowrank)
               if hasattr(mod, "needs_int64_index")]
    saved = [mod.needs_int64_index for mod in modules]
    for mod in modules:
        mod.needs_int64_index = lambda *tensors: True
    try:
        yield [mod.__name__ for mod in modules]
    finally:
        for mod, fn in zip(modules, saved):
            mod.needs_int64_index = fn


def int64_check(sizes: Sizes, device) -> dict:
    with forced_int64() as patched:
        if not patched:
            return {"passed": True, "skipped": "the launchers do not choose int64 offsets by needs_int64_index"}
        row = module_check("triton", KINDS, sizes, device, base=torch.float32, transposed=True, seed=4)
    return {**row, "patched": patched}


# ------------------------------------------------------------------------------ the list
def checks(sizes: Sizes, device: torch.device) -> list[Check]:
    """Every check of the phase, in order."""
    out = []
    for backend in ("triton", "compose", "auto"):
        for kinds in [(kind,) for kind in KINDS] + [KINDS]:
            out.append(Check(f"{'+'.join(kinds)} bf16 base, fp32 adapters", backend,
                             partial(module_check, backend, kinds, sizes, device)))
    for backend in ("triton", "compose"):
        one = partial(module_check, backend, KINDS, sizes, device)
        for base in (torch.bfloat16, torch.float16, torch.float32):
            for adapters in (torch.float32, torch.bfloat16):
                if (base, adapters) != (torch.bfloat16, torch.float32):
                    out.append(Check(f"all kinds, {_name(base)} base, {_name(adapters)} adapters", backend,
                                     partial(one, base, adapters)))
        out += [Check("all kinds, M = 1", backend, partial(one, m=1)),
                Check("all kinds, transposed x, fp32", backend, partial(one, torch.float32, transposed=True)),
                Check("dropout: forward mask = backward mask", backend, partial(mask_check, backend, sizes, device)),
                Check("grouped q/k/v (GQA) vs per-module float64", backend, partial(group_check, backend, sizes, device)),
                Check("bitwise repeatable fwd+bwd", backend, partial(repeat_check, backend, sizes, device)),
                Check("grouped dropout: one mask, forward = backward", backend,
                      partial(mask_check, backend, sizes, device, grouped=True)),
                Check("grouped bitwise repeatable fwd+bwd", backend, partial(repeat_check, backend, sizes, device, True))]
    out.append(Check("forced int64 offsets, transposed x", "triton", partial(int64_check, sizes, device)))
    out += [Check("low-rank-only op (quantized bases), all kinds, bf16", backend,
                  partial(lowrank_only_check, backend, sizes, device)) for backend in ("triton", "torch")]
    return out


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def run_check(check: Check) -> dict:
    """The check's row; an exception is a failed check with its message."""
    try:
        row = check.run()
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with the others
        row = {"passed": False, "error": f"{type(e).__name__}: {e}"}
    return {"name": check.name, "backend": check.backend, **row}
