"""finetune: train ShareLoRA adapters of a plan on a causal language model, save them and a PEFT export.

Reads a ShareLoRAConfig (``plan.json`` from ``plan``), wraps the model (``sharelora_kernels.apply``)
and trains the adapters with AdamW on random windows of the text (default: the built-in
fine-tuning task; next-token loss; each window starts with the tokenizer's BOS token when it has
one), showing a progress bar and the loss. Writes into --out: ``adapter/``
(``sharelora_kernels.save``), ``peft/`` (``sharelora_kernels.export_peft``: a plain PEFT LoRA
checkpoint) and ``losses.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import CommandError, require_positive
from .loading import load_model, load_texts, resolve_device, resolve_model_dir

HELP = "train the adapters of a plan.json and save them (ShareLoRA checkpoint and PEFT export)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, help="ShareLoRAConfig JSON, e.g. plan.json written by `plan`")
    p.add_argument("--model", help="causal LM directory (default: the built-in tiny LLaMA)")
    p.add_argument("--text", help="training text file, paragraphs separated by blank lines (default: the built-in "
                                  "fine-tuning task, unit conversions the model never saw)")
    p.add_argument("--samples", type=int, default=None, help="use only the first N paragraphs (default: all)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training window (with the BOS token, if any)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="sharelora_finetune", help="output directory (default ./sharelora_finetune)")


def run(args: argparse.Namespace) -> list[float]:
    """Train and save; returns the loss of every step."""
    import torch
    from tqdm.auto import tqdm

    import sharelora_kernels as sk

    require_positive(args, "samples", "steps", "batch_size", "lr", "log_every")
    if args.seq_len < 2:
        raise CommandError(f"--seq-len must be >= 2, got {args.seq_len}")
    config = _read_config(Path(args.plan))
    model_dir = resolve_model_dir(args.model)
    device = resolve_device(args.device)
    model, tokenizer = load_model(model_dir, causal_lm=True, device=device)
    tokens = _token_stream(tokenizer, load_texts(args.text, args.samples, builtin="task"))
    if len(tokens) <= args.seq_len:
        raise CommandError(f"the text has {len(tokens)} tokens, fewer than --seq-len {args.seq_len} + 1")
    torch.manual_seed(args.seed)
    try:
        sk.apply(model, config)
    except (ValueError, TypeError) as err:
        raise CommandError(f"plan {args.plan} does not fit {model_dir}: {err}") from err
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{model_dir} ({model.config.model_type}): {sk.trainable_parameters(model):,} trainable adapter parameters "
          f"({config.method}, share sets {config.share_sets})")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    bos = torch.tensor([] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id], dtype=torch.long)
    width = args.seq_len - len(bos)  # windows start with BOS like the model's usual inputs
    losses = []
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc="finetune")
    for step in bar:
        starts = torch.randint(0, len(tokens) - width, (args.batch_size,), generator=gen)
        windows = torch.stack([tokens[s : s + width] for s in starts.tolist()])
        ids = torch.cat([bos.expand(args.batch_size, -1), windows], dim=1).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % args.log_every == 0 or step == args.steps:
            bar.write(f"step {step:5d}  loss {losses[-1]:.4f}")
    k = max(1, min(5, len(losses) // 4))
    print(f"mean loss of the first {k} steps {sum(losses[:k]) / k:.4f} -> last {k} steps {sum(losses[-k:]) / k:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    sk.save(model, out / "adapter")
    sk.export_peft(model, out / "peft")
    (out / "losses.json").write_text(json.dumps({"steps": args.steps, "losses": losses}) + "\n")
    print(f"wrote {out / 'adapter'} (ShareLoRA checkpoint), {out / 'peft'} (PEFT LoRA export), {out / 'losses.json'}")
    return losses


def _read_config(path: Path):
    from ..config import ShareLoRAConfig

    if not path.is_file():
        raise CommandError(f"plan file {path} does not exist (write one with `python -m sharelora_kernels plan`)")
    try:
        return ShareLoRAConfig.from_json(path.read_text())
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise CommandError(f"{path} is not a valid ShareLoRAConfig JSON: {err}") from err


def _token_stream(tokenizer, texts: list[str]):
    """All texts as one 1-D int64 token tensor, paragraphs joined by a blank line, no special tokens."""
    import torch

    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids = []
    for k, paragraph in enumerate(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        ids.extend(separator + paragraph if k else paragraph)
    return torch.tensor(ids, dtype=torch.long)
