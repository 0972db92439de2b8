"""End-to-end training step of a random-weight LLaMA: PEFT LoRA vs ShareLoRA vs Bi-Share LoRA.

One step is forward + loss + backward + AdamW step + zero_grad on a fixed batch of random tokens.
All variants start from the same base weights and are timed interleaved (see timing.py).
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
import torch.nn as nn

from ..config import ShareLoRAConfig
from ..model import apply
from .timing import Timer, cuda_peak_bytes, interleaved, saved_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]

# LLaMA sizes per profile; "cuda" is two real LLaMA-7B layers.
MODEL_SIZES = {
    "quick": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024,
                  batch=2, seq=64),
    "cpu": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=4096,
                batch=2, seq=256),
    "cuda": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                 vocab_size=32000, batch=2, seq=2048),
}


def peft_lora(model: nn.Module, r: int) -> nn.Module:
    """PEFT's LoRA (r, alpha 2r, no dropout) on ``model``'s TARGETS, without the deprecation warning
    PEFT's own call of Transformers' ``is_gradient_checkpointing`` prints on Transformers 5."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))


def build_variants(base: nn.Module, num_layers: int, r: int = 8) -> dict[str, nn.Module]:
    """PEFT LoRA, ShareLoRA (similarity, the top max(2, L/2) layers in one share set), Bi-Share (SS)."""
    share_set = list(range(num_layers - max(2, num_layers // 2), num_layers))
    return {
        "peft_lora": peft_lora(copy.deepcopy(base), r),
        "sharelora": apply(copy.deepcopy(base), ShareLoRAConfig(method="similarity", r=r, alpha=2 * r,
                                                                 target_modules=TARGETS, share_sets=[share_set])),
        "bishare": apply(copy.deepcopy(base), ShareLoRAConfig(method="bishare", alpha=2 * r, target_modules=TARGETS)),
    }


def run_e2e(profile: str, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """Step time, tokens/s, trainable parameters and memory of each variant; all figures with units."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(MODEL_SIZES[profile])
    batch, seq = size.pop("batch"), size.pop("seq")
    config = LlamaConfig(**size, num_key_value_heads=size["num_attention_heads"], max_position_embeddings=seq)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    models = build_variants(base, config.num_hidden_layers)
    del base
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    steps = {name: _train_step(model, tokens) for name, model in models.items()}
    timer = Timer(device)
    timings = interleaved({name: (lambda s=step: timer.time(s)) for name, step in steps.items()}, warmup, repeats)
    out = {}
    for name, model in models.items():
        stats = timings[name]
        params = list(model.parameters())
        out[name] = {
            "step_ms": stats,
            "tokens_per_s": batch * seq / (stats["median"] / 1e3),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "saved_for_backward_bytes": saved_bytes(lambda: model(tokens, labels=tokens).loss, params + [tokens]),
            "cuda_peak_bytes": cuda_peak_bytes(steps[name]) if device.type == "cuda" else None,
        }
    return {"model": {**size, "num_key_value_heads": size["num_attention_heads"], "batch": batch, "seq": seq,
                      "dtype": str(dtype), "targets": TARGETS, "optimizer": "AdamW(lr=1e-4)"},
            "variants": out}


def _train_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
