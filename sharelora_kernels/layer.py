"""SharedLoRALinear: a frozen nn.Linear plus low-rank paths whose parameters may be shared.

Every adapter tensor is owned exactly once, by an ``AdapterStore`` (for a model: one store per
adapter name, in the ``AdapterStores`` on the model root, made by ``apply``; for a standalone layer:
the layer's own). Paths do not register the tensors they read: they look them up in the store by
plan name at each forward. So two layers in a share set use the *same* ``nn.Parameter`` object,
``model.parameters()`` and ``state_dict()`` hold it once (``save_pretrained``, Trainer checkpoints
and DDP see plain unshared parameters), autograd sums its gradient over every user, and whoever
replaces a parameter in the store (``.to()``, ``load_state_dict(assign=True)``, FSDP2's sharding)
is seen by every path.
"""
from __future__ import annotations

import math
import threading
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from . import ops
from .ops import call_plan
from .ops.autocast import autocast_enabled, no_autocast
from .base import (add_to_weight_, check_4bit_layouts, compute_dtype, describe_base, keep_standard_4bit_layout,
                   merge_keeps_finite, new_adapter_dtype, standard_4bit_layout)
from .config import PATH_ROLES, check_bool, check_dropout, check_int, check_positive
from .plan import PathSpec, TensorSpec
from .reference import LoRAPath, delta_weight


DEFAULT_ADAPTER = "default"
STORE_ATTR = "sharelora_adapters"  # the AdapterStores: adapter x's tensors under sharelora_adapters.x.<tensor>
BASE_ROW = "__base__"  # names a row without adapter in a mixed batch (serving, PEFT's adapter_names): reserved
_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active
_TRANSFORMS = {"Vmap": "vmap", "Grad": "grad (or vjp, jacrev)", "Jvp": "jvp (or jacfwd)", "Functionalize": "functionalize"}


def _refuse_transforms() -> None:
    """NotImplementedError naming the ``torch.func`` transform a layer call runs under (vmap, grad, ...):
    the layer's ops are autograd Functions and kernels without functorch rules."""
    key = torch._C._functorch.peek_interpreter_stack().key().name
    raise NotImplementedError(f"torch.func.{_TRANSFORMS.get(key, key.lower())} over a sharelora_kernels layer is "
                              "not supported (its ops are autograd Functions and Triton kernels without torch.func "
                              "rules): call the model without torch.func transforms (torch.func.functional_call "
                              "alone works)")


def _features_error(x: Tensor, in_features: int) -> ValueError:
    """The error of an input whose last dim is not the layer's in_features (or that has no dim)."""
    if x.dim() == 0:
        return ValueError(f"input is a 0-d tensor, this layer expects (..., {in_features})")
    return ValueError(f"input has {x.shape[-1]} features in its last dim, this layer expects {in_features}")


def _check_path_modules(paths: Sequence) -> None:
    """TypeError naming the first entry of ``paths`` that is not a LoRAPathModule."""
    for i, p in enumerate(paths):
        if not isinstance(p, LoRAPathModule):
            raise TypeError(f"paths[{i}] is a {type(p).__name__}; a layer's paths are LoRAPathModules "
                            "(a PathSpec read from an AdapterStore)")


def adapter_name_list(adapter_names: str | Sequence[str]) -> list[str]:
    """``adapter_names`` as a list (a string is one name); ValueError for a name given twice, which
    would be computed, or merged, twice."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    names = list(names) if isinstance(names, Iterable) and not isinstance(names, Mapping) else [None]
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter names are a name or a list of names, got {adapter_names!r}")
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        raise ValueError(f"adapter {twice[0]!r} is named twice in {names}: each adapter is computed once")
    return names


def check_adapter_name(name) -> None:
    """ValueError unless ``name`` can name an adapter: a non-empty string without '.' (it names modules),
    other than ``BASE_ROW``."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"an adapter name must be a non-empty string without '.', got {name!r}")
    if "/" in name or "\\" in name:
        raise ValueError(f"an adapter name names the subfolder it is saved in (save_pretrained): no '/' or '\\', "
                         f"got {name!r}")
    if name == BASE_ROW:
        raise ValueError(f"{BASE_ROW!r} cannot name an adapter: it names a row without adapter in a mixed batch "
                         "(sk.mixed_batch, PEFT's adapter_names)")
    if name == STORE_ATTR:
        raise ValueError(f"{name!r} cannot name an adapter: it names the module holding the adapter stores, and "
                         "the state-dict keys of the adapter's modules to save would read as the stores' keys")
    if name in _STORES_ATTRIBUTES:
        raise ValueError(f"{name!r} cannot name an adapter: it is an attribute of the module holding the adapter "
                         "stores (sharelora_adapters.<name>)")


@torch.no_grad()
def init_tensor_(t: Tensor, spec: TensorSpec) -> None:
    """Fill ``t`` in place as ``spec.init`` says (a no-op on the meta device)."""
    if t.device.type == "meta":
        return
    if spec.init == "kaiming_uniform":
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # nn.Linear's and PEFT's A init
    elif spec.init == "kaiming_normal":
        nn.init.kaiming_normal_(t)
    elif spec.init == "gaussian":
        nn.init.normal_(t, std=spec.init_std)
    elif spec.init == "zeros":
        nn.init.zeros_(t)
    else:
        raise ValueError(f"unknown init {spec.init!r} for tensor {spec.name!r}")


def new_parameter(spec: TensorSpec, device=None, dtype=None) -> nn.Parameter:
    """A trainable tensor initialised as ``spec.init`` says."""
    t = torch.empty(spec.shape, device=device, dtype=dtype)
    init_tensor_(t, spec)
    return nn.Parameter(t)


class AdapterStore(nn.Module):
    """Owns each adapter tensor once, under its plan name (``.`` is stored as ``/`` in the key).

    ``specs``: plan name -> TensorSpec, so ``reset_parameters()`` can redo each tensor's init (for a
    model built on the meta device: ``to_empty()``, then ``reset_parameters()``, as FSDP does).
    """

    def __init__(self, params: Mapping[str, nn.Parameter], specs: Mapping[str, TensorSpec]):
        super().__init__()
        self.specs = dict(specs)
        for name, p in params.items():
            self.register_parameter(name.replace(".", "/"), p)

    def reset_parameters(self) -> None:
        """Initialise every tensor again as its spec says (fresh adapters: outputs unchanged)."""
        for name, p in self.tensors().items():
            init_tensor_(p, self.specs[name])

    def __getitem__(self, name: str) -> nn.Parameter:
        return self._parameters[name.replace(".", "/")]

    def tensors(self) -> dict[str, nn.Parameter]:
        """Plan name -> parameter, in creation order."""
        return {key.replace("/", "."): p for key, p in self._parameters.items()}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``nn.Module``'s, and an error (raised by ``load_state_dict`` even with ``strict=False``, as a
        size mismatch is) where the state dict holds adapter tensors here but not this store's: one
        saved from another share plan (a Trainer resuming into another model would load nothing and
        then step the optimizer with the other plan's states). A state dict without any of them (the
        base alone) loads as usual."""
        theirs = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        if theirs and theirs != set(self._parameters):
            missing, extra = sorted(set(self._parameters) - theirs), sorted(theirs - set(self._parameters))
            error_msgs.append(f"the adapter tensors under {prefix!r} are not this model's ({len(missing)} of its "
                              f"tensors missing, e.g. {missing[:2]}; {len(extra)} others, e.g. {extra[:2]}): saved "
                              "from another share plan (method, targets or ranks)? Load it into a model applied "
                              "with the config it was saved with")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class AdapterStores(nn.ModuleDict):
    """A model's adapter stores by adapter name, registered on it as ``sharelora_adapters``: a tensor's
    state-dict key is ``sharelora_adapters.<adapter>.<tensor>``, the adapter name a key segment of
    its own, as PEFT keys its adapters' tensors (``lora_A.<adapter>.weight``). Tools that copy one
    adapter into another by name, as TRL's preference trainers build their reference adapter
    (``.default.`` -> ``.ref.``), rely on it."""

    def reset_parameters(self) -> None:
        """Initialise every adapter's tensors again (``AdapterStore.reset_parameters``)."""
        for store in self.values():
            store.reset_parameters()


_STORES_ATTRIBUTES = frozenset(dir(AdapterStores()))  # names an adapter cannot take (ModuleDict's add_module)


class LoRAPathModule(nn.Module):
    """One path of one module: its spec, and the store its tensors live in (not registered here).

    ``path.A``, ``path.G_id``, ... return the live parameter of that role from the store.
    """

    def __init__(self, spec: PathSpec, store: AdapterStore):
        super().__init__()
        if spec.kind not in PATH_ROLES:
            raise ValueError(f"unknown path kind {spec.kind!r}, expected one of {list(PATH_ROLES)}")
        if sorted(spec.tensors) != sorted(PATH_ROLES[spec.kind]):
            raise ValueError(f"a {spec.kind} path names the tensors of roles {PATH_ROLES[spec.kind]}, got "
                             f"{tuple(spec.tensors)}")
        self.spec = spec
        self._store = (store,)  # a tuple: the store is owned (registered) by the model root, not here

    def __getattr__(self, name: str):
        spec = self.__dict__.get("spec")
        if spec is not None and name in spec.tensors:
            return self._store[0][spec.tensors[name]]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        """A role's tensor is the store's (read by every module sharing it): assigning one here is refused."""
        spec = self.__dict__.get("spec")
        if spec is not None and name in spec.tensors:
            key = spec.tensors[name]
            raise TypeError(f"path.{name} is the adapter tensor {key!r} of the model's store (state-dict key "
                            f"sharelora_adapters.<adapter>.{key.replace('.', '/')}), read by every module sharing "
                            f"it: change its values in place (with torch.no_grad(): path.{name}.copy_(...)) or "
                            "load a state dict (load_state_dict, assign=True to replace the tensors)")
        super().__setattr__(name, value)

    def as_path(self) -> LoRAPath:
        s, store = self.spec, self._store[0]
        return LoRAPath(s.kind, tuple(store[s.tensors[r]] for r in PATH_ROLES[s.kind]), s.scale, s.k_offset, s.n_offset)

    def extra_repr(self) -> str:
        s = self.spec
        return f"kind={s.kind}, part={s.part}, rank={s.rank}, scale={s.scale:g}"


def _read_only(*args, **kwargs):
    raise TypeError("a layer's adapters are read-only here: change them through the layer (add_adapter, "
                    "delete_adapter, set_adapter), which keeps what it builds from them in step")


class PathList(nn.ModuleList):
    """One adapter's path modules in one layer, read-only (built once by ``SharedLoRALinear``)."""

    def __init__(self, paths: Sequence[LoRAPathModule] = ()):
        super().__init__()
        for i, m in enumerate(paths):
            self.add_module(str(i), m)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The tensors its paths read, each once: what PEFT reads of an adapter's entry (its layer status,
        ``set_requires_grad``). The model lists each tensor once, in its store (``named_parameters``
        reads the modules' own parameters, and these have none)."""
        return iter({id(t): t for m in self for t in m.as_path().tensors}.values())

    __setitem__ = __delitem__ = __iadd__ = append = extend = insert = pop = _read_only


class AdapterPaths(nn.ModuleDict):
    """Adapter name -> its ``PathList``, read-only outside the layer's own ``_set`` / ``_remove``."""

    def _set(self, name: str, paths: Sequence[LoRAPathModule]) -> None:
        self.add_module(name, PathList(paths))

    def _remove(self, name: str) -> None:
        nn.ModuleDict.__delitem__(self, name)

    def __setitem__(self, name: str, paths: nn.Module) -> None:
        """Only the list already there (PEFT assigns each adapter's ``.to(device)`` back, itself here)."""
        if self._modules.get(name) is not paths:
            _read_only()

    __delitem__ = update = pop = clear = _read_only


class _MixedBatches(threading.local):
    """Per thread: ``batches`` = {id(layer): the MixedBatch it runs there}, present from the thread's
    first look (a compiled model guards on the dict's contents; a key made only later would not be
    guarded, and a graph traced with no mixed batch would serve every later one as the base)."""

    def __init__(self):
        self.batches: dict = {}


_MIXED = _MixedBatches()


class SharedLoRALinear(nn.Module):
    """Drop-in replacement for a frozen ``nn.Linear`` (or Transformers ``Conv1D``, or bitsandbytes
    ``Linear4bit`` / ``Linear8bitLt``) with low-rank adapters.

    ``y = x W^T + b + sum_p s_p B_p A_p dropout(x)``; x: (..., in_features) -> (..., out_features).
    A dense base's ``weight`` and ``bias`` (N,) are kept under their own names, as the base stored
    them (frozen, any dtype): (N, K) for ``nn.Linear``, (K, N) for ``Conv1D`` (``fan_in_fan_out``;
    every backend reads its transposed view, ``base_weight()``). A quantized base is kept whole as
    ``base_layer`` (PEFT's name; ``weight`` and ``bias`` read through to it): its own forward gives
    ``x W^T + b`` and ``ops.lowrank_add`` adds the paths. Other bases are refused (``base.py``).

    Standalone: ``SharedLoRALinear(nn.Linear(1024, 1024), r=16, alpha=32)`` builds one plain path
    whose A (r, K) and B (N, r) live in the layer's own store (``layer.adapters``).
    Shared: pass ``paths`` (LoRAPathModules reading a store that the caller owns, e.g. the model's).
    The layer starts in the train/eval mode of ``base``. ``input_group``: the ``grouping.InputGroup``
    this layer computes with (set by ``grouping.enable_input_groups``), or None.

    Named adapters: ``adapter_paths[name]`` is adapter ``name``'s path list (``adapter_name`` names
    the first; ``add_adapter`` adds more) and ``adapter_dropout[name]`` its dropout, both read-only
    (changed through ``add_adapter`` / ``delete_adapter``, which keep the call plans in step).
    Forward computes ``active_path_modules()``: the paths of the active adapters (``set_adapter``),
    none while ``enable_adapters(False)``; while an adapter is merged (``merged_adapters``) the base alone.
    ``_paths_version`` names what forward computes (the adapters' path lists, which are active,
    disabled or merged), so state derived from the paths can be cached against it: switching back to
    an earlier state (the reference pass under ``disable_adapter()``, two adapters in turn) finds
    what was cached for it.
    """

    is_sharelora_layer = True  # base.WRAPPED_MARK: how targeting tells a wrapped module without importing this class

    def __init__(self, base: nn.Module, paths: Sequence[LoRAPathModule] | None = None, *, r: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.layout = describe_base(base)
        dropout = check_dropout(dropout)
        check_adapter_name(adapter_name)
        self.in_features, self.out_features = self.layout.in_features, self.layout.out_features
        self.fan_in_fan_out = self.layout.transposed
        if self.layout.computes_itself:
            self.base_layer = base.requires_grad_(False)
            if self.layout.kind == "bnb_4bit":
                check_4bit_layouts(base)
                keep_standard_4bit_layout(base)
        else:
            self.weight = base.weight
            self.register_parameter("bias", base.bias)  # registered even when None: a bias set later is seen
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        self._base = (base,)  # the module unload() puts back (not registered: its tensors are ours)
        if paths is None:
            paths = [self._own_plain_path(r, alpha, use_rslora, new_adapter_dtype(base))]
        _check_path_modules(paths)
        self.adapter_paths = AdapterPaths()
        self.adapter_paths._set(adapter_name, paths)
        self._adapter_dropout = {adapter_name: dropout}
        self._active_adapter = [adapter_name]
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._adapters_version = 0  # bumped when an adapter's path list is added or deleted
        self._paths_changed()
        self.input_group = None
        # The call plan (ops.call_plan) depends on _paths_version besides x and the tensors it reads.
        self._plan = None  # the plan of the last call
        self._plans = {}  # environment -> plan, a few kept (grad on / off under reentrant checkpointing, ...)
        self._mixed_tables = None  # serving.layer_tables' cache: the tables (and stacked copies) of every adapter
        self.train(base.training)

    @property
    def mixed_batch(self):
        """The ``serving.MixedBatch`` of the mixed-adapter batch this thread runs on the layer
        (``serving.mixed_batch``), or None: each thread has its own, so a block in one thread neither
        reaches another's calls nor is undone by another's block ending."""
        return _MIXED.batches.get(id(self))

    @mixed_batch.setter
    def mixed_batch(self, batch) -> None:
        batches = _MIXED.batches
        if batch is None:
            batches.pop(id(self), None)
        else:
            batches[id(self)] = batch

    # ---------------------------------------------------------------------------- named adapters
    def active_path_modules(self) -> list[LoRAPathModule]:
        """The path modules forward computes: those of the active adapters this layer has, in order;
        none while adapters are disabled. ``_paths_version`` changes whenever this list may change."""
        if self._disable_adapters:
            return []
        return [m for name in self._active_adapter if name in self.adapter_paths for m in self.adapter_paths[name]]

    @property
    def lora_paths(self) -> list[LoRAPathModule]:
        """The path modules forward computes (``active_path_modules()``)."""
        return self.active_path_modules()

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_dropout(self) -> Mapping[str, float]:
        """Adapter name -> its dropout probability (read-only: set when the adapter is added)."""
        return MappingProxyType(self._adapter_dropout)

    @property
    def dropout(self) -> float:
        """The dropout probability of the active adapters (they agree; 0.0 when none is active)."""
        drops = self._adapter_dropout
        return next((drops[n] for n in self._active_adapter if n in drops), 0.0)

    def add_adapter(self, name: str, paths: Sequence[LoRAPathModule], dropout: float = 0.0) -> None:
        """Add the paths of adapter ``name`` (not made active)."""
        check_adapter_name(name)
        dropout = check_dropout(dropout)
        if name in self.adapter_paths:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        _check_path_modules(paths)
        self.adapter_paths._set(name, paths)
        self._adapter_dropout[name] = dropout
        self._adapters_version += 1
        self._paths_changed()

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Make ``adapter_names`` the active adapter(s) (names this layer lacks compute nothing here)."""
        names = adapter_name_list(adapter_names)
        drops = {self._adapter_dropout[n] for n in names if n in self._adapter_dropout}
        if len(drops) > 1:
            raise ValueError(f"active adapters {names} have different dropout {sorted(drops)}: one layer applies "
                             "one dropout to its input")
        self._active_adapter = names
        self._paths_changed()

    def enable_adapters(self, enabled: bool) -> None:
        """Compute the active adapters (True) or the base alone (False: merged adapters are unmerged
        first, and stay unmerged, as PEFT's LoRA does)."""
        if not enabled:
            self.unmerge()
        self._disable_adapters = not enabled
        self._paths_changed()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``'s paths (it must not be merged); an active one leaves the active list."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into this layer's weight: unmerge it first")
        if name in self.adapter_paths:
            self.adapter_paths._remove(name)
            del self._adapter_dropout[name]
        self._active_adapter = [n for n in self._active_adapter if n != name]
        self.drop_cached()  # they hold the adapter's tensors
        self._adapters_version += 1
        self._paths_changed()

    def drop_cached(self) -> None:
        """Drop what this layer (and its input group) keeps built from its tensors: call plans and the
        mixed batches' tables hold views or copies of them, which would keep a deleted adapter's or a
        converted tensor's old storage alive (and block ``torch.utils.swap_tensors``). Rebuilt by the
        next call that needs them."""
        self._plan, self._plans, self._mixed_tables = None, {}, None
        if self.input_group is not None:
            self.input_group.clear()

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to()``, ``.half()``, ``.cuda()``, ...) with this layer's cached
        views of the tensors it converts dropped first, and the wrapped module ``unload`` puts back
        pointed at the converted tensors (a conversion that makes new parameters, such as to meta,
        would leave it holding the old ones)."""
        self.drop_cached()
        out = super()._apply(fn, recurse)
        if "weight" in self._parameters:  # a dense base (whose weight prune / weight_norm did not replace)
            self.base_module()
        return out

    def _paths_changed(self) -> None:
        """Set ``_paths_version`` from the state forward's paths follow from (after any change of it)."""
        self._paths_version = self._paths_state()

    def _paths_state(self) -> tuple:
        """The state forward's paths follow from, read now."""
        return (self._adapters_version, tuple(self._active_adapter), self._disable_adapters,
                tuple(self.merged_adapters))

    def __getattr__(self, name: str):
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            return getattr(self._modules["base_layer"], name)
        return super().__getattr__(name)

    def _own_plain_path(self, r: int, alpha: float, use_rslora: bool, dtype: torch.dtype) -> LoRAPathModule:
        r, alpha = check_int("r", r, minimum=1), check_positive("alpha", alpha)
        check_bool("use_rslora", use_rslora)
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        kw = {"device": self.weight.device, "dtype": dtype}
        specs = {"A": TensorSpec("A", (r, self.in_features), "kaiming_uniform", "lora"),
                 "B": TensorSpec("B", (self.out_features, r), "zeros", "lora")}
        self.adapters = AdapterStore({name: new_parameter(spec, **kw) for name, spec in specs.items()}, specs)
        return LoRAPathModule(PathSpec("plain", "lora", {"A": "A", "B": "B"}, scale, r), self.adapters)

    def base_weight(self) -> Tensor:
        """The dense base weight as (N, K): ``weight`` itself, or for a Conv1D base its transposed view (no copy)."""
        if self.layout.computes_itself:
            raise TypeError(f"a {self.layout.kind} base has no dense weight (base.dequantized_weight builds one)")
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _refuse_parametrizations(self) -> None:
        """NotImplementedError naming the tensors when ``torch.nn.utils.parametrize`` parametrizes the
        base's weight or bias or an adapter tensor, or a dense base's weight is no longer a parameter
        (``prune``, ``weight_norm``): the layer reads its tensors where they are registered."""
        stores = {id(m._store[0]): m._store[0] for ms in self.adapter_paths.values() for m in ms}
        for owner in (self._weight_owner(), *stores.values()):
            if parametrize.is_parametrized(owner):
                names = [name.replace("/", ".") for name in owner.parametrizations]
                raise NotImplementedError(f"torch.nn.utils.parametrize on {names} of a ShareLoRA layer is not supported "
                                          "(its tensors are read as registered parameters): remove it with "
                                          "parametrize.remove_parametrizations")
        if not self.layout.computes_itself and "weight" not in self._parameters:
            raise NotImplementedError("the base weight of a ShareLoRA layer is no longer a registered parameter "
                                      "(torch.nn.utils.prune, weight_norm or spectral_norm computes it now): not "
                                      "supported; remove it with prune.remove / remove_weight_norm / "
                                      "remove_spectral_norm")
        for m in (m for ms in self.adapter_paths.values() for m in ms):
            gone = [name for name in m.spec.tensors.values() if name.replace(".", "/") not in m._store[0]._parameters]
            if gone:
                raise NotImplementedError(f"adapter tensor {gone[0]!r} of a ShareLoRA layer is no longer a registered "
                                          "parameter of its store (torch.nn.utils.prune, weight_norm or spectral_norm "
                                          "computes it now): not supported; remove it with prune.remove / "
                                          "remove_weight_norm / remove_spectral_norm")

    def paths(self, adapter_names: Sequence[str] | None = None) -> list[LoRAPath]:
        """The paths forward computes, or with ``adapter_names`` those of these adapters."""
        self._refuse_parametrizations()
        if adapter_names is None:
            return [m.as_path() for m in self.active_path_modules()]
        return [m.as_path() for n in adapter_names if n in self.adapter_paths for m in self.adapter_paths[n]]

    def _sources(self) -> list[call_plan.Source]:
        """Where every tensor a call reads lives (the base's weight and bias, each path's spec, store
        and tensors). A base that computes itself is called, not read: the plan watches the module
        (and a 4-bit base's compute dtype), not its weight, which bitsandbytes repacks on the CPU
        between eval and training passes."""
        if self.layout.computes_itself:
            sources = [call_plan.source(self._modules, "base_layer")]
            if "compute_dtype" in self.base_layer.__dict__:
                sources.append(call_plan.source(self.base_layer.__dict__, "compute_dtype"))
        else:
            sources = [call_plan.source(self._parameters, "weight"), call_plan.source(self._parameters, "bias")]
        for m in self.active_path_modules():
            sources += [call_plan.source(m.__dict__, "spec"), call_plan.source(m.__dict__, "_store")]
            store = m._store[0]._parameters
            sources += [call_plan.source(store, name.replace(".", "/")) for name in m.spec.tensors.values()]
        return sources

    def __getstate__(self) -> dict:
        """Copies and pickles do not take the call plans (rebuilt on the first call) nor the mixed
        batches' tables (rebuilt by the first mixed batch)."""
        return {**self.__dict__, "_plan": None, "_plans": {}, "_mixed_tables": None}

    def forward(self, x: Tensor) -> Tensor:
        if _transforms_active():  # one C call: the steady-state call's host time counts
            _refuse_transforms()
        if self.mixed_batch is not None:  # each row its own adapter (serving.mixed_batch)
            return self.mixed_batch.forward(self, x)
        if self.input_group is not None:
            return self.input_group.forward(self, x)
        return self.forward_alone(x)

    def forward_alone(self, x: Tensor) -> Tensor:
        """This layer's own op (also what its input group runs when the group cannot run together).

        Eager calls run the layer's call plan (``ops.call_plan``), rebuilt when what it was built
        from changed; under ``torch.compile`` dynamo traces ``_forward_traced``."""
        if _is_compiling():  # before x.shape[-1]: dynamo does not turn a 0-d x's IndexError into ours
            return self._forward_traced(x)
        try:  # every Python-level step here costs host time of every call: a 0-d x is told by its shape
            features = x.shape[-1]
        except IndexError:
            raise _features_error(x, self.in_features) from None
        if features != self.in_features:
            raise _features_error(x, self.in_features)
        env = call_plan.environment(x, self.training, self._paths_version)
        plan = self._plan
        if plan is None or not plan.fits(env):
            self.__dict__["_plan"] = None  # none keeps a replaced tensor's storage alive
            plan = call_plan.kept_or_built(self._plans, env, lambda: self._build_plan(x, env),
                                           lambda: (self.training, self._paths_state()))
            if self._plans.get(env) is plan:  # else built while another thread switched the layer
                self.__dict__["_plan"] = plan
        if plan.adds_to_base:
            return self._run_computing_base(plan, x)
        return plan.run(x)

    def _check_call(self, x: Tensor) -> None:
        """The checks of a call (run when its plan is built, and by every traced call)."""
        self._refuse_parametrizations()
        if x.device != self.weight.device:
            raise ValueError(f"input is on {x.device}, the layer's weight on {self.weight.device}")
        if not self.layout.computes_itself and x.dtype != self.weight.dtype and not autocast_enabled(x.device.type):
            raise ValueError(f"input dtype {x.dtype} does not match the weight dtype {self.weight.dtype}")

    def _build_plan(self, x: Tensor, env: tuple) -> call_plan.CallPlan:
        """The call plan of x's environment ``env``, its inputs checked."""
        self._check_call(x)
        sources = self._sources()
        paths = [] if self.merged else self.paths()
        if self.layout.computes_itself:
            dtype = compute_dtype(self.base_layer, self.layout, x)
            return call_plan.build_lowrank(env, sources, x, self.out_features, paths, self.dropout, self.training,
                                           dtype)
        return call_plan.build_linear(env, sources, x, self.base_weight(), self.bias, paths, self.dropout,
                                      self.training)

    def _forward_traced(self, x: Tensor) -> Tensor:
        """The router's call, which dynamo traces into one graph (custom ops for the kernels)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise _features_error(x, self.in_features)
        self._check_call(x)
        if self.layout.computes_itself:
            return self._forward_computing_base(x)
        weight = self.base_weight()
        paths = self.active_path_modules()
        if self.merged or not paths:
            return F.linear(x, weight, self.bias)
        return ops.lora_linear(x, weight, self.bias, [m.as_path() for m in paths], self.dropout, self.training)

    def _base_output(self, x: Tensor) -> Tensor:
        """A quantized base's own forward ``x W^T + b``."""
        if self.layout.kind == "bnb_4bit":
            if x.numel() == 0:  # bitsandbytes' CPU 4-bit inference kernel dies (SIGFPE) on an empty batch;
                with no_autocast(x.device.type):  # its output is in x's dtype, as bitsandbytes returns it
                    return F.linear(x, x.new_zeros(self.out_features, self.in_features))
            if torch.is_grad_enabled() and (self.training or x.requires_grad):
                standard_4bit_layout(self.base_layer)  # after an eval pass on the CPU: a layout with a backward
        return self.base_layer(x)

    def _run_computing_base(self, plan: call_plan.CallPlan, x: Tensor) -> Tensor:
        """A quantized base's own forward, then the plan adds the paths into its output in place."""
        y = self._base_output(x)
        if plan.backend == "base":
            return y
        return plan.run(y, x)

    def _forward_computing_base(self, x: Tensor) -> Tensor:
        """A quantized base's own forward, then the paths added into its output in place."""
        dtype = compute_dtype(self.base_layer, self.layout, x)
        y = self._base_output(x)
        paths = self.active_path_modules()
        if self.merged or not paths:
            return y
        return ops.lowrank_add(y, x, [m.as_path() for m in paths], self.dropout, self.training, dtype)

    @torch.no_grad()
    def delta_weight(self, adapter_names: Sequence[str] | None = None) -> Tensor:
        """sum_p s_p B_p A_p as an (N, K) float32 (or float64) matrix, over the paths forward computes
        (or those of ``adapter_names``)."""
        paths = [p._replace(tensors=tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in p.tensors))
                 for p in self.paths(adapter_names)]
        return delta_weight(paths, self.in_features, self.out_features)

    def _weight_owner(self) -> nn.Module:
        return self.base_layer if self.layout.computes_itself else self

    def adapters_to_merge(self, adapter_names: Sequence[str] | None = None) -> list[str]:
        """The adapters ``merge`` folds in: the active ones (or ``adapter_names``) this layer has, not merged yet."""
        return [n for n in (self.active_adapters if adapter_names is None else adapter_name_list(adapter_names))
                if n in self.adapter_paths and n not in self.merged_adapters]

    def merge_is_finite(self, adapter_names: Sequence[str] | None = None) -> bool:
        """Whether ``merge`` of the active adapters (or ``adapter_names``) keeps the base weight finite
        (what ``safe_merge`` checks), without merging."""
        names = self.adapters_to_merge(adapter_names)
        return not names or merge_keeps_finite(self._weight_owner(), self.layout, self.delta_weight(names))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold the active adapters (or ``adapter_names``) into the base weight; forward then runs the base
        matmul only. A quantized base is requantized (``base.add_to_weight_``: the update is rounded to its
        grid). ``safe_merge``: check the merged weight for non-finite values before writing it. Refused
        (ValueError, nothing changed) while adapters are disabled or a mixed-adapter batch runs."""
        names = self.adapters_to_merge(adapter_names)
        if not names:
            return
        if self._disable_adapters:  # PEFT unmerges at the next forward; a merge would otherwise be computed
            raise ValueError("adapters are disabled (disable_adapters): a merge now would make the disabled model "
                             "compute them; merge after the block, or enable adapters first")
        if self.mixed_batch is not None:  # its rows add their own adapters to the base: not to a merged one
            raise ValueError("a mixed-adapter batch is running on this layer (mixed_batch / adapter_names): merge "
                             "after it")
        delta = self.delta_weight(names)
        if safe_merge and not merge_keeps_finite(self._weight_owner(), self.layout, delta):
            raise ValueError(f"merging adapter(s) {names} would put non-finite values into the base weight")
        add_to_weight_(self._weight_owner(), self.layout, delta)
        self.merged_adapters.extend(names)
        self._paths_changed()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapters out of the base weight again (within its dtype's rounding; a quantized
        base is requantized, so its weight does not come back bit for bit)."""
        if self.merged_adapters:
            add_to_weight_(self._weight_owner(), self.layout, -self.delta_weight(self.merged_adapters))
            self.merged_adapters = []
            self._paths_changed()

    def base_module(self) -> nn.Module:
        """The module this layer wrapped, holding the current (possibly merged) base weight: what unload puts back."""
        base = self._base[0]
        if not self.layout.computes_itself:  # the layer's tensors may have been replaced (assign=True loads, FSDP)
            base.weight = self.weight
            base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        kind = f", base={self.layout.kind}" if self.layout.computes_itself else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, dropout={self.dropout}, "
                f"merged={self.merged}, adapters={list(self.adapter_paths)}, active={self.active_adapters}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "") + kind)
