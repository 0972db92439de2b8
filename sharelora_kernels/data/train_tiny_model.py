"""Train the built-in tiny LLaMA-architecture byte-level language model on calibration.txt.

Reproducible (seeded, single-threaded by default) and a few CPU minutes long:

    python -m sharelora_kernels.data.train_tiny_model            # writes sharelora_kernels/data/tiny_llama/

The output directory loads offline like any local Transformers model:
``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``. Weights are
stored in bfloat16 to keep the directory small; config.json asks for float32, so ``from_pretrained``
upcasts them. ``training_log.json`` records the loss curve, the wall time and the final loss.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DATA_DIR = Path(__file__).resolve().parent
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 256, 257, 258, 259 after the 256 bytes
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258


def model_config() -> LlamaConfig:
    """10 layers, hidden 128, MLP 256, 4 query heads and 2 KV heads of 32 (k/v project to 64)."""
    return LlamaConfig(vocab_size=256 + len(SPECIALS), hidden_size=128, intermediate_size=256,
                       num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=True,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: token id = byte value, specials after; prepends <s>; lossless round trip."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab.update({tok: 256 + k for k, tok in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2 convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    """``steps`` batches of ``batch`` random windows of ``seq`` bytes, each preceded by <s>: (batch, seq + 1) int64."""
    gen = torch.Generator().manual_seed(seed)
    bos = torch.full((batch, 1), BOS_ID, dtype=torch.long)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq, (batch,), generator=gen)
        yield torch.cat([bos, torch.stack([data[s : s + seq] for s in starts.tolist()])], dim=1)


@torch.no_grad()
def corpus_loss(model: LlamaForCausalLM, data: torch.Tensor, seq: int) -> float:
    """Mean next-byte cross-entropy (nats) over the corpus cut into consecutive windows."""
    windows = data[: len(data) // seq * seq].view(-1, seq)
    ids = torch.cat([torch.full((len(windows), 1), BOS_ID, dtype=torch.long), windows], dim=1)
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in ids.split(32)]
    return sum(losses) / len(losses)


def train(out: Path, steps: int, batch: int, seq: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    text = (DATA_DIR / "calibration.txt").read_text(encoding="utf-8")
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    model = LlamaForCausalLM(model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    log, start = [], time.time()
    model.train()
    for step, ids in enumerate(batches(data, steps, batch, seq, seed), start=1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    train_seconds = time.time() - start
    model.eval()
    model = model.to(torch.bfloat16).to(torch.float32)  # evaluate what is shipped (bf16-rounded weights)
    final = corpus_loss(model, data, seq)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"  # weights are bf16 on disk; load (and fine-tune) in float32
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    byte_tokenizer().save_pretrained(out)
    tok_path = out / "tokenizer_config.json"  # Transformers 5 writes its own class name, unknown to 4.x
    tok_config = json.loads(tok_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]  # 4.x adds token_type_ids, which LLaMA refuses
    tok_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; package data must be readable by every user
    summary = {"steps": steps, "batch": batch, "seq": seq, "lr": lr, "seed": seed, "threads": torch.get_num_threads(),
               "train_seconds": round(train_seconds, 1), "final_corpus_loss_nats_per_byte": round(final, 4),
               "parameters": sum(p.numel() for p in model.parameters()), "log": log}
    (out / "training_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {train_seconds:.0f}s; corpus loss {final:.4f} nats/byte; saved to {out}")
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DATA_DIR / "tiny_llama")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.batch, args.seq, args.lr, args.seed)


if __name__ == "__main__":
    main()
