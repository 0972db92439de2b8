"""finetune: train the ShareLoRA adapters of a plan on a causal language model, save them and a PEFT export.

Reads a ShareLoRAConfig (plan.json from `plan`), wraps the model (sharelora_kernels.apply) and trains
the adapters with AdamW on random windows of the text (default: the built-in fine-tuning task;
next-token loss; each window starts with the tokenizer's BOS token when it has one), showing a progress bar
and the loss. Every option, the model directory (it must hold a causal LM), the plan (it must fit the
model), --out and the free space there are checked before training. Writes into --out:

    adapter/     the ShareLoRA checkpoint (sharelora_kernels.load reads it)
    peft/        the same adapters as a plain PEFT LoRA (PeftModel.from_pretrained reads it)
    losses.json  the loss of every finished step

The three are written into a hidden temporary folder in --out and moved in together (those of an
earlier run in --out are replaced, all three at once). Ctrl-C, once or more, at any moment of
training or saving stops after the step under way and saves all three as of the last finished step
(exit status 130). If the results cannot be written (a full disk), the trained adapter is kept and
the error says where.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import CommandError, Interrupted, counted, require_positive
from .fitting import structure
from .loading import (add_device_argument, check_weight_shapes, load_model, load_texts, load_tokenizer, model_skeleton,
                      read_model_config, read_plan, resolve_device, resolve_model_dir)
from .options import (add_threads_argument, add_training_arguments, check_threads_argument, check_training_arguments,
                      check_training_fits, set_threads)
from .outputs import RunOutputs, check_out_dir, write_json

HELP = "train the adapters of a plan.json and save them (ShareLoRA checkpoint and PEFT export)"
OUTPUTS = ("adapter/", "peft/", "losses.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", metavar="FILE", required=True,
                   help="ShareLoRAConfig JSON to train, e.g. the plan.json written by `plan` (required)")
    p.add_argument("--model", metavar="DIR", help="causal LM directory (default: the built-in tiny LLaMA)")
    p.add_argument("--text", metavar="FILE",
                   help="training text file, paragraphs separated by blank lines (default: the built-in fine-tuning "
                        "task, unit conversions the model never saw)")
    p.add_argument("--samples", metavar="N", type=int, default=None,
                   help="train on the first N paragraphs only (default: all; 256 of the built-in task, which makes "
                        "at most 100,000)")
    p.add_argument("--steps", metavar="N", type=int, default=30, help="optimizer steps (default: 30)")
    add_training_arguments(p)
    p.add_argument("--log-every", metavar="N", type=int, default=10, help="print the loss every N steps (default: 10)")
    add_device_argument(p)
    add_threads_argument(p)
    p.add_argument("--out", metavar="DIR", default="sharelora_finetune",
                   help="output folder for adapter/, peft/ and losses.json (default: ./sharelora_finetune)")


def run(args: argparse.Namespace) -> list[float]:
    """Check everything, train, save; returns the loss of every step."""
    require_positive(args, "samples", "steps", "log_every")
    check_training_arguments(args)
    check_threads_argument(args)

    import torch

    import sharelora_kernels as sk
    from ..model import plan_model
    from .training import Interrupts, Windows, token_stream

    config = read_plan(Path(args.plan))
    model_dir = resolve_model_dir(args.model)
    model_config = read_model_config(model_dir, causal_lm=True)
    out = check_out_dir(args.out, OUTPUTS)
    texts = load_texts(args.text, args.samples, builtin="task")
    device = resolve_device(args.device)
    check_training_fits(args, model_config, model_dir, device)
    skeleton = model_skeleton(model_config, causal_lm=True)
    check_weight_shapes(model_dir, skeleton)
    try:
        plan_model(skeleton, config)
    except (ValueError, TypeError) as err:
        raise CommandError(f"plan {args.plan} does not fit {model_dir}: {err}") from err
    tokenizer = load_tokenizer(model_dir)
    try:
        batches = Windows(token_stream(tokenizer, texts), args.seq_len, args.batch_size, tokenizer.bos_token_id, args.seed)
    except ValueError as err:
        raise CommandError(f"{err}: lower --seq-len or give a longer --text") from err

    set_threads(args)
    model = load_model(model_dir, causal_lm=True, device=device)
    torch.manual_seed(args.seed)
    sk.apply(model, config)
    print(f"{model_dir} ({model_config.model_type}): {sk.trainable_parameters(model):,} trainable adapter parameters "
          f"({structure(config)})")
    outputs = RunOutputs(out, OUTPUTS)
    outputs.check_space(outputs_bytes(model))

    def write_losses(path: Path) -> None:
        write_json(path, {"steps": args.steps, "finished_steps": len(log.losses), "interrupted": log.interrupted,
                          "losses": log.losses}, indent=None)

    written = f"{out / 'adapter'} (ShareLoRA checkpoint), {out / 'peft'} (PEFT LoRA export), {out / 'losses.json'}"
    with Interrupts() as interrupts:  # from here on a Ctrl-C never costs a finished step
        log = _train_with_progress(model, batches, args, interrupts)
        losses = log.losses
        if losses:
            k = max(1, min(5, len(losses) // 4))
            print(f"mean loss of the first {counted(k, 'step')} {sum(losses[:k]) / k:.4f} -> "
                  f"last {counted(k, 'step')} {sum(losses[-k:]) / k:.4f}")
        outputs.write([("adapter/", lambda path: sk.save(model, path)), ("peft/", lambda path: sk.export_peft(model, path)),
                       ("losses.json", write_losses)])
        if not interrupts.requested:
            print(f"wrote {written}")
    if interrupts.requested:
        raise Interrupted(f"interrupted after {counted(len(losses), 'finished step')} of {args.steps}; "
                          f"saved them to {written}")
    return losses


def _train_with_progress(model, batches, args: argparse.Namespace, interrupts):
    """``training.train`` for finetune's options, with a progress bar and a loss line every --log-every
    steps; the bar is closed and gone when it returns (so a Ctrl-C never lands in its ``__del__``
    outside ``interrupts``)."""
    from tqdm.auto import tqdm

    from .training import adapter_optimizer, train

    with tqdm(total=args.steps, desc="finetune") as bar:
        def on_step(step: int, loss: float) -> None:
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % args.log_every == 0 or step == args.steps:
                bar.write(f"step {step:5d}  loss {loss:.4f}")

        return train(model, adapter_optimizer(model, args.lr), batches, args.steps, on_step, interrupts)


def outputs_bytes(model) -> int:
    """About the bytes finetune writes for ``model``: its adapter tensors and modules trained in full
    (the checkpoint), and each module's adapters as one float32 LoRA (the PEFT export)."""
    from ..checkpoint import saved_state
    from ..model import adapter_tensors, get_plan, shared_layers

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    exported = sum(4 * sum(p.rank for p in layer.paths()) * (layer.in_features + layer.out_features)
                   for layer in shared_layers(model))
    return nbytes(adapter_tensors(model).values()) + 2 * nbytes(saved_state(model, get_plan(model)).values()) + exported
