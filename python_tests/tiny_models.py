"""Tiny random Transformers models for tests (LLaMA, Mistral (GQA) and Qwen2 shapes; every family with default
targets through ``tiny_family``), seeded, and small helpers the tests share."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

ARCHS = ("llama", "mistral", "qwen2")
VOCAB = 61


def tiny_model(arch: str = "llama", layers: int = 4, dtype=torch.float32, seed: int = 0):
    """A random causal LM with hidden 32, MLP 48, 4 heads (2 KV heads: k/v are 16 wide), eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "mistral": (MistralForCausalLM, MistralConfig),
                "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    return cls(cfg(**common)).to(dtype).eval()


def enable_checkpointing(model, reentrant: bool) -> None:
    """Gradient checkpointing through the current Transformers call: activation_checkpointing_enable
    (5.x, where gradient_checkpointing_enable is its deprecated alias), gradient_checkpointing_enable (4.x)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})


def randomize_adapters(model, std: float = 0.2, seed: int = 1) -> None:
    """Give every trainable tensor fresh non-zero values (fresh adapters have B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def token_batch(batch: int = 2, seq: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    """The model's logits of ``ids`` without autograd (``kw`` go to its forward)."""
    with torch.no_grad():
        return model(ids, **kw).logits


def logits_and_grads(model, ids: torch.Tensor, call=None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(the logits of ``ids``, detached; the gradients of their mean square with respect to every
    trainable parameter of ``model``), computed by ``call`` (default: the model; e.g. a compiled copy)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = (model if call is None else call)(ids).logits
    return out.detach(), torch.autograd.grad(out.pow(2).mean(), params)


# Every method and shape transform, with settings that fit the tiny models (dims 16, 32, 48).
METHOD_CONFIGS = {
    "lora": dict(method="lora", r=3),
    "similarity": dict(method="similarity", r=3, share_sets=[[1, 2, 3]], expand_rank=True),
    "share_a": dict(method="share_a", r=3),
    "share_b": dict(method="share_b", r=3),
    "share_ab": dict(method="share_ab", r=3),
    "bishare_slice": dict(method="bishare", shape_transform="slice", local_r=1, intra_r=3, inter_r=5),
    "bishare_slice_topleft": dict(method="bishare", shape_transform="slice", slice_policy="top_left",
                                  local_r=0, intra_r=2, inter_r=3),
    "bishare_gate": dict(method="bishare", shape_transform="gate", gate_dims=(8, 12), gate_rank=2),
    "bishare_kron": dict(method="bishare", shape_transform="kron", kron_dim=8, local_r=1, intra_r=3, inter_r=2),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


# Tiny random models of every family with a default target table (targeting.DEFAULT_TARGET_MODULES),
# built from configs: hidden 32, 2 layers, vocab VOCAB; ``head`` picks the Auto class.
FAMILIES = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "bert", "roberta", "t5", "falcon", "bloom", "gpt_neox")


def tiny_family(model_type: str, head: str = "causal_lm", layers: int = 2, seed: int = 0, **extra):
    """A random model of ``model_type`` with the ``head`` Auto class ("causal_lm", "seq_cls",
    "token_cls", "qa", "base", "seq2seq"), eval mode. ``extra``: config overrides (e.g. num_labels)."""
    import transformers

    sizes = {"gpt2": dict(n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
             "t5": dict(d_model=32, d_kv=8, d_ff=48, num_layers=layers, num_heads=4, decoder_start_token_id=0),
             "bert": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                          max_position_embeddings=64),
             "phi3": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2),
             "falcon": dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4),  # FalconLinear layers
             "bloom": dict(hidden_size=32, n_layer=layers, n_head=4),
             "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                              max_position_embeddings=64)}
    sizes["roberta"] = {**sizes["bert"], "pad_token_id": 1, "max_position_embeddings": 70}
    default = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
    if model_type == "gemma":
        default["head_dim"] = 8
    config = transformers.AutoConfig.for_model(model_type, **{"vocab_size": VOCAB, **sizes.get(model_type, default), **extra})
    auto = {"causal_lm": transformers.AutoModelForCausalLM, "seq_cls": transformers.AutoModelForSequenceClassification,
            "token_cls": transformers.AutoModelForTokenClassification, "qa": transformers.AutoModelForQuestionAnswering,
            "base": transformers.AutoModel, "seq2seq": transformers.AutoModelForSeq2SeqLM}[head]
    torch.manual_seed(seed)
    return auto.from_config(config).eval()


class TokenWindows(torch.utils.data.Dataset):
    """``length`` random windows of 8 tokens, labels = inputs (for Trainer tests)."""

    def __init__(self, length: int = 8):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        ids = token_batch(1, 8, seed=100 + i)[0]
        return {"input_ids": ids, "labels": ids}
