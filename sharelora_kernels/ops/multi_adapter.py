"""Many adapters, one batch: every row of a batch names its adapter, and one call per layer adds each
row's low-rank paths into the base output, ``y[m] += sum_p s_p B_p A_p x[m]`` over the paths of
row m's adapter (nothing for a row with index ``BASE`` = -1). Inference only (no dropout, no backward).

    batch  = adapter_batch([0, 2, -1, 0], num_adapters=3, tokens_per_row=T)   # once per batch
    tables = adapter_tables(adapters, in_features=K, out_features=N)        # once per layer and adapter set
    y = base(x)                                   # the base runs once for the whole batch (dense or 4-bit)
    multi_adapter_add(y, x, batch, tables)        # in place, every layer
    y = multi_adapter_linear(x, weight, bias, batch, tables)                # the same for a dense base

Shapes and dtypes: x (..., K) (M tokens in all, M = rows x tokens_per_row, row-major as (B, T, K)
flattens), y (..., N) with x's leading dims; x, y float32 / bfloat16 / float16 (float64 on the torch
path); each adapter a list of ``reference.LoRAPath`` of any kinds (plain, slice, gate, Kronecker) and
ranks, adapters of different methods, ranks and path counts in one batch. Numerics as
``ops.lowrank_only``: x cast to ``compute_dtype`` (default x's dtype), adapter tensors rounded to it
for the products, sums and ``h = x A_eff^T`` in float32 (float64 for float64 on the torch path), the
low-rank term added into y in y's dtype.

Metadata (``AdapterBatch``, built once per batch on the host, one copy to the device, read by every
layer): the tokens of each adapter grouped together (``order``: token ids sorted by adapter, the
base rows left out), each active adapter's segment (adapter, start, count) and the kernels' tile
list: each segment cut into tiles of at most ``block_m`` rows, ``block_m`` the smallest of 16 / 32 /
64 that holds the longest segment. A decode batch (one token per row, many adapters) gets 16-row
tiles holding one or a few tokens each: no adapter is padded to a tile of rows in memory and no
program runs for an adapter without rows.

Per-layer tables (``AdapterTables``, built once per set of adapters and kept by the caller, as vLLM
keeps its LoRA metadata): every adapter's factor tables (``tables.build_tables``: pointers into its
own tensors, slice offsets, Kronecker kernels, a gate's (g, K) ``A_eff`` buffer) concatenated, with
each adapter's first rank row: the kernels find an adapter's factors through them, nothing copied or
expanded. A gate buffer is recomputed when one of its gate's tensors changed in place (their version
counters); tables describe the tensors they were built from, so build new ones when an adapter is
added, deleted or its tensors replaced. The torch path's stacked operands are checked against their
tensors' versions once per batch (at its first call with these tables): a batch reads the adapters as
they were when it started; build a new batch after changing an adapter in place.

Backends: torch (the CPU default, ``multi_adapter_torch``: the segments of adapters of one structure
as batched GEMMs over the adapters, padded to the longest, their tensors stacked once per set of
adapters; uneven segments one at a time through the single-adapter op's torch math, the reference's
helpers) and Triton
(``multi_adapter_triton``: one "shrink" launch ``h = x A_eff^T`` per tile into an fp32 h, one
"expand" launch ``y += (h s) B_eff^T`` in place, over all segments at once; CUDA, or CPU under
``TRITON_INTERPRET=1``), chosen by the backend setting as a layer's call is (``ops.set_backend`` /
``SHARELORA_BACKEND``: torch and compose the torch path, triton the kernels, auto the kernels on
CUDA once compared with the torch path) unless ``use_triton`` says.

Refused: a call with grad enabled where x or an adapter tensor requires grad (RuntimeError: run it
under ``torch.no_grad()`` / ``torch.inference_mode()``, or train one adapter at a time with
``ops.lora_linear``); and, before any work, inputs that do not fit (ValueError naming them).
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import LoRAPath
from . import dispatch
from .encoding import check_linear, check_path
from .function import wants_grad
from .multi_adapter_torch import structure, torch_add

BASE = -1  # the adapter index of a row without adapter ("__base__")
BLOCK_MS = (16, 32, 64)  # rows per tile the kernels are built for (16: tl.dot's smallest)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- per-batch metadata
@dataclass(frozen=True, eq=False)
class AdapterBatch:
    """Which adapter each token of a batch uses, grouped by adapter (``adapter_batch`` builds it).

    num_adapters: adapters the indices refer to (0..num_adapters-1; -1 is a base row);
    row_adapters: the per-row indices as given; tokens_per_row: tokens of each row (1 for decode);
    order: (M_active,) int64 on the device, token ids sorted by adapter (stable), base rows left out;
    segments: (adapter, start, count) per active adapter, start/count into ``order``;
    tiles: (num_tiles, 3) int32 on the device, (adapter, start, count <= block_m) per kernel tile;
    block_m: rows per tile; cache: what the torch path derives from the batch once (its segment plans).
    """

    num_adapters: int
    row_adapters: tuple[int, ...]
    tokens_per_row: int
    order: Tensor
    segments: tuple[tuple[int, int, int], ...]
    tiles: Tensor
    block_m: int
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        """M: the tokens x must have (rows x tokens_per_row)."""
        return len(self.row_adapters) * self.tokens_per_row

    @property
    def active(self) -> tuple[int, ...]:
        """The adapters with at least one row, in index order."""
        return tuple(a for a, _, _ in self.segments)


def adapter_batch(row_adapters: Sequence[int] | Tensor, num_adapters: int, tokens_per_row: int = 1,
                  device: torch.device | str | None = None, block_m: int | None = None) -> AdapterBatch:
    """The metadata of one batch, built once and passed to every layer's ``multi_adapter_add``.

    row_adapters: one adapter index per row (B,), ints or an integer tensor, in 0..num_adapters-1 or
    ``BASE`` (-1) for a row without adapter; tokens_per_row: T, the tokens of every row (x is (B, T, K)
    or (B * T, K); 1 for a decode step); device: where the kernels run (default: the tensor's, else
    CPU); block_m: rows per kernel tile (16, 32 or 64; default: the smallest that holds the longest
    segment). ValueError for an index out of range (naming the count), a bad tokens_per_row or block_m.
    """
    if isinstance(row_adapters, Tensor):
        if row_adapters.dim() != 1 or row_adapters.is_floating_point():
            raise ValueError(f"row_adapters must be a 1-D integer tensor, got {row_adapters.dtype} "
                             f"of shape {tuple(row_adapters.shape)}")
        device = row_adapters.device if device is None else device
        row_adapters = row_adapters.tolist()
    bad = [a for a in row_adapters if isinstance(a, bool) or not isinstance(a, numbers.Integral)]
    if bad:
        raise ValueError(f"row_adapters must hold adapter indices (ints), got {bad[0]!r}")
    rows = tuple(int(a) for a in row_adapters)
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 0:
        raise ValueError(f"num_adapters must be a non-negative int, got {num_adapters!r}")
    if isinstance(tokens_per_row, bool) or not isinstance(tokens_per_row, int) or tokens_per_row < 1:
        raise ValueError(f"tokens_per_row must be a positive int, got {tokens_per_row!r}")
    bad = [(i, a) for i, a in enumerate(rows) if not BASE <= a < num_adapters]
    if bad:
        i, a = bad[0]
        raise ValueError(f"row {i}: adapter index {a} out of range for {num_adapters} adapters "
                         f"(use 0..{num_adapters - 1}, or {BASE} for a row without adapter)")
    if block_m is not None and block_m not in BLOCK_MS:
        raise ValueError(f"block_m must be one of {BLOCK_MS}, got {block_m!r}")
    token_adapter = torch.tensor(rows, dtype=torch.int64).repeat_interleave(tokens_per_row)
    order = torch.argsort(token_adapter, stable=True)
    counts = torch.bincount(token_adapter + 1, minlength=num_adapters + 1).tolist()
    order = order[counts[0]:]  # base rows sort first: dropped
    segments, start = [], 0
    for a, count in enumerate(counts[1:]):
        if count:
            segments.append((a, start, count))
        start += count
    longest = max((c for _, _, c in segments), default=1)
    block_m = block_m or next((b for b in BLOCK_MS if b >= longest), BLOCK_MS[-1])
    tiles = [(a, s + i, min(block_m, c - i)) for a, s, c in segments for i in range(0, c, block_m)]
    device = torch.device(device or "cpu")
    return AdapterBatch(num_adapters, rows, tokens_per_row, order.to(device),
                        tuple(segments), torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3).to(device), block_m)


# ----------------------------------------------------------------------------- per-layer adapter tables
@dataclass(eq=False)
class AdapterTables:
    """The adapters of one layer (module) and their device factor tables (``adapter_tables`` builds it).

    adapters: one tuple of LoRAPaths per adapter (possibly empty); in_features K, out_features N;
    groups: the adapters with paths, grouped by structure (``multi_adapter_torch.structure``: the torch
    path runs each group's segments together, its operands stacked once per batch, kept in the batch's
    cache). The Triton tables are built on first Triton use (``device_tables``) and kept.
    """

    adapters: tuple[tuple[LoRAPath, ...], ...]
    in_features: int
    out_features: int
    groups: tuple[tuple[int, ...], ...]
    device: torch.device | None  # of every adapter tensor (None: no tensors)
    dtypes: frozenset  # of the adapter tensors
    _device: object = field(default=None, repr=False)
    verified: dict = field(default_factory=dict, repr=False)  # compute dtype -> the kernels agreed (``_verified_add``)

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    def tensors(self):
        """Every adapter tensor, adapter by adapter."""
        return (t for paths in self.adapters for p in paths for t in p.tensors)

    def device_tables(self, batch: "AdapterBatch"):
        """The concatenated factor tables (``multi_adapter_triton.BankTables``), built once, their gate
        buffers recomputed at the first call of each ``batch``."""
        from .multi_adapter_triton import build_bank_tables

        if self._device is None:
            self._device = build_bank_tables(self.adapters)
        return self._device.refreshed(batch)


def adapter_tables(adapters: Sequence[Sequence[LoRAPath]], in_features: int, out_features: int) -> AdapterTables:
    """The adapters of one (K -> N) module, index i = adapter i of ``adapter_batch``; built once per
    set of adapters and kept by the caller. ValueError naming adapter and path when a path does not
    fit (K, N), or when the adapters' tensors are on more than one device."""
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    adapters = tuple(tuple(paths) for paths in adapters)
    for a, paths in enumerate(adapters):
        for i, p in enumerate(paths):
            if not isinstance(p, LoRAPath):
                raise ValueError(f"adapter {a}, path {i}: expected a reference.LoRAPath, got {type(p).__name__}")
            try:
                check_path(i, p, in_features, out_features)
            except ValueError as err:
                raise ValueError(f"adapter {a}: {err}") from None
    groups: dict[tuple, list[int]] = {}
    for a, paths in enumerate(adapters):
        if paths:
            groups.setdefault(structure(paths, in_features, out_features), []).append(a)
    tensors = [t for paths in adapters for p in paths for t in p.tensors]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"every adapter tensor must be on one device, found {sorted(map(str, devices))}")
    return AdapterTables(adapters, in_features, out_features, tuple(map(tuple, groups.values())),
                         next(iter(devices), None), frozenset(t.dtype for t in tensors))


# ----------------------------------------------------------------------------- checks and backends
def _inference_only(x: Tensor, tables: AdapterTables) -> None:
    """RuntimeError when grad is enabled and x or an adapter tensor requires grad (no backward here)."""
    if wants_grad(x, tables.tensors()):
        raise RuntimeError("multi-adapter batches are inference only (no backward): call under torch.no_grad() or "
                           "torch.inference_mode(), or train one adapter at a time")


def _check(y: Tensor, x: Tensor, batch: AdapterBatch, tables: AdapterTables, compute: torch.dtype,
           use_triton: bool) -> None:
    """ValueError (RuntimeError for grad) naming what does not fit, before any work."""
    if not isinstance(batch, AdapterBatch) or not isinstance(tables, AdapterTables):
        raise ValueError("batch must come from adapter_batch() and tables from adapter_tables(), got "
                         f"{type(batch).__name__} and {type(tables).__name__}")
    _inference_only(x, tables)
    k, n = tables.in_features, tables.out_features
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, the adapters were built for in_features K={k}")
    if y.dim() == 0 or y.shape[-1] != n or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y has shape {tuple(y.shape)}, expected x's leading dims and out_features: "
                         f"{(*x.shape[:-1], n)}")
    m = x.numel() // k if k else 0
    if m != batch.num_tokens:
        raise ValueError(f"x has {m} tokens (shape {tuple(x.shape)}), the batch was built for "
                         f"{len(batch.row_adapters)} rows x {batch.tokens_per_row} tokens = {batch.num_tokens}: "
                         "give one adapter index per row")
    if batch.num_adapters != tables.num_adapters:
        raise ValueError(f"the batch indexes {batch.num_adapters} adapters, the tables hold {tables.num_adapters}")
    if not (x.is_floating_point() and y.is_floating_point() and compute.is_floating_point):
        raise ValueError(f"x, y and the compute dtype must be floating point, got {x.dtype}, {y.dtype}, {compute}")
    for what, device in (("y", y.device), ("the batch metadata", batch.order.device), ("the adapters", tables.device)):
        if device is not None and device != x.device:
            raise ValueError(f"x is on {x.device}, {what} on {device}")
    if use_triton:
        from .utils import check_kernel_device

        check_kernel_device(x)
        adapter_dtypes = set(tables.dtypes)
        for what, dtypes in (("x's compute dtype", {compute}), ("y", {y.dtype}), ("the adapters", adapter_dtypes)):
            if not dtypes <= set(FUSED_DTYPES):
                raise ValueError(f"the triton backend supports float32, bfloat16, float16; {what}: "
                                 f"{sorted(map(str, dtypes))}")
        if len(adapter_dtypes) > 1:
            raise ValueError(f"the triton backend needs every adapter tensor in one dtype, found "
                             f"{sorted(map(str, adapter_dtypes))}")


def _takes_triton(y: Tensor, tables: AdapterTables, compute: torch.dtype) -> bool:
    """Whether the kernels take these dtypes: compute, y and the adapters (one dtype) among float32 /
    bfloat16 / float16."""
    return {compute, y.dtype, *tables.dtypes} <= set(FUSED_DTYPES) and len(tables.dtypes) <= 1


def _triton_imports() -> bool:
    """Whether the kernels' module imports (triton is installed)."""
    try:
        from . import multi_adapter_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _default_triton(y: Tensor, x: Tensor, tables: AdapterTables, compute: torch.dtype) -> bool:
    """auto's choice: Triton for CUDA tensors when it imports and takes the dtypes (``_takes_triton``);
    the torch path elsewhere."""
    return x.is_cuda and _takes_triton(y, tables, compute) and _triton_imports()


def _chosen_triton(y: Tensor, x: Tensor, tables: AdapterTables, compute: torch.dtype) -> tuple[bool, bool]:
    """(the kernels run, they are compared with the torch path first) under the backend setting
    (``ops.set_backend`` / ``SHARELORA_BACKEND``, ``dispatch.backend_setting``): torch and compose run
    the torch path; triton the kernels where they take the dtypes (the torch path elsewhere, as a
    layer does); auto (the CUDA default) the kernels for CUDA tensors they take, once ``_verified_add``
    agreed. ValueError for triton when it cannot be imported."""
    setting = dispatch.backend_setting(x.device)
    if setting == "triton":
        if not _triton_imports():
            raise ValueError("the backend is set to triton (ops.set_backend / SHARELORA_BACKEND) but triton cannot "
                             "be imported")
        return _takes_triton(y, tables, compute), False
    return setting == "auto" and _default_triton(y, x, tables, compute), True


def _verified_add(y: Tensor, x: Tensor, batch: AdapterBatch, tables: AdapterTables, compute: torch.dtype) -> bool:
    """Whether the kernels may run for these tables at this compute dtype: the first time, their
    low-rank sums on this batch (into float32 zeros) are compared with the torch path's (the error
    as ``dispatch.result_error``, within ``dispatch.TOLERANCE`` of the least precise dtype); a
    mismatch rules them out for these tables, with one warning. y (M, N), x (M, K) in ``compute``."""
    ok = tables.verified.get(compute)
    if ok is None:
        from .multi_adapter_triton import triton_add

        want, got = (torch.zeros(y.shape, dtype=torch.float32, device=y.device) for _ in range(2))
        torch_add(want, x, batch, tables.adapters, tables.groups)
        triton_add(got, x, batch, tables.device_tables(batch))
        err, _ = dispatch.result_error({"y": got}, {"y": want})
        tol = max(dispatch.TOLERANCE.get(d, dispatch.TOLERANCE[torch.float32]) for d in {compute, *tables.dtypes})
        ok = tables.verified[compute] = err <= tol
        if not ok:
            warnings.warn(f"sharelora_kernels: the multi-adapter kernels' results differ from the torch path's "
                          f"(relative error {err:.3g} > {tol:g}, {tables.num_adapters} adapters, K="
                          f"{tables.in_features} N={tables.out_features}); using the torch path for this layer",
                          stacklevel=3)
    return ok


# ----------------------------------------------------------------------------- public entry
def multi_adapter_add(y: Tensor, x: Tensor, batch: AdapterBatch, tables: AdapterTables,
                      compute_dtype: torch.dtype | None = None, use_triton: bool | None = None) -> Tensor:
    """``y[m] += sum_p s_p B_p A_p x[m]`` over the paths of token m's adapter, in place; returns y (or
    the sum in a contiguous copy when y is not contiguous). Base rows (index -1) are left as they are.

    y (..., N): the base's output for the whole batch, any float dtype; x (..., K): its input, with
    y's leading dims and ``batch.num_tokens`` tokens; batch: ``adapter_batch``; tables:
    ``adapter_tables`` of this module; compute_dtype: dtype of the low-rank products' operands
    (default x's; h and the sums in float32); use_triton: the Triton kernels (CUDA tensors, or CPU
    under ``TRITON_INTERPRET=1``; every adapter tensor of one dtype), False the torch path, None
    (default): as the backend setting says (``_chosen_triton``: under auto, the CUDA default, Triton
    for CUDA tensors it takes once compared with the torch path on the first batch of these tables,
    ``_verified_add``; the torch path on the CPU by default). Inference only: RuntimeError when grad is
    enabled and x or an adapter tensor requires grad.
    """
    compute = compute_dtype or x.dtype
    use_triton, verify = _chosen_triton(y, x, tables, compute) if use_triton is None else (use_triton, False)
    _check(y, x, batch, tables, compute, use_triton)
    if not batch.segments:
        return y
    if not y.is_contiguous():
        y = y.contiguous()
    y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]).to(compute)
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are chosen above
        if use_triton and verify and not _verified_add(y2, x2, batch, tables, compute):
            torch_add(y2, x2, batch, tables.adapters, tables.groups)
        elif use_triton:
            from .multi_adapter_triton import triton_add

            triton_add(y2, x2, batch, tables.device_tables(batch))
        else:
            torch_add(y2, x2, batch, tables.adapters, tables.groups)
    return y


def multi_adapter_linear(x: Tensor, weight: Tensor, bias: Tensor | None, batch: AdapterBatch, tables: AdapterTables,
                         use_triton: bool | None = None) -> Tensor:
    """``x W^T + b`` for the whole batch in one GEMM, then ``multi_adapter_add``: x (..., K) -> (..., N)
    in the base's result dtype. weight (N, K), bias (N,) or None."""
    check_linear(x, weight, bias, (), 0.0)  # x, weight and bias fit one another (weight 2-D)
    if tuple(weight.shape) != (tables.out_features, tables.in_features):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, the adapters were built for "
                         f"(out_features, in_features) = {(tables.out_features, tables.in_features)}")
    _inference_only(x, tables)
    return multi_adapter_add(F.linear(x, weight, bias), x, batch, tables, use_triton=use_triton)
