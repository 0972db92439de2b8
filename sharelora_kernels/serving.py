"""Many adapters on one base: mixed-adapter batches.

``with mixed_batch(model, ["a", "b", "__base__", "a"]): model.generate(...)`` runs each row of a
batch with its own adapter in one forward: every ``SharedLoRALinear`` computes its base once for the
whole batch and adds each row's adapter through ``ops.multi_adapter_add`` (rows grouped by adapter;
each adapter's shared tensors read once per segment, never copied per layer or per row). The per-batch
metadata (``ops.adapter_batch``) is built once per batch shape (the prefill, then the decode steps'
one token per row) and read by every layer; each layer keeps the tables of its adapters
(``ops.adapter_tables``) and rebuilds them when an adapter is added, deleted or replaced.

Mixed batches are inference: refused in training mode (as PEFT refuses ``adapter_names``), computed
without autograd in eval mode (an input that requires grad is refused: its gradient would be lost).
The adapters are the model's named adapters (``apply`` / ``load`` with ``adapter_name=``, or a PEFT
model's; a hand-wrapped layer's), whatever is active; ``"__base__"`` names a row without adapter.
Inside ``disable_adapters`` every row gets the base alone (PEFT's rule). A mixed batch reads its
adapters as they are when it starts (read once per batch shape of a ``mixed_batch`` block, not at
every decode step of its ``generate``): a change made in place (an optimizer step, fused or not, a
``load``, a write through ``.data``) is seen by the next block; one made while a block runs may reach
some of its rows and not others. The bank's accounting and limit (``adapter_memory``,
``set_bank_limit``) live in ``model``.
"""
from __future__ import annotations

import contextlib
import operator
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .base import compute_dtype
from .layer import BASE_ROW, LoRAPathModule, SharedLoRALinear
from .model import adapter_names, is_applied, peft_wrappers, shared_layers
from .ops.multi_adapter_torch import storage_state

_NO_BATCH = lambda: None  # noqa: E731  (tables not yet checked for any batch)


class MixedBatch:
    """The rows' adapters of one mixed batch, shared by every layer of the model.

    known: the model's adapter names (adapter i of the tables); rows: one adapter index per row
    (``ops.BASE`` for "__base__"), each repeated ``expand`` times (generate's beams / return sequences);
    a forward of the unrepeated number of rows (an encoder-decoder's encoder, which generate runs
    before it repeats them) takes each row once. layers: the layers it runs in, whose path lists of
    the rows' adapters it keeps (an adapter deleted or replaced while it runs is refused at the next
    forward, not served as the base).
    """

    def __init__(self, known: Sequence[str], rows: Sequence[int], layers: Sequence[SharedLoRALinear] = (),
                 expand: int = 1):
        self.known = tuple(known)
        self.rows = tuple(rows)
        self._rows_of = {len(self.rows): self.rows, len(self.rows) // expand: self.rows[::expand]}  # batch size -> rows
        self._batches: dict[tuple, ops.AdapterBatch] = {}
        used = [self.known[a] for a in sorted(set(self.rows) - {ops.BASE})]
        self._served = {}  # layer -> (names, path lists) of the rows' adapters it has
        for layer in layers:
            names = tuple(n for n in used if n in layer.adapter_paths)
            self._served[layer] = names, tuple(layer.adapter_paths[n] for n in names)

    def rows_for(self, count: int) -> tuple[int, ...]:
        """The adapter index of each row of a forward of ``count`` rows (the rows, or each once);
        ValueError for any other count."""
        rows = self._rows_of.get(count)
        if rows is None:
            raise ValueError(f"adapter_names gives {len(self.rows)} rows, the batch has {count}: give one name "
                             "per row (generate's num_beams / num_return_sequences repeat rows: pass expand; a "
                             "module given the tokens of all rows flattened into one dim, as OPT's fc1 / fc2 "
                             "are, cannot be served by row: leave it out of target_modules)")
        return rows

    def names_for(self, count: int) -> list[str]:
        """``rows_for(count)`` as adapter names ("__base__" for a row without adapter)."""
        return [BASE_ROW if a == ops.BASE else self.known[a] for a in self.rows_for(count)]

    def batch(self, rows: tuple[int, ...], tokens_per_row: int, device: torch.device) -> ops.AdapterBatch:
        """The metadata of a forward of ``rows`` (``self.rows``, or each once) with ``tokens_per_row``
        tokens per row, built once per shape."""
        key = (len(rows), tokens_per_row, device)
        if key not in self._batches:
            self._batches[key] = ops.adapter_batch(rows, len(self.known), tokens_per_row, device)
        return self._batches[key]

    def forward(self, layer: SharedLoRALinear, x: Tensor) -> Tensor:
        """``layer``'s output for x (B, T, K) or (B, K), row b with adapter ``rows[b]``; while the
        layer's adapters are disabled, its base alone for every row."""
        if layer.training:
            raise RuntimeError("a mixed-adapter batch is inference only: call model.eval() (the layer is in "
                               "training mode)")
        if x.dim() < 2 or x.shape[-1] != layer.in_features:
            raise ValueError(f"input has shape {tuple(x.shape)}, this layer expects (rows, ..., {layer.in_features})")
        rows = self.rows_for(x.shape[0])
        layer._check_call(x)  # the device and dtype checks of the layer's own call
        if layer.disable_adapters or x.numel() == 0:  # the base for every row (PEFT's rule); no rows: no work
            return layer.forward_alone(x)
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a mixed-adapter batch computes without autograd, and this layer's input requires "
                               "grad: its gradient would be dropped; run one adapter at a time (set_adapter) for "
                               "gradients, or the batch under torch.no_grad()")
        self._check_served(layer)
        batch = self.batch(rows, x[0].numel() // x.shape[-1], x.device)
        tables = layer_tables(layer, self.known, batch)
        with torch.no_grad():
            if layer.layout.computes_itself:
                dtype = compute_dtype(layer.base_layer, layer.layout, x)
                return ops.multi_adapter_add(layer._base_output(x), x, batch, tables, dtype)
            return ops.multi_adapter_linear(x, layer.base_weight(), layer.bias, batch, tables)

    def _check_served(self, layer: SharedLoRALinear) -> None:
        """RuntimeError when an adapter of the rows that ``layer`` had when the batch started was deleted
        or replaced since (a few identity comparisons, at every call)."""
        names, lists = self._served.get(layer, ((), ()))
        paths = layer.adapter_paths._modules
        if all(map(operator.is_, map(paths.get, names), lists)):
            return
        name = next(n for n, ml in zip(names, lists) if paths.get(n) is not ml)
        rows = [i for i, a in enumerate(self.rows) if a != ops.BASE and self.known[a] == name]
        raise RuntimeError(f"adapter {name!r} (rows {rows}) was deleted or replaced while a mixed batch serving it "
                           "runs: its rows cannot be served; start a new mixed batch (sk.mixed_batch / "
                           "adapter_names) with the adapters the model has now")


def layer_tables(layer: SharedLoRALinear, known: Sequence[str], batch: ops.AdapterBatch | None = None
                 ) -> ops.AdapterTables:
    """The layer's ``ops.AdapterTables`` for adapters ``known`` (an adapter the layer lacks: no paths),
    cached on the layer (``_mixed_tables``: dropped by ``delete_adapter``, not taken by copies and
    pickles). Rebuilt when one of its adapters is added, deleted or replaced (the identity of its path
    lists, compared at every call: a few identity comparisons), or a tensor of their paths is replaced:
    another object in its store (``load_state_dict(assign=True)``), or the same one on other storage
    (``.to()``, ``.float()``, ``p.data = ...``), checked at the first call of each ``batch`` (None: at
    every call); not when another adapter is made active. Tensors changed in place (``load``) are
    read live (the torch path's stacked copies and the kernels' gate buffers are made anew for each
    batch)."""
    paths = layer.adapter_paths._modules
    key = (tuple(paths), tuple(paths.values()), tuple(known))
    cached = layer.__dict__.get("_mixed_tables")
    if cached is not None and cached.key == key and cached.current(batch):
        return cached.tables
    modules = [list(paths[n]) if n in paths else [] for n in known]
    tables = ops.adapter_tables([[m.as_path() for m in ms] for ms in modules], layer.in_features, layer.out_features)
    layer._mixed_tables = _CachedTables(key, tables, [m for ms in modules for m in ms], batch)
    return tables


class _CachedTables:
    """A layer's tables and what they were built from: where each path module's spec and store, and
    each tensor, were found, and each tensor's data pointer and storage (``storage_state``)."""

    def __init__(self, key: tuple, tables: ops.AdapterTables, modules: Sequence[LoRAPathModule],
                 batch: ops.AdapterBatch | None):
        self.key, self.tables = key, tables
        self._owners, self._names, self._found = [], [], []
        for m in modules:
            store = m._store[0]._parameters
            keys = [name.replace(".", "/") for name in m.spec.tensors.values()]
            self._owners += [m.__dict__, m.__dict__, *[store] * len(keys)]
            self._names += ["spec", "_store", *keys]
            self._found += [m.spec, m._store, *[store[k] for k in keys]]
        self._tensors = list(tables.tensors())
        self._states = list(map(storage_state, self._tensors))
        self._checked = _NO_BATCH if batch is None else weakref.ref(batch)

    def current(self, batch: ops.AdapterBatch | None) -> bool:
        """Whether the tables still describe the layer's paths: true without a look at the tensors
        when they were checked for this batch already."""
        if batch is not None and self._checked() is batch:
            return True
        ok = (all(map(operator.is_, map(dict.get, self._owners, self._names), self._found))
              and list(map(storage_state, self._tensors)) == self._states)
        if ok and batch is not None:
            self._checked = weakref.ref(batch)
        return ok


def served_adapters(model: nn.Module) -> list[str]:
    """The adapters a mixed batch of ``model`` serves: its named adapters (``apply`` / ``load``, or a
    PEFT model's), or those of its hand-wrapped ``SharedLoRALinear`` layers (``adapter_name``,
    ``add_adapter``), in the order the layers first name them."""
    if is_applied(model):
        return adapter_names(model)
    return list(dict.fromkeys(n for layer in shared_layers(model) for n in layer.adapter_paths))


def row_indices(model: nn.Module, names: Sequence[str], expand: int = 1) -> tuple[list[str], list[int]]:
    """The model's adapter names (``served_adapters``) and one index per row (``ops.BASE`` for
    "__base__"), each name repeated ``expand`` times in a row; ValueError (TypeError for a non-list)
    before any work."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names, one per row, got {type(names).__name__}")
    if isinstance(expand, bool) or not isinstance(expand, int) or expand < 1:
        raise ValueError(f"expand must be a positive int, got {expand!r}")
    known = served_adapters(model)
    if not known:
        raise ValueError("this model has no ShareLoRA adapters: apply or load some (or wrap layers in "
                         "SharedLoRALinear) before a mixed batch")
    unknown = sorted({n for n in names if n != BASE_ROW and n not in known}, key=str)
    if unknown:
        raise ValueError(f"adapter_names has unknown adapter(s) {unknown}; this model's adapters are {known} "
                         f"(and {BASE_ROW!r} for a row without adapter)")
    if getattr(model, "training", False):
        raise ValueError("cannot run a mixed-adapter batch in training mode (inference only, as PEFT's "
                         "adapter_names): call model.eval() first")
    if any(layer.merged for layer in shared_layers(model)):
        raise ValueError("the model's adapters are merged into its weights: unmerge before a mixed-adapter batch")
    index = {n: i for i, n in enumerate(known)}
    return known, [index.get(n, ops.BASE) for n in names for _ in range(expand)]


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], expand: int = 1) -> Iterator[nn.Module]:
    """``with mixed_batch(model, names): model(ids)`` / ``model.generate(ids, ...)``: row b of every
    forward inside uses adapter ``names[b]`` ("__base__": the base alone), all in one batch.

    adapter_names: one of the model's adapter names (``served_adapters``: hand-wrapped layers' too) or
    "__base__" per row of the batch; expand: how many times generate repeats each row (``num_beams``
    for beam search, else ``num_return_sequences``; an encoder-decoder's encoder, which runs on the
    rows before generate repeats them, takes each row once). Inference only: ValueError in training mode, for
    an unknown name (the known ones listed), on a merged model; a forward whose rows do not match
    raises ValueError before it computes anything, one after an adapter of the rows was deleted
    inside the block RuntimeError. Inside ``disable_adapters`` every row gets the base. A PEFT model's
    modules-to-save wrappers (a copy of a module per adapter) get each row's name, as PEFT's
    ``adapter_names`` gives it them.
    """
    known, rows = row_indices(model, adapter_names, expand)
    layers = shared_layers(model)
    state = MixedBatch(known, rows, layers, expand)
    before = [layer.mixed_batch for layer in layers]
    hooks = [m.register_forward_pre_hook(_with_adapter_names(state), with_kwargs=True)
             for _, m in peft_wrappers(model)]
    for layer in layers:
        layer.mixed_batch = state
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.mixed_batch = was
        for hook in hooks:
            hook.remove()


def _with_adapter_names(state: MixedBatch):
    """A forward pre-hook giving a module one adapter name per row of its input, as ``state`` reads
    its rows (``MixedBatch.names_for``): PEFT's wrappers route rows by ``adapter_names``."""
    def hook(module, args, kwargs):
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim()), None)
        if x is None:
            return None
        return args, {**kwargs, "adapter_names": state.names_for(x.shape[0])}
    return hook
