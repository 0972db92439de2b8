"""export_peft(): write any ShareLoRA model as a plain per-module PEFT LoRA checkpoint.

Every module's update is a sum of low-rank paths (the README's "The methods"), so it is one plain LoRA of
rank sum_p r_p (g for a gate path): A = [A_1; A_2; ...] stacked on rows, B = [s_1 B_1, s_2 B_2, ...]
side by side, with each path's scale folded into its B, and the module's PEFT alpha made so that
PEFT's scale is exactly 1. A module with one plain path at the config's scale (method "lora",
e.g. from ``from_peft``) is written as it is, with its own alpha: the tensors PEFT itself would
save. Per-module ranks and alphas go to rank_pattern / alpha_pattern. Shared tensors are expanded
per module: the export is what standard LoRA loaders (PEFT, serving engines) read. The modules
trained in full are written under their names with ``modules_to_save``, Conv1D bases set
``fan_in_fan_out``, and ``task_type`` follows the model class (``targeting.peft_task_type``).

``serving="vllm"`` or ``"tgi"`` writes what those engines' LoRA loaders accept: one rank for every
module (no rank_pattern / alpha_pattern), padded with zero rows of A and zero columns of B up to a
rank the engines take (``SERVING_RANKS``; outputs are unchanged), only the adapter_config keys they
read, and only the module names they serve (``SERVED_MODULES``, LLaMA / Mistral / Qwen2 naming).
Anything else is refused with an error that names it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import check_no_peft_wrappers, saved_state
from .files import atomic_write_files
from .model import active_adapters, adapter_names, get_plan, peft_base, shared_layers
from .plan import pattern_value
from .reference import path_factors
from .targeting import peft_target_names, peft_task_type

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
SERVING_ENGINES = ("vllm", "tgi")
SERVING_RANKS = (8, 16, 32, 64, 128, 256)
SERVED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SERVING_CONFIG_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules",
                       "lora_dropout", "bias", "use_rslora", "fan_in_fan_out", "modules_to_save", "inference_mode")


@torch.no_grad()
def peft_lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (R, K), B (N, R)) float32 of one SharedLoRALinear's active adapters (disabled or not),
    scales folded into B."""
    a_parts, b_parts = [], []
    for p in layer.paths(layer.active_adapters):
        a, b = path_factors(p._replace(tensors=tuple(t.float() for t in p.tensors)), layer.in_features, layer.out_features)
        a_parts.append(a)
        b_parts.append(b * p.scale)
    return torch.cat(a_parts, 0).contiguous(), torch.cat(b_parts, 1).contiguous()


@torch.no_grad()
def _module_lora(name: str, layer, config, use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, PEFT alpha) of module ``name``: as trained when it has one plain path at the scale of
    its config alpha, else ``peft_lora_factors`` with the alpha that makes PEFT's scale 1."""
    paths = layer.paths(layer.active_adapters)  # what the adapter is, also while adapters are disabled
    if len(paths) == 1 and paths[0].kind == "plain" and config is not None:
        a, b = paths[0].tensors
        alpha = pattern_value(config.alpha_pattern, name, config.alpha)
        if alpha / (math.sqrt(a.shape[0]) if use_rslora else a.shape[0]) == paths[0].scale:
            return a.to(torch.float32, copy=True), b.to(torch.float32, copy=True), alpha  # shared: one copy each
    a, b = peft_lora_factors(layer)
    r = a.shape[0]
    return a, b, (math.sqrt(r) if use_rslora else float(r))


def export_peft(model: nn.Module, directory: str | os.PathLike, serving: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``.

    serving: None (plain PEFT, per-module ranks through rank_pattern), or "vllm" / "tgi" (see the
    module docstring). Returns the directory. A ``PeftModel`` of the ShareLoRA method: its active
    adapter (modules to save in PEFT's wrappers are refused by name).
    """
    if serving is not None and serving not in SERVING_ENGINES:
        raise ValueError(f"serving must be None or one of {list(SERVING_ENGINES)}, got {serving!r}")
    base = peft_base(model)  # a PeftModel: export the model it wraps
    if base is not model:
        check_no_peft_wrappers(base, "export_peft")
        model = base
    active = active_adapters(model)
    if adapter_names(model) and len(active) != 1:
        raise ValueError(f"export_peft writes the active adapter, and this model has {len(active)} active ({active}; "
                         f"all: {adapter_names(model)}): make one active first with "
                         "sharelora_kernels.set_adapter(model, name)")
    plan = get_plan(model)
    if "" in plan.modules:
        raise ValueError("export_peft names adapters by module path, and the root module itself is a "
                         "SharedLoRALinear: wrap it in a module (e.g. nn.Sequential(layer)) to export it")
    config = getattr(model, "sharelora_config", None)
    use_rslora = bool(config is not None and config.use_rslora and serving is None)
    layers = {name: model.get_submodule(name) for name in plan.modules}
    if serving is None:
        modules = {name: _module_lora(name, layer, config, use_rslora) for name, layer in layers.items()}
    else:
        modules = {name: (*peft_lora_factors(layer), None) for name, layer in layers.items()}
    ranks = {name: a.shape[0] for name, (a, _, _) in modules.items()}
    r = max(ranks.values())
    if serving is not None:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in plan.modules})
        unserved = [t for t in leaves if t not in SERVED_MODULES]
        if unserved:
            raise ValueError(f"{serving} serves LoRA on {list(SERVED_MODULES)}, not on module {unserved[0]!r}")
        if plan.modules_to_save:
            raise ValueError(f"{serving} serves LoRA adapters only, not modules trained in full "
                             f"(modules_to_save {plan.modules_to_save})")
        if r > SERVING_RANKS[-1]:
            raise ValueError(f"module rank {r} exceeds the largest rank {serving} serves ({SERVING_RANKS[-1]})")
        r = next(x for x in SERVING_RANKS if x >= r)
        modules = {name: (*_pad_rank(a, b, r), float(r)) for name, (a, b, _) in modules.items()}
        ranks = {name: r for name in ranks}
    r, alpha = _most_common((ranks[n], modules[n][2]) for n in modules)
    tensors = {}
    for name, (a, b, _) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu()
    for name, t in saved_state(model, plan).items():
        tensors[f"base_model.model.{name}"] = t.detach().cpu().contiguous()
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if serving else peft_task_type(model),
        "base_model_name_or_path": base_name or None,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {name: rank for name, rank in ranks.items() if rank != r},
        "alpha_pattern": {name: m[2] for name, m in modules.items() if m[2] != alpha},
        "target_modules": peft_target_names(model, list(plan.modules)),
        "lora_dropout": _dropout(model, config),
        "bias": "none",
        "use_rslora": use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "modules_to_save": list(plan.modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if serving is not None:
        peft_config = {k: peft_config[k] for k in SERVING_CONFIG_KEYS}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft_config, indent=2) + "\n"
    atomic_write_files({out / PEFT_WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                        out / PEFT_CONFIG_NAME: lambda tmp: Path(tmp).write_text(text)})  # as one unit
    return out


def _most_common(pairs) -> tuple[int, float]:
    """The most frequent (rank, alpha) pair (ties: the larger): the export's global r and lora_alpha."""
    counts: dict[tuple[int, float], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    return max(counts, key=lambda pair: (counts[pair], pair))


def _dropout(model: nn.Module, config) -> float:
    """The adapter dropout: the config's, or the one every hand-wrapped layer has (ValueError if they differ)."""
    if config is not None:
        return config.dropout
    values = {layer.dropout for layer in shared_layers(model)}
    if len(values) > 1:
        raise ValueError(f"PEFT has one lora_dropout, and these hand-wrapped layers use several: {sorted(values)}")
    return values.pop()


def _pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (R, K) and B (N, R) padded with zero rows / columns to rank r: B A is unchanged."""
    extra = r - a.shape[0]
    return torch.nn.functional.pad(a, (0, 0, 0, extra)), torch.nn.functional.pad(b, (0, extra))
