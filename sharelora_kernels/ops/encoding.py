"""Path lists in the flat form a ``torch.library`` custom op takes, without Triton (the torch paths need it too).

A custom op's schema holds tensors, ints and floats, not ``LoRAPath`` tuples: ``encode`` flattens
paths into (every tensor in role order, [kind code, k_offset, n_offset] per path, scale per path)
and ``decode`` rebuilds them. R, the concatenated rank of a path list, is the sum of ``LoRAPath.rank``.
``check_path`` raises ValueError naming what does not fit a module's (K, N); ``check_linear`` and
``check_group``, what does not fit one call of ``ops.lora_linear`` / ``ops.grouped_lora_linear``
(every backend's inputs).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from ..config import PATH_ROLES
from ..reference import LoRAPath
from .autocast import autocast_enabled

KINDS = tuple(PATH_ROLES)  # layout code of a path kind = its index here


def encode(paths: Sequence[LoRAPath]) -> tuple[list[Tensor], list[int], list[float]]:
    """Flatten paths for a custom op: tensors, layout [kind code, k_offset, n_offset] per path, scales."""
    tensors, layout = [], []
    for p in paths:
        tensors += p.tensors
        layout += [KINDS.index(p.kind), p.k_offset, p.n_offset]
    return tensors, layout, [float(p.scale) for p in paths]


def decode(tensors: Sequence[Tensor], layout: Sequence[int], scales: Sequence[float]) -> list[LoRAPath]:
    """The paths ``encode`` flattened."""
    paths, i = [], 0
    for j, s in enumerate(scales):
        kind = KINDS[layout[3 * j]]
        n = len(PATH_ROLES[kind])
        paths.append(LoRAPath(kind, tuple(tensors[i:i + n]), s, layout[3 * j + 1], layout[3 * j + 2]))
        i += n
    return paths


def check_path(i: int, p: LoRAPath, k: int, n: int) -> None:
    """ValueError naming path ``i`` when its kind, tensor count or shapes do not fit a (K, N) module."""
    if p.kind not in PATH_ROLES:
        raise ValueError(f"path {i}: unknown kind {p.kind!r}")
    if len(p.tensors) != len(PATH_ROLES[p.kind]):
        raise ValueError(f"path {i} ({p.kind}) needs tensors {PATH_ROLES[p.kind]}, got {len(p.tensors)}")
    if (isinstance(p.scale, bool) or not isinstance(p.scale, numbers.Real)
            # a traced scale may be symbolic (compile(dynamic=True)), which math.isfinite breaks the graph on
            or (not torch.compiler.is_compiling() and not math.isfinite(p.scale))):
        raise ValueError(f"path {i} ({p.kind}): scale must be a finite real number, got {p.scale!r}")
    for name, offset in (("k_offset", p.k_offset), ("n_offset", p.n_offset)):
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
            raise ValueError(f"path {i} ({p.kind}): {name} must be an int, got {offset!r}")
        if offset and p.kind != "slice":
            raise ValueError(f"path {i} ({p.kind}): {name}={offset}, but only a slice path is read at an offset")
    t = p.tensors
    if not all(u.is_floating_point() for u in t):
        raise ValueError(f"path {i} ({p.kind}): adapter tensors must be floating point, got {[u.dtype for u in t]}")
    if any(u.dim() != 2 for u in t):
        raise ValueError(f"path {i} ({p.kind}): every tensor must be 2-D, got {[tuple(u.shape) for u in t]}")
    r = p.rank
    kind = p.kind
    if kind == "gate":
        m, gn, g = t[0].shape[1], t[1].shape[0], r
        expect = [(t[0].shape[0], m), (gn, t[0].shape[0]), (g, k), (m, g), (g, gn), (n, g)]
    elif kind == "kron":
        d = t[0].shape[1]
        if d == 0 or k % d or n % d:
            raise ValueError(f"path {i} (kron): d={d} must divide K={k} and N={n}")
        expect = [(r, d), (d, r), (1, k // d), (n // d, 1)]
    elif kind == "slice":
        for name, offset in (("k_offset", p.k_offset), ("n_offset", p.n_offset)):
            if offset < 0:
                raise ValueError(f"path {i} (slice): {name}={offset} is negative")
        if p.k_offset + k > t[0].shape[1]:
            raise ValueError(f"path {i} (slice): k_offset={p.k_offset} + K={k} exceeds A's K_max={t[0].shape[1]}")
        if p.n_offset + n > t[1].shape[0]:
            raise ValueError(f"path {i} (slice): n_offset={p.n_offset} + N={n} exceeds B's N_max={t[1].shape[0]}")
        expect = [(r, t[0].shape[1]), (t[1].shape[0], r)]
    else:
        expect = [(r, k), (n, r)]
    for role, u, e in zip(PATH_ROLES[kind], t, expect):
        if tuple(u.shape) != e:
            raise ValueError(f"path {i} ({kind}): {role} has shape {tuple(u.shape)}, expected {e} (K={k}, N={n}, r={r})")


def check_linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float) -> None:
    """ValueError naming what does not fit y = x W^T + b + paths(dropout(x)): x floating point with
    W's K features, W (N, K), b (N,) in x's dtype (outside autocast, which casts them; a uint8 W is
    ``lowrank_auto_choice``'s stand-in for a quantized base, of no dtype to match), W, b and every
    adapter tensor on x's device, ``dropout_p`` in [0, 1), every path (``check_path``)."""
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if (t is not None and t.dtype != x.dtype and weight.dtype != torch.uint8
                and not autocast_enabled(x.device.type)):
            raise ValueError(f"x is {x.dtype} but the {name} is {t.dtype}: pass x, weight and bias in one dtype (or "
                             "call under torch.autocast, which casts them)")
    if x.dim() == 0:
        raise ValueError("x is a 0-d tensor, expected (..., K)")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[-1]} features but weight has shape {tuple(weight.shape)}, expected (N, K)")
    k, n = weight.shape[1], weight.shape[0]
    if k == 0:
        raise ValueError(f"x has K=0 features (shape {tuple(x.shape)}): a low-rank path needs at least one")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected (N,) = ({n},)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    for i, p in enumerate(paths):
        check_path(i, p, k, n)
    check_devices(x, (("weight", weight), ("bias", bias)), paths)


def check_devices(x: Tensor, named: Sequence[tuple[str, Tensor | None]], paths: Sequence[LoRAPath]) -> None:
    """ValueError naming the first of the ``named`` tensors (None skipped) or path tensors that is
    not on x's device."""
    tensors = [*named, *((f"path {i} ({p.kind})'s {role}", t) for i, p in enumerate(paths)
                         for role, t in zip(PATH_ROLES[p.kind], p.tensors))]
    for name, t in tensors:
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}: move them to one device")


def check_group_sizes(weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                      paths: Sequence[Sequence[LoRAPath]]) -> None:
    """ValueError unless a group has a module, and one weight, one bias (or None) and one path list per module."""
    if not len(weights) == len(biases) == len(paths) or not weights:
        raise ValueError(f"grouped_lora_linear needs one weight, bias and path list per module, got "
                         f"{len(weights)} weights, {len(biases)} biases, {len(paths)} path lists")


def check_group(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                paths: Sequence[Sequence[LoRAPath]], dropout_p: float) -> None:
    """``check_group_sizes``, then ``check_linear`` of every module, the error naming the module."""
    check_group_sizes(weights, biases, paths)
    for g, (w, b, ps) in enumerate(zip(weights, biases, paths)):
        try:
            check_linear(x, w, b, ps, dropout_p)
        except ValueError as e:
            raise ValueError(f"module {g} of the group: {e}") from None
