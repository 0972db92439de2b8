"""export_peft(): write any ShareLoRA model as a plain per-module PEFT LoRA checkpoint.

Every module's update is a sum of low-rank paths (METHOD section 4), so it is one plain LoRA of
rank sum_p r_p (g for a gate path): A = [A_1; A_2; ...] stacked on rows, B = [s_1 B_1, s_2 B_2, ...]
side by side, with each path's scale folded into its B. PEFT's own scale is then made exactly 1
(lora_alpha = r per module, rsLoRA off). Shared tensors are expanded per module: the export is what
standard LoRA loaders (PEFT, serving engines) read.

``serving="vllm"`` or ``"tgi"`` writes what those engines' LoRA loaders accept: one rank for every
module (no rank_pattern / alpha_pattern), padded with zero rows of A and zero columns of B up to a
rank the engines take (``SERVING_RANKS``; outputs are unchanged), only the adapter_config keys they
read, and only the module names they serve (``SERVED_MODULES``, LLaMA / Mistral / Qwen2 naming).
Anything else is refused with an error that names it.
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
SERVING_ENGINES = ("vllm", "tgi")
SERVING_RANKS = (8, 16, 32, 64, 128, 256)
SERVED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SERVING_CONFIG_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules",
                       "lora_dropout", "bias", "use_rslora", "fan_in_fan_out", "modules_to_save", "inference_mode")


@torch.no_grad()
def peft_lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (R, K), B (N, R)) float32 of one SharedLoRALinear, scales folded into B."""
    a_parts, b_parts = [], []
    for p in layer.paths():
        a, b = path_factors(p._replace(tensors=tuple(t.float() for t in p.tensors)), layer.in_features, layer.out_features)
        a_parts.append(a)
        b_parts.append(b * p.scale)
    return torch.cat(a_parts, 0).contiguous(), torch.cat(b_parts, 1).contiguous()


def export_peft(model: nn.Module, directory: str | os.PathLike, serving: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``.

    serving: None (plain PEFT, per-module ranks through rank_pattern), or "vllm" / "tgi" (see the
    module docstring). Returns the directory.
    """
    if serving is not None and serving not in SERVING_ENGINES:
        raise ValueError(f"serving must be None or one of {list(SERVING_ENGINES)}, got {serving!r}")
    plan = get_plan(model)
    factors = {name: peft_lora_factors(model.get_submodule(name)) for name in plan.modules}
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    module_types = sorted({m.info.module_type for m in plan.modules.values()})
    r = max(ranks.values())
    if serving is not None:
        unserved = [t for t in module_types if t not in SERVED_MODULES]
        if unserved:
            raise ValueError(f"{serving} serves LoRA on {list(SERVED_MODULES)}, not on module {unserved[0]!r}")
        if r > SERVING_RANKS[-1]:
            raise ValueError(f"module rank {r} exceeds the largest rank {serving} serves ({SERVING_RANKS[-1]})")
        r = next(x for x in SERVING_RANKS if x >= r)
        factors = {name: _pad_rank(a, b, r) for name, (a, b) in factors.items()}
        ranks = {name: r for name in ranks}
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu()
    uneven = {name: rank for name, rank in ranks.items() if rank != r}
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if serving else peft_task_type(model),
        "base_model_name_or_path": base_name or None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": uneven,
        "alpha_pattern": dict(uneven),
        "target_modules": module_types,
        "lora_dropout": model.sharelora_config.dropout,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if serving is not None:
        peft_config = {k: peft_config[k] for k in SERVING_CONFIG_KEYS}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PEFT_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / PEFT_CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2) + "\n"))
    return out


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type of a Transformers model, read off its class name (what
    ``AutoPeftModel*`` dispatches on); None for anything else."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith(("ForSeq2SeqLM", "ForConditionalGeneration")) and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return None


def _pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (R, K) and B (N, R) padded with zero rows / columns to rank r: B A is unchanged."""
    extra = r - a.shape[0]
    return torch.nn.functional.pad(a, (0, 0, 0, extra)), torch.nn.functional.pad(b, (0, extra))
