"""apply(): wrap a model's target nn.Linears so that every planned tensor exists exactly once.

Also the model-level helpers: parameter accounting, merge / unmerge, and the map from plan tensor
names to the live ``nn.Parameter`` objects (used by checkpoints and export).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ShareLoRAConfig
from .grouping import check_known_architecture, enable_input_groups
from .layer import AdapterStore, LoRAPathModule, SharedLoRALinear, adapter_dtype, new_parameter
from .plan import ModuleInfo, SharePlan, build_plan, layer_position


def find_target_modules(model: nn.Module, target_modules: list[str]) -> tuple[list[ModuleInfo], int]:
    """The model's target modules (matched by the last component of their path) and its layer count.

    A module's layer is the first integer in its path (none: layer 0). The layer count is the
    model config's ``num_hidden_layers`` when present, else the largest layer index + 1. A matching
    module that is not a plain ``nn.Linear`` (quantized, custom subclass, already wrapped), or whose
    weight is tied to another module's (e.g. an lm_head tied to the embeddings), is refused by name
    rather than skipped.
    """
    targets = set(target_modules)
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    infos = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets:
            continue
        if isinstance(module, SharedLoRALinear):
            raise ValueError(f"module {name!r} already has ShareLoRA adapters; apply() runs once per model")
        if type(module) is not nn.Linear:
            raise TypeError(f"target module {name!r} is a {type(module).__name__}, not a plain nn.Linear; "
                            "sharelora_kernels cannot wrap it (remove it from target_modules)")
        tied = [o for o in owners[id(module.weight)] if o != f"{name}.weight"]
        if tied:
            raise ValueError(f"target module {name!r} has its weight tied to {tied[0]!r}; merging an adapter into it "
                             "would change that module too (remove it from target_modules)")
        infos.append(ModuleInfo(name, layer_position(name)[0], leaf, module.in_features, module.out_features))
    found_layers = max((m.layer for m in infos), default=-1) + 1
    configured = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return infos, max(found_layers, configured or 0)


def apply(model: nn.Module, config: ShareLoRAConfig, group_inputs: bool = False) -> nn.Module:
    """Add ShareLoRA adapters to ``model`` in place and return it.

    Freezes every base parameter, creates each planned tensor once (on the device of its first user,
    the meta device included), and replaces each target ``nn.Linear`` by a ``SharedLoRALinear`` whose
    paths read the (possibly shared) parameters. Fresh adapters leave the outputs unchanged, and
    each new layer keeps the train/eval mode of the one it replaces.
    group_inputs: also let the modules that read one input (q/k/v, gate/up) run as one grouped op
    (``grouping.enable_input_groups``; LLaMA / Mistral / Qwen2 only).
    Every check runs before the model is touched: a call that raises leaves it as it was.
    """
    if group_inputs:
        check_known_architecture(model)
    return apply_plan(model, config, plan_model(model, config), group_inputs)


def plan_model(model: nn.Module, config: ShareLoRAConfig) -> SharePlan:
    """The share plan ``apply(model, config)`` would build, without changing the model; raises
    what apply would raise (adapters already there, a container root, a config or model misfit)."""
    if getattr(model, "sharelora_plan", None) is not None:
        raise ValueError("this model already has ShareLoRA adapters; apply() runs once per model")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f"apply() adds the adapter store as a child of the model's root, which would change what "
                        f"a {type(model).__name__} runs; wrap it in an nn.Module first")
    config.validate()  # it may have been edited since it was made
    infos, num_layers = find_target_modules(model, config.target_modules)
    return build_plan(config, infos, num_layers)


def apply_plan(model: nn.Module, config: ShareLoRAConfig, plan: SharePlan, group_inputs: bool = False) -> nn.Module:
    """``apply`` with the plan ``plan_model(model, config)`` already made (``load`` compares it with
    a checkpoint's first); it changes the model and raises nothing more."""
    for p in model.parameters():
        p.requires_grad_(False)
    first_user = _first_users(plan)
    params: dict[str, nn.Parameter] = {}
    for name, spec in plan.tensors.items():
        weight = model.get_submodule(first_user[name]).weight
        params[name] = new_parameter(spec, device=weight.device, dtype=adapter_dtype(weight.dtype))
    model.sharelora_adapters = store = AdapterStore(params, plan.tensors).train(model.training)
    for name, mplan in plan.modules.items():
        paths = [LoRAPathModule(p, store) for p in mplan.paths]
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, SharedLoRALinear(getattr(parent, leaf), paths, dropout=config.dropout))
    model.sharelora_config = config
    model.sharelora_plan = plan
    if getattr(model, "is_gradient_checkpointing", False):
        # reentrant checkpointing passes gradient into a block only if its input requires grad;
        # with a frozen embedding it would not (PEFT does the same; Transformers 5 does it when
        # checkpointing is enabled later, 4.x does not: call it yourself there)
        model.enable_input_require_grads()
    if group_inputs:
        enable_input_groups(model)
    return model


def _first_users(plan: SharePlan) -> dict[str, str]:
    first: dict[str, str] = {}
    for name, mplan in plan.modules.items():
        for p in mplan.paths:
            for t in p.tensors.values():
                first.setdefault(t, name)
    return first


def get_plan(model: nn.Module) -> SharePlan:
    plan = getattr(model, "sharelora_plan", None)
    if plan is None:
        raise ValueError("this model has no ShareLoRA adapters: call sharelora_kernels.apply(model, config) first")
    return plan


def adapter_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Plan tensor name -> the live parameter (each shared tensor once), in plan order."""
    plan = get_plan(model)
    store = model.sharelora_adapters
    return {t: store[t] for t in plan.tensors}


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Adapter parameters per part ("part:local", ...) and per module type ("type:q_proj", ...)."""
    return get_plan(model).breakdown()


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
