"""apply(): wrap a model's target modules so that every planned tensor exists exactly once.

Also the model-level helpers: parameter accounting, merge / unmerge, and the map from plan tensor
names to the live ``nn.Parameter`` objects (used by checkpoints and export), for models made by
``apply`` and for modules holding hand-wrapped ``SharedLoRALinear`` layers alike.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from .base import new_adapter_dtype
from .config import ShareLoRAConfig
from .grouping import check_known_architecture, enable_input_groups
from .layer import AdapterStore, LoRAPathModule, SharedLoRALinear, new_parameter
from .plan import ModuleInfo, ModulePlan, SharePlan, TensorSpec, build_plan
from .targeting import (check_no_peft, find_modules_to_save, find_target_modules, layer_position, module_type,
                        type_labels)

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
HAND_WRAPPED = "hand_wrapped"  # the method of a plan read off hand-wrapped layers


def apply(model: nn.Module, config: ShareLoRAConfig, group_inputs: bool = False) -> nn.Module:
    """Add ShareLoRA adapters to ``model`` in place and return it.

    Freezes every base parameter, creates each planned tensor once (on the device of its first user,
    the meta device included), and replaces each target module (``nn.Linear`` or ``Conv1D``, chosen
    by ``targeting``) by a ``SharedLoRALinear`` whose paths read the (possibly shared) parameters;
    the ``modules_to_save`` train in full. Fresh adapters leave the outputs unchanged, and each new
    layer keeps the train/eval mode of the one it replaces.
    group_inputs: also let the modules that read one input (q/k/v, gate/up) run as one grouped op
    (``grouping.enable_input_groups``; LLaMA / Mistral / Qwen2 only).
    Every check runs before the model is touched: a call that raises leaves it as it was.
    """
    if group_inputs:
        check_known_architecture(model)
    return apply_plan(model, config, plan_model(model, config), group_inputs)


def plan_model(model: nn.Module, config: ShareLoRAConfig) -> SharePlan:
    """The share plan ``apply(model, config)`` would build, without changing the model; raises
    what apply would raise (adapters already there, PEFT adapters, a config or model misfit)."""
    if getattr(model, "sharelora_plan", None) is not None:
        raise ValueError("this model already has ShareLoRA adapters; apply() runs once per model")
    check_no_peft(model)
    config.validate()  # it may have been edited since it was made
    infos, num_layers = find_target_modules(model, config)
    saved = find_modules_to_save(model, config)
    _check_not_tied(model, saved)
    return build_plan(config, infos, num_layers, saved)


def apply_plan(model: nn.Module, config: ShareLoRAConfig, plan: SharePlan, group_inputs: bool = False) -> nn.Module:
    """``apply`` with the plan ``plan_model(model, config)`` already made (``load`` compares it with
    a checkpoint's first); it changes the model and raises nothing more."""
    for p in model.parameters():
        p.requires_grad_(False)
    first_user = _first_users(plan)
    params: dict[str, nn.Parameter] = {}
    for name, spec in plan.tensors.items():
        base = model.get_submodule(first_user[name])
        params[name] = new_parameter(spec, device=base.weight.device, dtype=new_adapter_dtype(base))
    store = AdapterStore(params, plan.tensors).train(model.training)
    for name, mplan in plan.modules.items():
        paths = [LoRAPathModule(p, store) for p in mplan.paths]
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, SharedLoRALinear(getattr(parent, leaf), paths, dropout=config.dropout))
    store_host(model, plan).sharelora_adapters = store
    for name in plan.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    model.sharelora_config = config
    model.sharelora_plan = plan
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


def _check_not_tied(model: nn.Module, saved: list[str]) -> None:
    """ValueError if a module to save shares a parameter with a module outside it (training it in full
    would change that one too)."""
    for name in saved:
        inside = {id(p) for p in model.get_submodule(name).parameters()}
        for pname, p in model.named_parameters(remove_duplicate=False):
            if id(p) in inside and not pname.startswith(f"{name}."):
                raise ValueError(f"modules_to_save entry {name!r} shares a parameter with {pname!r} (tied weights); "
                                 "training it in full would change that module too")


def _first_users(plan: SharePlan) -> dict[str, str]:
    first: dict[str, str] = {}
    for name, mplan in plan.modules.items():
        for p in mplan.paths:
            for t in p.tensors.values():
                first.setdefault(t, name)
    return first


def get_plan(model: nn.Module) -> SharePlan:
    """The model's share plan: the one ``apply`` made, or one read off its hand-wrapped layers."""
    plan = getattr(model, "sharelora_plan", None)
    return plan if plan is not None else _hand_wrapped(model)[0]


def adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Plan tensor name -> the live parameter (each shared tensor once), in plan order."""
    plan = getattr(model, "sharelora_plan", None)
    if plan is None:
        return _hand_wrapped(model)[1]
    store = store_host(model, plan).sharelora_adapters
    return {t: store[t] for t in plan.tensors}


def _hand_wrapped(model: nn.Module) -> tuple[SharePlan, dict[str, nn.Parameter]]:
    """The plan of a module holding hand-wrapped SharedLoRALinears, and its tensors: each tensor is
    named by its parameter name in ``model`` (``"0.adapters.A"``), so layers sharing one are planned so."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SharedLoRALinear)]
    if not layers:
        raise ValueError("this model has no ShareLoRA adapters: call sharelora_kernels.apply(model, config) "
                         "or wrap its layers in SharedLoRALinear first")
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
    return [m for m in model.modules() if isinstance(m, SharedLoRALinear)]


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then costs the base matmul only)."""
    for m in shared_layers(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge`` (within the base dtype's rounding)."""
    for m in shared_layers(model):
        m.unmerge()
    return model
