"""Factor tables of a path list, built once per plan and cached on the device.

Every path kind (plain, slice, gate, kron) is a low-rank product whose effective factors
``A_eff (R, K)`` and ``B_eff (N, R)`` are structured views of parameters. The kernels see all
paths at once, ranks concatenated (R = sum of the path ranks), through one table per factor: row
``i`` describes the vector ``U[i, :]`` (row i of ``A_eff`` over K, or column i of ``B_eff`` over N)
as five int64 numbers

    base    byte address of element 0 of the vector (slice offsets already added)
    stride  element stride along the vector
    period  0, or the Kronecker block ``d``: then U[i, n] = coef[n // d] * base[(n % d) * stride]
    coef    byte address of the Kronecker kernel (K_A or K_B), 0 if none
    cstride element stride of the Kronecker kernel

so slices are pointer offsets, Kronecker factors are expanded tile by tile while loading (x is
folded by K_A, the output tiled by K_B), and nothing (R, K)-, (N, R)- or (N, K)-sized is built.
A gate path's ``A_eff = C G_id`` is a tiny (g, K) tensor computed in torch into a buffer the table
points at.

Caching (no host work per call). A table holds addresses, strides, shapes and offsets only, so it
is a pure function of those: ``tables_for`` keys its cache on exactly them (each tensor's
``data_ptr``, shape, strides, dtype and device, each path's kind, offsets and scale). A parameter
replaced (``.to()``, ``load_state_dict(assign=True)``, FSDP resharding, a new optimizer-owned copy)
or reshaped has another key and gets a new table; updated in place (optimizer steps) it keeps its
address and its table, which stays right. The only values a table depends on are a gate path's:
its ``A_eff`` buffer is recomputed on the device at every call (a few tiny matmuls). So a call that
hits the cache copies nothing from the host: after one warm-up step, forward and backward can be
captured in a CUDA graph.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch
import triton.language as tl
from torch import Tensor

from ..reference import LoRAPath, gate_core
from .autocast import no_autocast
from .utils import TL_DTYPES

CACHE_SIZE = 4096  # tables kept (least recently used dropped first); a 7B model's plan needs ~250


class FactorTables(NamedTuple):
    """Device tables of a path list: ``a`` (R, 5) rows of A_eff over K, ``b`` (R, 5) columns of
    B_eff over N, ``scale`` (R,) float32 path scale of every rank, ``gates`` the (path index,
    A_eff buffer) of each gate path (refreshed at every call), ``dtype`` the Triton dtype of every
    adapter tensor (it may differ from x's: fp32 adapters of a bf16 base are loaded as fp32 and
    rounded to bf16 for the MMA), ``periodic`` whether any row is a Kronecker row (kernels compiled
    without it skip the period/coefficient arithmetic)."""

    a: Tensor
    b: Tensor
    scale: Tensor
    gates: tuple[tuple[int, Tensor], ...]
    dtype: tl.dtype
    periodic: bool


def path_rank(path: LoRAPath) -> int:
    """Rank the path contributes to the concatenated R (g for a gate path)."""
    return path.tensors[2].shape[0] if path.kind == "gate" else path.tensors[0].shape[0]


def _fp32(path: LoRAPath) -> LoRAPath:
    return path._replace(tensors=tuple(t if t.dtype == torch.float32 else t.float() for t in path.tensors))


def gate_a_eff(path: LoRAPath) -> Tensor:
    """``A_eff = C G_id`` (g, K) of a gate path: fp32 math (autocast off), cast once to the adapter dtype."""
    fp32 = _fp32(path)
    with no_autocast(fp32.tensors[2].device.type):
        return (gate_core(fp32) @ fp32.tensors[2]).to(path.tensors[0].dtype)


def rows_of(t: Tensor, rank_dim: int, offset: int, period: int = 0, coef: Tensor | None = None,
            coef_dim: int = 0) -> list[list[int]]:
    """Table rows of the vectors of ``t`` indexed along ``rank_dim``, read from ``offset`` on."""
    long_dim = 1 - rank_dim
    es = t.element_size()
    base = t.data_ptr() + offset * t.stride(long_dim) * es
    c_addr, c_stride = (coef.data_ptr(), coef.stride(coef_dim)) if coef is not None else (0, 0)
    return [[base + i * t.stride(rank_dim) * es, t.stride(long_dim), period, c_addr, c_stride]
            for i in range(t.shape[rank_dim])]


def build_tables(paths: Sequence[LoRAPath], device: torch.device) -> FactorTables:
    """The factor tables of ``paths`` (validated by the caller) on ``device``, built from scratch."""
    a_rows, b_rows, scales, gates = [], [], [], []
    for i, p in enumerate(paths):
        t = p.tensors
        if p.kind in ("plain", "slice"):
            a_rows += rows_of(t[0], 0, p.k_offset)
            b_rows += rows_of(t[1], 1, p.n_offset)
        elif p.kind == "gate":
            with torch.no_grad():  # data the kernels read, not part of any graph
                a_eff = gate_a_eff(p)
            gates.append((i, a_eff))
            a_rows += rows_of(a_eff, 0, 0)
            b_rows += rows_of(t[5], 1, 0)
        else:  # kron: A = K_A (x) A_s, B = K_B (x) B_s
            d = t[0].shape[1]
            a_rows += rows_of(t[0], 0, 0, d, t[2], 1)
            b_rows += rows_of(t[1], 1, 0, d, t[3], 0)
        scales += [p.scale] * path_rank(p)
    as_table = lambda rows: torch.tensor(rows, dtype=torch.int64).to(device)
    return FactorTables(as_table(a_rows), as_table(b_rows), torch.tensor(scales, dtype=torch.float32).to(device),
                        tuple(gates), TL_DTYPES[paths[0].tensors[0].dtype], any(p.kind == "kron" for p in paths))


_CACHE: OrderedDict[tuple, object] = OrderedDict()


def tensor_key(t: Tensor | None) -> tuple | None:
    """What a table entry derived from ``t`` depends on: its address, shape, strides and dtype."""
    return None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def paths_key(paths: Sequence[LoRAPath], device: torch.device) -> tuple:
    return (str(device), *((p.kind, p.k_offset, p.n_offset, float(p.scale), *map(tensor_key, p.tensors))
                           for p in paths))


def cached(key: tuple, build):
    """The cache entry of ``key``, made by ``build()`` on a miss (least recently used dropped first).
    Built outside inference mode: an entry kept across calls holds normal tensors, which a later call
    outside ``torch.inference_mode()`` may write in place (a gate path's A_eff buffer)."""
    entry = _CACHE.get(key)
    if entry is None:
        with torch.inference_mode(False):
            entry = _CACHE[key] = build()
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return entry


def refresh_gates(tables: FactorTables, paths: Sequence[LoRAPath]) -> FactorTables:
    """Recompute every gate path's A_eff buffer of ``tables`` from the current values of ``paths``."""
    if not tables.gates:
        return tables
    with torch.no_grad():  # the buffer is data the kernels read (their gradients come from the chain rule)
        for i, buffer in tables.gates:
            if buffer.dtype == torch.float32:  # written in place, no temporary: fp32 math whatever autocast says
                fp32 = _fp32(paths[i])
                with no_autocast(buffer.device.type):
                    torch.mm(gate_core(fp32), fp32.tensors[2], out=buffer)
            else:
                buffer.copy_(gate_a_eff(paths[i]))
    return tables


def tables_for(paths: Sequence[LoRAPath], device: torch.device) -> FactorTables:
    """``build_tables(paths, device)``, cached (see the module docstring), its gate buffers refreshed."""
    return refresh_gates(cached(("tables", *paths_key(paths, device)), lambda: build_tables(paths, device)), paths)


_INDEX: dict[tuple, Tensor] = {}


def index_tensor(values: Sequence[int], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``values`` as a ``dtype`` tensor on ``device``, made once per (values, device, dtype) (a normal
    tensor, made outside inference mode: autograd may save it in a call outside it)."""
    key = (tuple(values), str(device), dtype)
    if key not in _INDEX:
        with torch.inference_mode(False):
            _INDEX[key] = torch.tensor(values, dtype=dtype).to(device)
    return _INDEX[key]


def clear_cache() -> None:
    """Forget every cached table and index (tests; memory is otherwise bounded by ``CACHE_SIZE``)."""
    _CACHE.clear()
    _INDEX.clear()
