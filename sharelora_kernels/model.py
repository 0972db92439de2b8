"""apply(): wrap a model's target modules so that every planned tensor exists exactly once.

Also the model-level helpers: parameter accounting, merge / unmerge, and the map from plan tensor
names to the live ``nn.Parameter`` objects (used by checkpoints and export), for models made by
``apply`` and for modules holding hand-wrapped ``SharedLoRALinear`` layers alike.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .base import check_4bit_layouts, keep_standard_4bit_layouts, new_adapter_dtype
from .config import ShareLoRAConfig, check_bool
from .grouping import check_known_architecture, disable_input_groups, enable_input_groups
from .layer import (DEFAULT_ADAPTER, STORE_ATTR, AdapterStore, AdapterStores, LoRAPathModule, SharedLoRALinear,
                    adapter_name_list, check_adapter_name, new_parameter)
from .plan import HAND_WRAPPED, ModuleInfo, ModulePlan, SharePlan, TensorSpec, build_plan
from .targeting import (check_no_peft, find_modules_to_save, find_target_modules, layer_position, module_type,
                        type_labels)

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Writes one named adapter's checkpoint into a folder: (model, folder, adapter name). Set by
# checkpoint.py (a higher layer) so that a Transformers model's save_pretrained writes its adapters.
ADAPTER_WRITERS: list[Callable[[nn.Module, Path, str], None]] = []


def apply(model: nn.Module, config: ShareLoRAConfig, group_inputs: bool = False,
          adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add ShareLoRA adapters to ``model`` in place and return it.

    Freezes every base parameter, creates each planned tensor once (on the device of its first user,
    the meta device included), and replaces each target module (``nn.Linear`` or ``Conv1D``, chosen
    by ``targeting``) by a ``SharedLoRALinear`` whose paths read the (possibly shared) parameters;
    the ``modules_to_save`` train in full. Fresh adapters leave the outputs unchanged, and each new
    layer keeps the train/eval mode of the one it replaces.
    group_inputs: also let the modules that read one input (q/k/v, gate/up) run as one grouped op
    (``grouping.enable_input_groups``; LLaMA / Mistral / Qwen2 only).
    adapter_name: the adapter's name. A model holds several named adapters, each with its own
    tensors; the first one is active (computed and trained), a later one is added frozen and
    inactive until ``set_adapter(model, name)`` (PEFT's rule). Only the first may have modules to save.
    Every check runs before the model is touched: a call that raises leaves it as it was.
    """
    check_bool("group_inputs", group_inputs)
    if group_inputs:
        check_known_architecture(model)
    return apply_plan(model, config, plan_model(model, config, adapter_name), group_inputs, adapter_name)


def plan_model(model: nn.Module, config: ShareLoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> SharePlan:
    """The share plan ``apply(model, config, adapter_name=...)`` would build, without changing the
    model; raises what apply would raise (an adapter of that name already there, PEFT adapters, a
    config or model misfit)."""
    if not isinstance(model, nn.Module) or not isinstance(config, ShareLoRAConfig):
        raise TypeError(f"apply takes a torch.nn.Module and a ShareLoRAConfig, got a {type(model).__name__} and a "
                        f"{type(config).__name__}")
    check_not_compiled(model, "apply")
    check_adapter_name(adapter_name)
    names = adapter_names(model)
    if adapter_name in names:
        raise ValueError(f"this model already has ShareLoRA adapters, one named {adapter_name!r} (adapters: {names}); "
                         "pass another adapter_name to add one")
    check_no_peft(model)
    check_4bit_layouts(model)
    config.validate()  # it may have been edited since it was made
    infos, num_layers = find_target_modules(model, config, wrapped_ok=is_applied(model))
    saved = find_modules_to_save(model, config)
    if saved and names:
        owners = [(n, p.modules_to_save) for n, p in model.sharelora_plans.items() if p.modules_to_save]
        reason = (f"this model's adapter {owners[0][0]!r} owns modules to save ({owners[0][1]})" if owners else
                  f"only the first adapter of a model may have them (this one has adapters {names})")
        raise ValueError(f"modules_to_save {saved} train in full in place, and {reason}: pass modules_to_save=[] "
                         f"for adapter {adapter_name!r} (PEFT's method keeps a copy per adapter)")
    _check_trainable_in_full(model, saved)
    plan = build_plan(config, infos, num_layers, saved)
    check_bank_room(model, plan, adapter_name)
    return plan


def apply_plan(model: nn.Module, config: ShareLoRAConfig, plan: SharePlan, group_inputs: bool = False,
               adapter_name: str = DEFAULT_ADAPTER, layer_cls: type[SharedLoRALinear] = SharedLoRALinear,
               on_meta: bool = False) -> nn.Module:
    """``apply`` with the plan ``plan_model(model, config, adapter_name)`` already made (``load``
    compares it with a checkpoint's first); it changes the model and raises nothing more.
    ``layer_cls``: the class of new wrapped layers (a subclass, e.g. the PEFT method's); ``on_meta``:
    the adapter's tensors made on the meta device, for a load to fill (PEFT's ``low_cpu_mem_usage``)."""
    first = not adapter_names(model)
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    keep_standard_4bit_layouts(model)
    first_user = _first_users(plan)
    params: dict[str, nn.Parameter] = {}
    for name, spec in plan.tensors.items():
        base = _base_of(model.get_submodule(first_user[name]))
        device = torch.device("meta") if on_meta else base.weight.device
        params[name] = new_parameter(spec, device=device, dtype=new_adapter_dtype(base))
    store = AdapterStore(params, plan.tensors).train(model.training).requires_grad_(first)
    active = [adapter_name] if first else model.sharelora_active
    for name, mplan in plan.modules.items():
        paths = [LoRAPathModule(p, store) for p in mplan.paths]
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        target = getattr(parent, leaf)
        if isinstance(target, SharedLoRALinear):
            target.add_adapter(adapter_name, paths, config.dropout)
        else:
            layer = layer_cls(target, paths, dropout=config.dropout, adapter_name=adapter_name)
            layer.set_adapter(active)
            setattr(parent, leaf, layer)
    if first:  # layers left wrapped by deleted adapters compute the new one too
        for layer in shared_layers(model):
            layer.set_adapter(active)
    put_store(store_host(model, plan), adapter_name, store)
    for name in plan.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    if first:
        model.sharelora_plans, model.sharelora_configs, model.sharelora_active = {}, {}, active
        model._sharelora_applied = {}
    model.sharelora_plans[adapter_name] = plan
    model.sharelora_configs[adapter_name] = copy.deepcopy(config)  # the caller's may be edited and applied again
    model._sharelora_applied[adapter_name] = config.to_dict()  # what the layers are built from (applied_config)
    _point_at_active(model)
    if first and callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = SavePretrainedWithAdapters(model)
    if activation_checkpointing_on(model):
        # reentrant checkpointing passes gradient into a block only if its input requires grad;
        # with a frozen embedding it would not (PEFT does the same; Transformers 5 does it when
        # checkpointing is enabled later, 4.x does not: call it yourself there)
        model.enable_input_require_grads()
    if group_inputs:
        enable_input_groups(model)
    return model


def activation_checkpointing_on(model: nn.Module) -> bool:
    """Whether a Transformers model has (gradient / activation) checkpointing on, read through the
    attribute of the installed version: ``is_activation_checkpointing`` (Transformers 5), else
    ``is_gradient_checkpointing`` (4.x; a deprecated alias in 5, so never read there)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(model), attr, None), property):
            return bool(getattr(model, attr))
    return False


def store_host(model: nn.Module, plan: SharePlan) -> nn.Module:
    """The module the adapter store is registered on (as ``sharelora_adapters``): the root, or for a
    container root (``nn.Sequential`` runs its children, ``ModuleList`` / ``ModuleDict`` iterate
    them) its first wrapped layer, where it changes nothing the root runs."""
    return model.get_submodule(next(iter(plan.modules))) if isinstance(model, CONTAINERS) else model


def _check_trainable_in_full(model: nn.Module, saved: list[str]) -> None:
    """ValueError if a module to save cannot train in full: it holds a tensor that is not floating point
    (a quantized module), or shares a parameter with a module outside it (training it would change
    that one too)."""
    for name in saved:
        module = model.get_submodule(name)
        for pname, p in module.named_parameters():
            if not p.is_floating_point():
                raise ValueError(f"modules_to_save entry {name!r} is quantized ({pname} is {p.dtype}) and cannot "
                                 "train in full: leave it out (modules_to_save=[...] without it), or load the model "
                                 "with it unquantized (BitsAndBytesConfig(llm_int8_skip_modules=[...]))")
        inside = {id(p) for p in module.parameters()}
        for pname, p in model.named_parameters(remove_duplicate=False):
            if id(p) in inside and not pname.startswith(f"{name}."):
                raise ValueError(f"modules_to_save entry {name!r} shares a parameter with {pname!r} (tied weights); "
                                 "training it in full would change that module too")


# ----------------------------------------------------------------------------- the adapter bank
class BankFullError(ValueError):
    """Adding an adapter would take the model's adapter bank past a limit set by ``set_bank_limit``."""


def peft_base(model: nn.Module) -> nn.Module:
    """The model a PeftModel wraps (its ``get_base_model()``), or ``model`` itself; of a model
    ``torch.compile`` wrapped, that of the module it compiled (``_orig_mod``)."""
    model = getattr(model, "_orig_mod", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_peft_class(module: nn.Module, name: str) -> bool:
    """Whether ``module`` is an instance of PEFT's class ``name`` (told by its classes' names and
    modules, without importing PEFT)."""
    return any(c.__name__ == name and c.__module__.startswith("peft.") for c in type(module).__mro__)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``."""
    return _is_peft_class(model, "PeftModel")


def check_not_peft_model(model: nn.Module, what: str) -> None:
    """ValueError for a PeftModel, or the model inside one (its layers are PEFT tuner layers): its
    adapters are switched, deleted and unloaded through the PeftModel's own methods, which keep
    PEFT's record of them (active adapter, modules-to-save copies, configs) in step."""
    if is_peft_model(model):
        raise ValueError(f"this is a PeftModel: call its own {what} (model.{what}(...)), which keeps PEFT's record "
                         "of its adapters in step")
    if any(_is_peft_class(layer, "BaseTunerLayer") for layer in shared_layers(model)):
        raise ValueError(f"this model's adapters belong to the PeftModel around it: call that PeftModel's own {what} "
                         f"(peft_model.{what}(...)), which keeps PEFT's record of its adapters in step")


def check_not_compiled(model: nn.Module, what: str) -> None:
    """TypeError for a ``torch.compile`` wrapper (``OptimizedModule``): ``what`` adds or removes the
    model's modules and the attributes that record its adapters, which belong on the model itself."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise TypeError(f"{what} changes the model's modules, and this is a torch.compile wrapper of the model: call "
                        f"{what} on the model itself (the wrapper's _orig_mod)")


def peft_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each of PEFT's modules-to-save wrappers (``AuxiliaryTrainingWrapper``, which
    keep a copy of a module per adapter) in the model a PeftModel wraps (``peft_base``), named as it
    names them; found by class, without importing PEFT."""
    return [(n, m) for n, m in peft_base(model).named_modules() if _is_peft_class(m, "AuxiliaryTrainingWrapper")]


def set_bank_limit(model: nn.Module, max_adapters: int | None = None, max_bytes: int | None = None) -> nn.Module:
    """Limit the model's adapter bank: at most ``max_adapters`` named adapters, at most ``max_bytes``
    bytes of adapter tensors (``adapter_memory``: each unique tensor once); None: no limit (both None
    lifts the limits). Adding an adapter past a limit (``apply`` / ``load`` with ``adapter_name=``,
    PEFT's ``add_adapter`` / ``load_adapter``) raises ``BankFullError`` naming the limit and the
    adapter, before the model changes. ValueError for a limit the bank already exceeds. A PEFT model:
    pass it or its base model."""
    model = peft_base(model)  # a PeftModel: the limit lives on the model it wraps
    for name, value in (("max_adapters", max_adapters), ("max_bytes", max_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    held = adapter_memory(model)
    if max_adapters is not None and len(held) > max_adapters:
        raise ValueError(f"the adapter bank holds {len(held)} adapters {list(held)}, more than max_adapters="
                         f"{max_adapters}: delete_adapter some first")
    if max_bytes is not None and sum(held.values()) > max_bytes:
        raise ValueError(f"the adapter bank holds {sum(held.values())} bytes, more than max_bytes={max_bytes}: "
                         "delete_adapter some first")
    model.sharelora_bank_limit = (max_adapters, max_bytes)
    return model


def adapter_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of each named adapter's tensors, each unique storage counted once (a shared tensor once,
    however many layers read it), with a PEFT model's copies of its modules to save that belong to
    the adapter (``saved_copies``): adapter name -> bytes, in the order the adapters were added
    (hand-wrapped layers: the adapters they hold, by name)."""
    copies = saved_copies(model)
    if is_applied(model):
        held = {name: list(adapter_store(model, name).parameters()) for name in adapter_names(model)}
    else:
        held = {}
        for layer in shared_layers(model):
            for name, paths in layer.adapter_paths.items():
                held.setdefault(name, []).extend(t for m in paths for t in m.as_path().tensors)
    out = {}
    for name, tensors in held.items():
        # id -> storage: one Python object per storage (for meta tensors too, whose data_ptr is 0)
        storages = {}
        for p in [*tensors, *copies.get(name, [])]:
            s = p.untyped_storage()
            storages[id(s)] = s
        out[name] = sum(s.nbytes() for s in storages.values())
    return out


def saved_copies(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The tensors of a PEFT model's per-adapter copies of its modules to save (PEFT's
    ``ModulesToSaveWrapper``: an ``original_module`` and one copy per adapter in ``modules_to_save``):
    adapter name -> their parameters and buffers. Empty for a model without them."""
    out: dict[str, list[torch.Tensor]] = {}
    for m in model.modules():
        copies = getattr(m, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and hasattr(m, "original_module"):
            for name, module in copies.items():
                out.setdefault(name, []).extend([*module.parameters(), *module.buffers()])
    return out


def planned_bytes(model: nn.Module, plan: SharePlan) -> int:
    """Bytes the tensors of ``plan`` will take once ``apply_plan`` creates them on ``model``."""
    first_user = _first_users(plan)
    return sum(math.prod(spec.shape) * new_adapter_dtype(_base_of(model.get_submodule(first_user[name]))).itemsize
               for name, spec in plan.tensors.items())


def check_bank_room(model: nn.Module, plan: SharePlan, adapter_name: str, extra_bytes: int = 0) -> None:
    """BankFullError when adding adapter ``adapter_name`` (plan ``plan``, and ``extra_bytes`` of
    other tensors it brings: a PEFT model's copies of its modules to save) would take the bank past a
    limit of ``set_bank_limit``; nothing when no limit is set."""
    max_adapters, max_bytes = getattr(model, "sharelora_bank_limit", (None, None))
    if max_adapters is None and max_bytes is None:
        return
    held = adapter_memory(model)
    if max_adapters is not None and len(held) + 1 > max_adapters:
        raise BankFullError(f"no room for adapter {adapter_name!r}: the adapter bank holds {len(held)} adapters "
                            f"{list(held)}, its limit is max_adapters={max_adapters} (set_bank_limit): delete_adapter "
                            "one first, or raise the limit")
    new = planned_bytes(model, plan) + extra_bytes
    if max_bytes is not None and sum(held.values()) + new > max_bytes:
        raise BankFullError(f"no room for adapter {adapter_name!r} ({new} bytes): the adapter bank holds "
                            f"{sum(held.values())} bytes in {list(held)}, its limit is max_bytes={max_bytes} "
                            "(set_bank_limit): delete_adapter one first, or raise the limit")


def _first_users(plan: SharePlan) -> dict[str, str]:
    first: dict[str, str] = {}
    for name, mplan in plan.modules.items():
        for p in mplan.paths:
            for t in p.tensors.values():
                first.setdefault(t, name)
    return first


def keep_base_dtypes(model: nn.Module, adapter_name: str) -> None:
    """Put adapter ``adapter_name``'s tensors in the dtype of the base they were made on (the first
    module reading each, as ``apply_plan`` picks it), not float32 where that base is half precision:
    PEFT's ``autocast_adapter_dtype=False`` (a quantized base's adapters stay float32)."""
    first_user = _first_users(model.sharelora_plans[adapter_name])
    for name, t in adapter_tensors(model, adapter_name).items():
        t.data = t.data.to(new_adapter_dtype(_base_of(model.get_submodule(first_user[name])), autocast=False))


def put_store(host: nn.Module, adapter_name: str, store: AdapterStore) -> None:
    """Register adapter ``adapter_name``'s store in ``host``'s ``AdapterStores`` (made on the first)."""
    if STORE_ATTR not in host._modules:
        setattr(host, STORE_ATTR, AdapterStores().train(store.training))
        host.register_load_state_dict_pre_hook(_earlier_store_keys)
    host._modules[STORE_ATTR][adapter_name] = store


def remove_store(host: nn.Module, adapter_name: str) -> None:
    """Take adapter ``adapter_name``'s store out of ``host`` (with the last one, the ``AdapterStores``)."""
    stores = host._modules[STORE_ATTR]
    del stores[adapter_name]
    if not len(stores):
        delattr(host, STORE_ATTR)
        hooks = host._load_state_dict_pre_hooks  # nn.Module's wrapped hooks keep the function as .hook
        for key in [k for k, h in hooks.items() if getattr(h, "hook", None) is _earlier_store_keys]:
            del hooks[key]


def _earlier_store_keys(host: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A load pre-hook of a store host: keys of the layout before ``AdapterStores`` (a store per adapter
    on the host: ``sharelora_adapters.<tensor>`` for "default", ``sharelora_adapters_<name>.<tensor>``
    for the others; a Trainer checkpoint made then) renamed to this one's before anything loads."""
    head = prefix + STORE_ATTR
    for key in [k for k in state_dict if k.startswith(head) and k.count(".", len(head)) == 1]:
        name, _, tensor = key[len(head):].partition(".")
        if name == "" or name.startswith("_"):
            state_dict[f"{head}.{name[1:] or DEFAULT_ADAPTER}.{tensor}"] = state_dict.pop(key)


def is_applied(model: nn.Module) -> bool:
    """Whether ``apply`` set ``model`` up for named adapters (its wrapped layers take new ones, even
    after every adapter was deleted), as opposed to a bare or hand-wrapped model."""
    return getattr(model, "sharelora_plans", None) is not None


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters ``apply`` / ``load`` added to ``model``, in the order they were added."""
    return list(getattr(model, "sharelora_plans", None) or {})


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the model's active adapters (those its layers compute and train)."""
    return list(getattr(model, "sharelora_active", None) or [])


def check_known(model: nn.Module, names: Sequence[str]) -> None:
    """ValueError naming the first of ``names`` that is not an adapter of ``model``, and the known ones."""
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise ValueError(f"this model has no adapter named {n!r}; its adapters are {known}")


def resolve_adapter(model: nn.Module, adapter_name: str | None) -> str:
    """``adapter_name``, checked; None: the one active adapter (ValueError when several or none are)."""
    if adapter_name is not None:
        check_known(model, [adapter_name])
        return adapter_name
    active = active_adapters(model)
    if len(active) != 1:
        raise ValueError(f"this model has {len(active)} active adapters ({active}; all: {adapter_names(model)}) and "
                         "this call reads one: name it with adapter_name= where the function takes it, or make one "
                         "active first with sharelora_kernels.set_adapter(model, name)")
    return active[0]


def get_plan(model: nn.Module, adapter_name: str | None = None) -> SharePlan:
    """The share plan of adapter ``adapter_name`` (None: the active one) as ``apply`` made it, or one
    read off the model's hand-wrapped layers."""
    if not adapter_names(model):
        return _hand_wrapped(model, adapter_name)[0]
    return model.sharelora_plans[resolve_adapter(model, adapter_name)]


def applied_config(model: nn.Module, adapter_name: str) -> ShareLoRAConfig:
    """The config adapter ``adapter_name`` was applied with; ValueError naming the fields changed on
    it since (its layers follow the config as ``apply`` read it, and a checkpoint saying otherwise
    would not load, or would build other layers)."""
    config = model.sharelora_configs[adapter_name]
    check_config_unchanged(model._sharelora_applied[adapter_name], adapter_name, config)
    return config


def check_config_unchanged(applied: dict, adapter_name: str, config: ShareLoRAConfig) -> None:
    """ValueError naming the fields in which ``config`` differs from ``applied``, the ``to_dict()`` of
    the config adapter ``adapter_name`` was applied with."""
    now = config.to_dict()
    changed = [f"{k}: {applied[k]!r} -> {now[k]!r}" for k in applied if now[k] != applied[k]]
    if changed:
        raise ValueError(f"the config of adapter {adapter_name!r} was changed after apply ({'; '.join(changed)}), "
                         "but its layers were built from the config as apply read it: set the field back, or "
                         "apply the changed config to a fresh model")


def adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """Plan tensor name -> the live parameter (each shared tensor once), in plan order, of adapter
    ``adapter_name`` (None: the active one)."""
    if not adapter_names(model):
        return _hand_wrapped(model, adapter_name)[1]
    name = resolve_adapter(model, adapter_name)
    plan = model.sharelora_plans[name]
    store = adapter_store(model, name)
    return {t: store[t] for t in plan.tensors}


def adapter_parameters(module: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The adapter tensors the ShareLoRA layers under ``module`` (any submodule, or the model) read,
    each once, in module order: of adapter ``adapter_name`` (None: every adapter of those layers).

    A model keeps its adapter tensors in its root's store, so ``module.parameters()`` of a submodule
    lists none of them; this is the list to freeze or give its own optimizer group, for one layer
    or block. A tensor shared with layers outside ``module`` is in the list too (freezing it freezes
    it there as well). ValueError when no layer under ``module`` has ``adapter_name``, or none is a
    ShareLoRA layer."""
    layers = _layers_of_adapters(module)
    if adapter_name is not None and not any(adapter_name in layer.adapter_paths for layer in layers):
        raise ValueError(f"no ShareLoRA layer under this module has an adapter {adapter_name!r}; theirs: "
                         f"{sorted({n for layer in layers for n in layer.adapter_paths})}")
    out = {}
    for layer in layers:
        for name, paths in layer.adapter_paths.items():
            if adapter_name is None or name == adapter_name:
                out.update((id(t), t) for t in paths.parameters())
    return list(out.values())


def _point_at_active(model: nn.Module) -> None:
    """``sharelora_plan`` / ``sharelora_config``: those of the (first) active adapter, or None."""
    active = active_adapters(model)
    model.sharelora_plan = model.sharelora_plans[active[0]] if active else None
    model.sharelora_config = model.sharelora_configs[active[0]] if active else None


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_module() if isinstance(module, SharedLoRALinear) else module


def _hand_wrapped(model: nn.Module, adapter_name: str | None = None) -> tuple[SharePlan, dict[str, nn.Parameter]]:
    """The plan of a module holding hand-wrapped SharedLoRALinears, and its tensors: each tensor is
    named by its parameter name in ``model`` (``"0.adapters.A"``), so layers sharing one are planned so.
    ``adapter_name``: None, or the adapter every layer computes (ValueError naming those they do)."""
    layers = named_shared_layers(model)
    if not layers:
        raise ValueError("this model has no ShareLoRA adapters: call sharelora_kernels.apply(model, config) "
                         "or wrap its layers in SharedLoRALinear first")
    computed = sorted({a for _, layer in layers for a in layer.active_adapters})
    if adapter_name is not None and computed != [adapter_name]:
        raise ValueError(f"this model's hand-wrapped layers compute adapter(s) {computed}, not {adapter_name!r}: "
                         "pass adapter_name=None (or the name they compute)")
    param_names: dict[int, str] = {}
    for pname, p in model.named_parameters():
        param_names.setdefault(id(p), pname)
    labels = type_labels([module_type(n) for n, _ in layers])
    tensors: dict[str, TensorSpec] = {}
    params: dict[str, nn.Parameter] = {}
    modules: dict[str, ModulePlan] = {}
    for name, layer in layers:
        paths = []
        for path in layer.lora_paths:
            store = path._store[0]
            names = {}
            for role, key in path.spec.tensors.items():
                p = store[key]
                global_name = param_names.get(id(p), f"{name}.{key}" if name else key)
                names[role] = global_name
                spec = store.specs.get(key) or TensorSpec(key, tuple(p.shape), "zeros", path.spec.part)
                tensors.setdefault(global_name, dataclasses.replace(spec, name=global_name,
                                                                    module_type=labels[module_type(name)]))
                params[global_name] = p
            paths.append(dataclasses.replace(path.spec, tensors=names))
        index, stack = layer_position(name)
        info = ModuleInfo(name, index, labels[module_type(name)], layer.in_features, layer.out_features, stack)
        modules[name] = ModulePlan(info, paths)
    num_layers = max((m.info.layer for m in modules.values() if m.info.layer is not None), default=-1) + 1
    return SharePlan(HAND_WRAPPED, num_layers, tensors, modules), params


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Adapter parameters per part ("part:local", ...) and per module type ("type:q_proj", ...), and
    the modules trained in full ("part:modules_to_save", "saved:classifier", ...)."""
    plan = get_plan(model)
    out = plan.breakdown()
    for name in plan.modules_to_save:
        n = sum(p.numel() for p in model.get_submodule(name).parameters())
        out["part:modules_to_save"] = out.get("part:modules_to_save", 0) + n
        out[f"saved:{name}"] = n
    return dict(sorted(out.items()))


def shared_layers(model: nn.Module) -> list[SharedLoRALinear]:
    """The model's SharedLoRALinear layers in module order (``named_shared_layers`` without names)."""
    return [m for _, m in named_shared_layers(model)]


def named_shared_layers(model: nn.Module) -> list[tuple[str, SharedLoRALinear]]:
    """(dotted name, layer) of the model's SharedLoRALinear layers in module order, named as
    ``named_modules`` names them (the root ""); their own children (one path module per adapter and
    path) are not walked, so the cost does not grow with the adapters loaded."""
    out, stack, seen = [], [("", model)], set()
    while stack:
        name, m = stack.pop()
        if id(m) in seen:  # a module registered twice counts once, as in model.modules()
            continue
        seen.add(id(m))
        if isinstance(m, SharedLoRALinear):
            out.append((name, m))
        else:
            stack.extend(reversed([(f"{name}.{k}" if name else k, c) for k, c in m._modules.items() if c is not None]))
    return out


def _layers_of_adapters(model: nn.Module) -> list[SharedLoRALinear]:
    """The model's wrapped layers; ValueError for a model that has none (nothing to merge, unmerge,
    disable or unload)."""
    layers = shared_layers(model)
    if not layers:
        raise ValueError("this model has no ShareLoRA adapters: call sharelora_kernels.apply(model, config) or "
                         "sharelora_kernels.load(model, directory) first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then costs the base matmul only)."""
    for m in _layers_of_adapters(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` (within the base dtype's rounding)."""
    for m in _layers_of_adapters(model):
        m.unmerge()
    return model


# ------------------------------------------------------------------------------ adapter controls
def set_adapter(model: nn.Module, adapter_names: str | Sequence[str]) -> nn.Module:
    """Make ``adapter_names`` (one name or several) the model's active adapters: its layers compute
    them and only their tensors train (with the modules to save of the adapter that has them, which
    train in place: frozen while it is inactive). Merged layers are unmerged first (with a warning,
    as PEFT)."""
    check_not_peft_model(model, "set_adapter")
    return activate_adapters(model, adapter_names)


def activate_adapters(model: nn.Module, adapter_names: str | Sequence[str]) -> nn.Module:
    """``set_adapter`` without its PEFT check (what PEFT's ShareLoRA method runs on its model)."""
    names = adapter_name_list(adapter_names)
    check_known(model, names)
    drops = {model.sharelora_configs[n].dropout for n in names}
    if len(drops) > 1:
        raise ValueError(f"adapters {names} have different dropout {sorted(drops)}: a layer applies one dropout "
                         "to its input, so they cannot be active together")
    for layer in shared_layers(model):
        if layer.merged:
            warnings.warn("set_adapter on a merged model: unmerging it first", stacklevel=2)
            layer.unmerge()
        layer.set_adapter(names)
    for name, plan in model.sharelora_plans.items():
        adapter_store(model, name).requires_grad_(name in names)
        for module in plan.modules_to_save:
            model.get_submodule(module).requires_grad_(name in names)
    model.sharelora_active = names
    _point_at_active(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapters(model):`` the wrapped modules compute their base alone; merged layers are
    unmerged first, and stay unmerged (as PEFT's LoRA does). Modules to save, trained in place, keep
    their trained values (PEFT's method keeps a copy per adapter, and its ``disable_adapter`` gives
    the original)."""
    layers = _layers_of_adapters(model)
    was = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, was):
            layer.enable_adapters(not disabled)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name`` and its tensors (its modules to save keep their trained values,
    frozen). Refused while it is merged. Deleting an active adapter activates the first remaining one
    (a warning says which), as PEFT does; after the last one the layers compute their base (``unload``
    gives the plain modules back)."""
    check_not_compiled(model, "delete_adapter")
    check_not_peft_model(model, "delete_adapter")
    return remove_adapter(model, adapter_name)


def remove_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """``delete_adapter`` without its PEFT check (what PEFT's ShareLoRA method runs on its model)."""
    check_known(model, [adapter_name])
    layers = shared_layers(model)
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights: call unmerge(model) before "
                         "deleting it")
    plan = model.sharelora_plans.pop(adapter_name)
    del model.sharelora_configs[adapter_name], model._sharelora_applied[adapter_name]
    for module in plan.modules_to_save:
        model.get_submodule(module).requires_grad_(False)
    remove_store(store_host(model, plan), adapter_name)
    for layer in layers:
        layer.delete_adapter(adapter_name)
    active = [n for n in active_adapters(model) if n != adapter_name]
    if not active and model.sharelora_plans:
        active = [next(iter(model.sharelora_plans))]
        warnings.warn(f"adapter {adapter_name!r} was active and is deleted: adapter {active[0]!r} is active now",
                      stacklevel=2)
    if active:
        activate_adapters(model, active)
    else:
        for layer in layers:
            layer.set_adapter([])
        model.sharelora_active = []
        _point_at_active(model)
    return model


def unload(model: nn.Module, merge: bool = False, adapter_names: Sequence[str] | None = None,
           safe_merge: bool = False) -> nn.Module:
    """Put every wrapped module back as it was before ``apply`` (modules to save, trained in place,
    keep their trained values) and drop all adapters; with ``merge``, first fold the active adapters
    (or ``adapter_names``) into the base weights (``safe_merge``: refuse non-finite updates, every
    module checked before any changes). Returns the model."""
    check_not_compiled(model, "unload")
    check_not_peft_model(model, "merge_and_unload" if merge else "unload")
    return unwrap_layers(model, merge, adapter_names, safe_merge)


def unwrap_layers(model: nn.Module, merge: bool = False, adapter_names: Sequence[str] | None = None,
                  safe_merge: bool = False) -> nn.Module:
    """``unload`` without its PEFT check (what PEFT's ShareLoRA method runs on its model)."""
    check_bool("merge", merge)
    check_bool("safe_merge", safe_merge)
    if not merge and (adapter_names is not None or safe_merge):
        raise ValueError("adapter_names and safe_merge choose what a merge folds in: pass them with merge=True "
                         "(merge_and_unload); unload without a merge drops every adapter")
    if any(layer.mixed_batch is not None for layer in _layers_of_adapters(model)):
        raise ValueError("a mixed-adapter batch is running on this model (mixed_batch / adapter_names): its rows "
                         "would get the base alone; unload after it")
    if adapter_names is not None:
        adapter_names = adapter_name_list(adapter_names)
        check_known(model, adapter_names)
    if merge and safe_merge:
        check_safe_merge(model, adapter_names)
    layers = named_shared_layers(model)
    if merge:  # every layer merged before any is unwrapped: a refused merge (adapters disabled) unwraps none
        for _, layer in layers:
            layer.merge(adapter_names=adapter_names)
    disable_input_groups(model)
    for name, layer in layers:
        parent_name, _, leaf = name.rpartition(".")
        base = layer.base_module()
        if not name:
            return base
        setattr(model.get_submodule(parent_name), leaf, base)
    for host in [model, *model.modules()]:
        for name in list(host._modules.get(STORE_ATTR) or ()):
            remove_store(host, name)
    for attr in ("sharelora_plans", "sharelora_configs", "sharelora_active", "sharelora_plan", "sharelora_config",
                 "_sharelora_applied", "save_pretrained"):
        model.__dict__.pop(attr, None)
    return model


def check_safe_merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """ValueError naming the first wrapped module whose merge of the active adapters (or
    ``adapter_names``) would put non-finite values into its base weight; nothing is changed."""
    for name, layer in named_shared_layers(model):
        if not layer.merge_is_finite(adapter_names):
            raise ValueError(f"merging adapter(s) {layer.adapters_to_merge(adapter_names)} would put non-finite values "
                             f"into the base weight of module {name!r}; nothing was merged")


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """``unload(model, merge=True)``: the plain model with the active adapters (or ``adapter_names``)
    folded into its weights."""
    return unload(model, merge=True, adapter_names=adapter_names)


def adapter_store(model: nn.Module, adapter_name: str) -> AdapterStore:
    """The store holding adapter ``adapter_name``'s tensors."""
    return getattr(store_host(model, model.sharelora_plans[adapter_name]), STORE_ATTR)[adapter_name]


@contextlib.contextmanager
def quantized_bases_unwrapped(model: nn.Module) -> Iterator[None]:
    """Inside the block each layer of a quantized base (one that computes itself) is replaced in its
    parent by that base, so the model's state dict, and a quantizer that reads the modules (as
    Transformers' does when saving), name the base as the unwrapped model does (``q_proj.weight``,
    not ``q_proj.base_layer.weight``); the layers are put back afterwards, whatever happens."""
    swapped = []
    for name, layer in named_shared_layers(model):
        if layer.layout.computes_itself:
            parent_name, _, child = name.rpartition(".")
            swapped.append((model.get_submodule(parent_name), child, layer))
    try:
        for parent, child, layer in swapped:
            setattr(parent, child, layer.base_layer)
        yield
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


def adapter_folders(model: nn.Module, directory: str | os.PathLike) -> dict[str, Path]:
    """Where each named adapter of ``model`` is saved in ``directory``, in PEFT's layout: "default" in
    the folder itself, every other adapter in its subfolder ``<name>``."""
    return {name: Path(directory) if name == DEFAULT_ADAPTER else Path(directory) / name
            for name in adapter_names(model)}


ADAPTER_ONLY_ATTR = "sharelora_adapter_only"  # (a Trainer's output_dir, the keys its checkpoints leave out)
_CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")  # the Trainer's checkpoint folders


def left_out_of(model: nn.Module, save_directory: str | os.PathLike) -> set[str]:
    """The state_dict keys a save into ``save_directory`` leaves out: the frozen base, where an
    ``adapter_only`` TrainerCallback set ``ADAPTER_ONLY_ATTR`` and the folder is one of its Trainer's
    checkpoints (``checkpoint-N`` below its output_dir), else none. Decided at each save from the
    folder alone, so nothing is left set between saves (an interrupt, a failed evaluation), and
    every save strategy (steps, epoch, best) is covered."""
    spec = model.__dict__.get(ADAPTER_ONLY_ATTR)
    if spec is None:
        return set()
    root, keys = spec
    folder = Path(save_directory).resolve()
    in_checkpoint = _CHECKPOINT_NAME.fullmatch(folder.name) and folder.is_relative_to(Path(root).resolve())
    return set(keys) if in_checkpoint else set()


@contextlib.contextmanager
def _ignoring_on_save(model: nn.Module, keys: set[str]) -> Iterator[None]:
    """``keys`` added to the model's ``_keys_to_ignore_on_save`` (what save_pretrained leaves out)
    within the block, restored after it whatever happens."""
    if not keys:
        yield
        return
    before = model._keys_to_ignore_on_save
    model._keys_to_ignore_on_save = sorted(set(before or ()) | keys)
    try:
        yield
    finally:
        model._keys_to_ignore_on_save = before


class SavePretrainedWithAdapters:
    """A Transformers model's ``save_pretrained`` after ``apply`` (set on the instance): the model, a
    quantized base named as unwrapped (``from_pretrained`` reads the base back), the adapter tensors
    beside it (Trainer's resume reads them back; ``from_pretrained`` of the base skips them), then each adapter as
    ``save`` writes it, in the folder (adapter "default") or its subfolder ``<name>`` (PEFT's
    layout), for ``load``. ``unload`` removes it. A plain object: copies and pickles keep it.
    Refused, before anything is written, while adapters are merged: the folder would hold them twice,
    in the weights and beside them."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args, **kwargs):
        model = self.model
        merged = [(name, m) for name, m in named_shared_layers(model) if m.merged]
        if merged:
            name, layer = merged[0]
            raise ValueError(f"adapter(s) {layer.merged_adapters} are merged into the weights of {len(merged)} module(s) "
                             f"(first: {name}): save_pretrained would write them twice, in the weights and as "
                             "adapters, and loading would apply them twice; call sharelora_kernels.unmerge(model) "
                             "first, or sharelora_kernels.merge_and_unload(model) to save a plain model with the "
                             "adapters folded in")
        with quantized_bases_unwrapped(model), _ignoring_on_save(model, left_out_of(model, save_directory)):
            out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            if not ADAPTER_WRITERS:  # sharelora_kernels.checkpoint not imported: say what to call
                warnings.warn(f"save_pretrained wrote the model, not its adapters {adapter_names(model)} in the form "
                              f"sharelora_kernels.load reads: call sharelora_kernels.save(model, {str(save_directory)!r})",
                              stacklevel=2)
            for name, folder in adapter_folders(model, save_directory).items():
                for write in ADAPTER_WRITERS:
                    write(model, folder, name)
        return out
