"""from_peft(): run an existing PEFT LoRA on ShareLoRA layers (method "lora"), same outputs and gradients.

Reads either a live ``PeftModel`` (its active adapter) or a base model plus a directory that
``PeftModel.save_pretrained`` wrote (``adapter_config.json`` + ``adapter_model.safetensors``; no
pickle). Per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``), rsLoRA, dropout, Conv1D
bases and ``modules_to_save`` carry over; anything PEFT LoRA does that these layers do not (DoRA,
trained biases, LoRA on embeddings or convolutions, ...) and every other adapter type are refused by
name before the model is changed.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from .config import ShareLoRAConfig
from .base import describe_base
from .model import adapter_names, adapter_tensors, apply_plan, is_peft_model, plan_model
from .plan import pattern_matches, pattern_value
from .targeting import find_target_modules

# PEFT LoraConfig options with no counterpart here: (key, the value that means "off", what it is)
_UNSUPPORTED = (("use_dora", False, "DoRA"), ("bias", "none", "trained biases (bias != 'none')"),
                ("lora_bias", False, "a LoRA bias"), ("use_qalora", False, "QA-LoRA"),
                ("target_parameters", None, "LoRA on parameters (target_parameters)"),
                ("trainable_token_indices", None, "trainable tokens"), ("layer_replication", None, "layer replication"),
                ("alora_invocation_tokens", None, "activated LoRA"), ("use_bdlora", None, "BD-LoRA"),
                ("kasa_config", None, "KaSA"), ("monteclora_config", None, "MonteCLoRA"),
                ("arrow_config", None, "Arrow routing"))
# LoRA variants whose forward is plain LoRA's (VeLoRA changes what backward keeps, not the math)
_SAME_FORWARD_VARIANTS = ("VeloraLinearVariant",)
_EMBEDDING = "PEFT module {name!r} has LoRA on an embedding, which ShareLoRA layers do not support"


def from_peft(model: nn.Module, adapter_dir: str | os.PathLike | None = None) -> nn.Module:
    """Turn a PEFT LoRA into ShareLoRA layers with ``method="lora"``; returns the base model, wrapped.

    model: a ``PeftModel`` (adapter_dir None; its one active adapter is converted, unmerged first if
        ``merge_adapter`` merged it, and the PEFT layers removed; several active adapters, or another
        adapter merged, are refused), or a base model (not wrapped by PEFT) with ``adapter_dir``
        naming a saved PEFT LoRA.
    The result gives the same logits and gradients as the PEFT model, saves with ``save`` and
    exports with ``export_peft`` to the tensors PEFT itself saves.
    """
    if is_peft_model(model):
        if adapter_dir is not None:
            raise ValueError("from_peft takes a PeftModel, or a base model and adapter_dir, not both")
        peft_config, lora, saved = _read_peft_model(model)
        base_weights = {}
        if _merged_adapters(model):  # only the converted one (checked): its update leaves the base weights
            model.unmerge_adapter()
        base = model.unload()
    else:
        if adapter_dir is None:
            raise ValueError(f"{type(model).__name__} is not a PeftModel: pass the PEFT adapter directory as adapter_dir")
        if adapter_names(model):
            raise ValueError(f"from_peft converts into a model without ShareLoRA adapters; this one has "
                             f"{adapter_names(model)}: pass a fresh base model")
        peft_config, lora, saved, base_weights = _read_adapter_dir(Path(adapter_dir))
        base = model
    config = _config(base, peft_config, list(lora), _saved_modules(base, peft_config, saved))
    plan = plan_model(base, config)
    state = {f"{name}.{key}": t for name in plan.modules_to_save for key, t in base.get_submodule(name).state_dict().items()}
    _check_fits(base, plan, lora, saved, state, base_weights)  # everything before the model changes
    with torch.no_grad():
        for key, t in base_weights.items():
            base.get_parameter(key).copy_(t)
    apply_plan(base, config, plan)
    params = adapter_tensors(base)
    with torch.no_grad():
        for name, (a, b, _) in lora.items():
            params[f"{name}.A"].copy_(a)
            params[f"{name}.B"].copy_(b)
        for key, t in saved.items():
            state[key].copy_(t)
    return base


def _check_fits(base: nn.Module, plan, lora: dict, saved: dict, state: dict, base_weights: dict) -> None:
    """ValueError naming the first tensor of the PEFT LoRA that does not fit ``base`` and the plan made
    of its config: each module's rank and scale, A (r, K) and B (N, r), each saved tensor of a module
    to save, each base weight PEFT saved beside them (an embedding or head it targets)."""
    for name, mplan in plan.modules.items():
        a, b, scale = lora[name]
        path = mplan.paths[0]
        if (path.rank, path.scale) != (a.shape[0], scale):
            raise ValueError(f"PEFT module {name!r} has rank {a.shape[0]} and scale {scale}, its config gives "
                             f"rank {path.rank} and scale {path.scale}")
        layout = describe_base(base.get_submodule(name))
        for role, t, shape in (("lora_A", a, (path.rank, layout.in_features)),
                               ("lora_B", b, (layout.out_features, path.rank))):
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"PEFT module {name!r}: {role} is not finite floating point ({t.dtype}, NaN or "
                                 "infinite values?)")
            if tuple(t.shape) != shape:
                raise ValueError(f"PEFT module {name!r}: {role} has shape {tuple(t.shape)}, this model's module needs "
                                 f"{shape}: saved for another base model?")
    for key, t in [*saved.items(), *base_weights.items()]:
        target = state.get(key) if key in saved else _parameter(base, key)
        if target is None:
            raise ValueError(f"PEFT saved tensor {key!r}, which no module to save of this model holds")
        if target.shape != t.shape:
            raise ValueError(f"PEFT saved tensor {key!r} has shape {tuple(t.shape)}, this model's "
                             f"{tuple(target.shape)}: saved for another base model?")


def _parameter(base: nn.Module, key: str):
    try:
        return base.get_parameter(key)
    except AttributeError:
        return None


def _check_supported(peft_config: dict) -> None:
    kind = peft_config.get("peft_type")
    kind = getattr(kind, "value", kind)  # a live config holds PEFT's PeftType enum
    if kind != "LORA":
        raise ValueError(f"from_peft converts LoRA adapters, not {kind} adapters")
    for key, off, what in _UNSUPPORTED:
        value = peft_config.get(key, off)
        if value not in (off, None, False, [], {}):
            raise ValueError(f"this PEFT LoRA uses {what} ({key}={value!r}), which ShareLoRA layers do not support")


def _read_peft_model(model) -> tuple[dict, dict, dict]:
    """(config dict, {module: (A, B, scale)}, {"<module>.<tensor>": saved module tensor}) of the one active
    adapter; ValueError when several are active or another adapter is merged into the weights."""
    active = model.active_adapters
    if len(active) != 1:
        raise ValueError(f"this PeftModel has {len(active)} active adapters {active}, and from_peft converts one: "
                         "call model.set_adapter(name) first")
    adapter = active[0]
    others = sorted(_merged_adapters(model) - {adapter})
    if others:
        raise ValueError(f"adapter(s) {others} of this PeftModel are merged into its weights, and from_peft converts "
                         f"adapter {adapter!r} alone: call model.unmerge_adapter() first")
    peft_config = model.peft_config[adapter].to_dict()
    _check_supported(peft_config)
    lora, saved = {}, {}
    for name, module in model.get_base_model().named_modules():
        if adapter in getattr(module, "lora_embedding_A", {}):  # PEFT's Embedding: its lora_A stays empty
            raise ValueError(_EMBEDDING.format(name=name))
        if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
            if not isinstance(module.lora_A[adapter], nn.Linear):
                raise ValueError(f"PEFT module {name!r} is not a linear LoRA layer ({type(module).__name__})")
            variant = getattr(module, "lora_variant", {}).get(adapter)  # PEFT's per-layer LoRA variant, if any
            if variant is not None and type(variant).__name__ not in _SAME_FORWARD_VARIANTS:
                raise ValueError(f"PEFT module {name!r} computes a LoRA variant ({type(variant).__name__}), which "
                                 "ShareLoRA layers do not support: only plain LoRA converts")
            lora[name] = (module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                          module.scaling[adapter])
        elif hasattr(module, "modules_to_save") and adapter in getattr(module, "modules_to_save", {}):
            for key, t in module.modules_to_save[adapter].state_dict().items():
                saved[f"{name}.{key}"] = t.detach().clone()
    if not lora:
        raise ValueError(f"adapter {adapter!r} of this PeftModel holds no LoRA layers")
    return peft_config, lora, saved


def _merged_adapters(model) -> set[str]:
    """Names of the adapters merged into a PeftModel's weights (``merge_adapter``)."""
    return {name for m in model.modules() for name in getattr(m, "merged_adapters", ())}


def _read_adapter_dir(directory: Path) -> tuple[dict, dict, dict, dict]:
    """``_read_peft_model``'s three, and the base weights PEFT saved beside them ({"<module>.weight":
    tensor}: an embedding or head it targets, ``save_embedding_layers``), of a saved PEFT LoRA;
    ValueError naming the file and what is wrong with it."""
    from safetensors.torch import load_file

    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"no PEFT adapter at {directory}: {path.name} is missing (only safetensors weights are read)")
    try:
        peft_config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not a PEFT config: not valid JSON ({err})") from None
    if not isinstance(peft_config, dict):
        raise ValueError(f"{config_path} is not a PEFT config: it holds a {type(peft_config).__name__}, not an object")
    for field in ("r", "lora_alpha"):
        if not isinstance(peft_config.get(field), (int, float)) or isinstance(peft_config.get(field), bool):
            raise ValueError(f"{config_path}: {field!r} is missing or not a number ({peft_config.get(field)!r})")
    _check_supported(peft_config)
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors' SafetensorError (a damaged file), OSError
        raise ValueError(f"cannot read {weights_path}: a damaged or truncated file? ({err})") from None
    prefix = "base_model.model."
    lora, saved, base_weights = {}, {}, {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            raise ValueError(f"{weights_path}: tensor {key!r} is not under {prefix!r}")
        key = key[len(prefix):]
        for role in ("lora_A", "lora_B"):
            if key.endswith(f".{role}.weight"):
                lora.setdefault(key[: -len(f".{role}.weight")], {})[role] = t
                break
        else:
            if key.endswith((".lora_embedding_A", ".lora_embedding_B")):
                raise ValueError(f"{weights_path}: " + _EMBEDDING.format(name=key.rsplit(".", 1)[0]))
            if ".lora_" in key:
                raise ValueError(f"{weights_path}: tensor {key!r} is not a linear LoRA weight (lora_A / lora_B)")
            if ".base_layer." in key:
                base_weights[key.replace(".base_layer.", ".", 1)] = t
            else:
                saved[key] = t
    if not lora:
        raise ValueError(f"{weights_path} holds no LoRA weights (no lora_A / lora_B tensors)")
    out = {}
    for name, ab in lora.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_path}: module {name!r} has {sorted(ab)} but not both lora_A and lora_B")
        out[name] = (ab["lora_A"], ab["lora_B"], _peft_scale(peft_config, name, ab["lora_A"].shape[0]))
    return peft_config, out, saved, base_weights


def _peft_scale(peft_config: dict, name: str, r: int) -> float:
    """PEFT's scaling of module ``name`` with rank r (its alpha_pattern, rsLoRA)."""
    alpha = pattern_value(peft_config.get("alpha_pattern") or {}, name, peft_config["lora_alpha"])
    return alpha / (math.sqrt(r) if peft_config.get("use_rslora") else r)


def _saved_modules(base: nn.Module, peft_config: dict, saved: dict) -> list[str]:
    """Full names of the modules PEFT trains in full that this model has (PEFT's task types add heads a
    model may lack, e.g. "score" to a BERT classifier)."""
    entries = peft_config.get("modules_to_save") or []
    names = [n for n, _ in base.named_modules() if n and any(n.endswith(e) for e in entries)]  # PEFT's rule: a suffix
    outer = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
    return [n for n in outer if any(k.startswith(n + ".") for k in saved)]


def _config(base: nn.Module, peft_config: dict, names: list[str], saved_modules: list[str]) -> ShareLoRAConfig:
    """The method-"lora" config of the PEFT LoRA: its own targeting fields when they pick exactly the
    modules it holds, else those modules' full names."""
    def used(pattern: dict | None) -> dict:  # keys that pick none of its modules change nothing in PEFT
        return {k: v for k, v in (pattern or {}).items() if any(pattern_matches(k, n) for n in names)}

    common = dict(method="lora", r=peft_config["r"], alpha=float(peft_config["lora_alpha"]),
                  dropout=float(peft_config.get("lora_dropout") or 0.0), use_rslora=bool(peft_config.get("use_rslora")),
                  rank_pattern=used(peft_config.get("rank_pattern")),
                  alpha_pattern={k: float(v) for k, v in used(peft_config.get("alpha_pattern")).items()},
                  modules_to_save=saved_modules)
    targets = peft_config.get("target_modules")
    try:
        config = ShareLoRAConfig(target_modules=sorted(targets) if isinstance(targets, (list, set)) else targets,
                                 exclude_modules=peft_config.get("exclude_modules"),
                                 layers_to_transform=peft_config.get("layers_to_transform"),
                                 layers_pattern=peft_config.get("layers_pattern"), **common)
        if sorted(m.name for m in find_target_modules(base, config)[0]) == sorted(names):
            return config
    except (ValueError, TypeError):
        pass
    return ShareLoRAConfig(target_modules=sorted(names), **common)
