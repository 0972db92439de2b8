"""Path lists in the flat form a ``torch.library`` custom op takes, without Triton (the torch paths need it too).

A custom op's schema holds tensors, ints and floats, not ``LoRAPath`` tuples: ``encode`` flattens
paths into (every tensor in role order, [kind code, k_offset, n_offset] per path, scale per path)
and ``decode`` rebuilds them. R, the concatenated rank of a path list, is the sum of ``LoRAPath.rank``.
``check_path`` raises ValueError naming what does not fit a module's (K, N).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..config import PATH_ROLES
from ..reference import LoRAPath

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
    t = p.tensors
    if any(u.dim() != 2 for u in t):
        raise ValueError(f"path {i} ({p.kind}): every tensor must be 2-D, got {[tuple(u.shape) for u in t]}")
    r = p.rank
    kind = p.kind
    if kind == "gate":
        m, gn, g = t[0].shape[1], t[1].shape[0], r
        expect = [(t[0].shape[0], m), (gn, t[0].shape[0]), (g, k), (m, g), (g, gn), (n, g)]
    elif kind == "kron":
        d = t[0].shape[1]
        if k % d or n % d:
            raise ValueError(f"path {i} (kron): d={d} must divide K={k} and N={n}")
        expect = [(r, d), (d, r), (1, k // d), (n // d, 1)]
    elif kind == "slice":
        if p.k_offset < 0 or p.k_offset + k > t[0].shape[1]:
            raise ValueError(f"path {i} (slice): k_offset={p.k_offset} + K={k} exceeds A's K_max={t[0].shape[1]}")
        if p.n_offset < 0 or p.n_offset + n > t[1].shape[0]:
            raise ValueError(f"path {i} (slice): n_offset={p.n_offset} + N={n} exceeds B's N_max={t[1].shape[0]}")
        expect = [(r, t[0].shape[1]), (t[1].shape[0], r)]
    else:
        expect = [(r, k), (n, r)]
    for role, u, e in zip(PATH_ROLES[kind], t, expect):
        if tuple(u.shape) != e:
            raise ValueError(f"path {i} ({kind}): {role} has shape {tuple(u.shape)}, expected {e} (K={k}, N={n}, r={r})")
