"""export_peft(): write any ShareLoRA model as a plain per-module PEFT LoRA checkpoint.

Every module's update is a sum of low-rank paths (METHOD section 4), so it is one plain LoRA of
rank sum_p r_p (g for a gate path): A = [A_1; A_2; ...] stacked on rows, B = [s_1 B_1, s_2 B_2, ...]
side by side, with each path's scale folded into its B. PEFT's own scale is then made exactly 1
(lora_alpha = r per module, rsLoRA off). Shared tensors are expanded per module: the export is what
standard LoRA loaders (PEFT, serving engines) read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import atomic_write
from .model import get_plan
from .reference import path_factors

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


@torch.no_grad()
def peft_lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (R, K), B (N, R)) float32 of one SharedLoRALinear, scales folded into B."""
    a_parts, b_parts = [], []
    for p in layer.paths():
        a, b = path_factors(p._replace(tensors=tuple(t.float() for t in p.tensors)), layer.in_features, layer.out_features)
        a_parts.append(a)
        b_parts.append(b * p.scale)
    return torch.cat(a_parts, 0).contiguous(), torch.cat(b_parts, 1).contiguous()


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``."""
    plan = get_plan(model)
    config = model.sharelora_config
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors, ranks = {}, {}
    for name in plan.modules:
        a, b = peft_lora_factors(model.get_submodule(name))
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu()
        ranks[name] = a.shape[0]
    r = max(ranks.values())
    uneven = {name: rank for name, rank in ranks.items() if rank != r}
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name or None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": uneven,
        "alpha_pattern": dict(uneven),
        "target_modules": sorted({m.info.module_type for m in plan.modules.values()}),
        "lora_dropout": config.dropout,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    atomic_write(out / PEFT_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / PEFT_CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2) + "\n"))
    return out
