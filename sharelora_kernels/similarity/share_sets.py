"""Greedy share sets from a layer similarity matrix (the README's "The methods")."""
from __future__ import annotations

import numbers

import numpy as np
import torch

from ..config import check_bool

METHODS = ("complete", "anchor")


def share_sets(S, eps: float, method: str = "complete", contiguous: bool = False) -> list[list[int]]:
    """Partition layers 0..L-1 into share sets from the similarity S = 1 - D.

    S: (L, L) symmetric similarity (tensor, array or nested lists; finite). eps: a real scalar in
    [0, 1] (Python, numpy, or a 0-d tensor or array; not a bool): a pair (i, j), i < j, is eligible
    when S[i, j] >= eps.

    method "complete": visit eligible pairs by descending S, ties by ascending (i, j). Both layers
        free: open the set {i, j}. One free, one in set G: add the free layer if S(free, m) >= eps
        for every m in G. Both taken: skip. Every pair inside a set is then >= eps.
    method "anchor" (the paper's Algorithm 1 read literally): for i ascending, a free layer i takes
        {i} plus every free j > i with S[i, j] >= eps.
    contiguous: True or False (a bool, not a string such as "no"); True: a set may only be opened by, or
        grow by, a layer adjacent to its current range, so every set is a run of consecutive layers.

    Returns every layer exactly once, singletons included (the paper: singletons are not sets; the
    config and the counts ignore them): sorted lists, sorted by first layer. Deterministic for a
    given matrix. ``angular_distance`` resolves angles to about 1e-8 rad (float64 rounding of the
    cosine), so even identical layers get S slightly below 1: eps = 1 groups nothing in practice.
    """
    s = check_matrix(S)
    value = check_eps(eps)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    check_bool("contiguous", contiguous)
    sets = (_complete if method == "complete" else _anchor)(s, value, contiguous)
    taken = {i for g in sets for i in g}
    sets += [[i] for i in range(len(s)) if i not in taken]
    return sorted((sorted(g) for g in sets), key=lambda g: g[0])


def _complete(s: np.ndarray, eps: float, contiguous: bool) -> list[list[int]]:
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if s[i, j] >= eps]
    pairs.sort(key=lambda p: (-s[p], p[0], p[1]))
    group_of: dict[int, list[int]] = {}
    sets: list[list[int]] = []
    for i, j in pairs:
        gi, gj = group_of.get(i), group_of.get(j)
        if gi is None and gj is None:
            if contiguous and j != i + 1:
                continue
            g = [i, j]
            sets.append(g)
            group_of[i] = group_of[j] = g
        elif gi is None or gj is None:
            free, g = (i, gj) if gi is None else (j, gi)
            if contiguous and free not in (min(g) - 1, max(g) + 1):
                continue
            if all(s[free, m] >= eps for m in g):
                g.append(free)
                group_of[free] = g
    return sets


def _anchor(s: np.ndarray, eps: float, contiguous: bool) -> list[list[int]]:
    n = len(s)
    taken = [False] * n
    sets = []
    for i in range(n):
        if taken[i]:
            continue
        g = [i]
        for j in range(i + 1, n):
            if not taken[j] and s[i, j] >= eps:
                g.append(j)
            elif contiguous:
                break
        for j in g:
            taken[j] = True
        if len(g) > 1:
            sets.append(g)
    return sets


def check_eps(eps) -> float:
    """``eps`` as a float; ValueError unless a real scalar in [0, 1] (Python, numpy, or a 0-d tensor or
    array; not a bool)."""
    value = eps.item() if isinstance(eps, (torch.Tensor, np.ndarray)) and eps.ndim == 0 else eps
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"eps must be a number in [0, 1], got {eps!r}")
    return float(value)


# how far a similarity S = 1 - D may stray from [0, 1] (and its diagonal from 1) by rounding
S_TOLERANCE = 1e-6


def check_matrix(S) -> np.ndarray:
    """S as a float64 numpy array; ValueError unless square, finite, symmetric (to 1e-9) and a
    similarity S = 1 - D: values in [0, 1] and a diagonal of 1 (each to ``S_TOLERANCE``), so that a
    distance D passed by mistake is refused (it would group the least similar layers)."""
    s = S.detach().cpu().double().numpy() if isinstance(S, torch.Tensor) else np.asarray(S, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"S must be a square (L, L) matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("S contains NaN or Inf")
    asym = np.abs(s - s.T)
    if asym.size and asym.max() > 1e-9:
        i, j = np.unravel_index(int(asym.argmax()), asym.shape)
        raise ValueError(f"S must be symmetric, but S[{i}, {j}] = {s[i, j]!r} and S[{j}, {i}] = {s[j, i]!r}")
    diagonal = np.diag(s)
    if diagonal.size and np.abs(diagonal - 1).max() > S_TOLERANCE:
        i = int(np.abs(diagonal - 1).argmax())
        hint = ": this looks like a distance D; pass S = 1 - D" if np.abs(diagonal).max() <= S_TOLERANCE else ""
        raise ValueError(f"S must be a similarity S = 1 - D with S[i, i] = 1, but S[{i}, {i}] = {float(s[i, i])}{hint}")
    if s.size and (s.min() < -S_TOLERANCE or s.max() > 1 + S_TOLERANCE):
        i, j = np.unravel_index(int(np.abs(s - 0.5).argmax()), s.shape)
        raise ValueError(f"S must be a similarity S = 1 - D in [0, 1], but S[{i}, {j}] = {float(s[i, j])}")
    return 0.5 * (s + s.T)
