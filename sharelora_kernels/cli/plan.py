"""plan: find share sets from layer similarities and write ShareLoRA configs that fit the model.

Runs the frozen model on calibration text, takes each sample's last-token hidden state at every
layer, measures the mean angular distance between layers, groups layers with similarity >= eps,
prints the share sets and the trainable-parameter counts (LoRA, ShareLoRA with and without rank
expansion, Bi-Share LoRA at the paper's ranks with a Kronecker dim and gate core that fit the model),
and writes into --out (all through a hidden temporary folder in it, moved in together):

    plan.json               ShareLoRAConfig: method "similarity", the share sets found, and the Bi-Share
                            kron_dim / gate_dims priced for this model (finetune --plan trains it)
    bishare_<t>.json        the Bi-Share configs priced, t = slice, gate, kron (finetune --plan trains them)
    similarity.json         the similarity matrix, all share sets, the counts and a threshold sweep
    similarity.png          the similarity heatmap, share sets outlined

Every option, the model directory and --out are checked before the model is loaded.
"""
from __future__ import annotations

import argparse

from . import CommandError, counted, per_type, require_between, require_positive
from .fitting import add_adapter_arguments, bishare_configs, label, lora_config, parameter_count, target_modules
from .loading import (add_device_argument, check_weight_shapes, load_model, load_texts, load_tokenizer, max_positions,
                      model_skeleton, read_model_config, resolve_device, resolve_model_dir)
from .options import add_threads_argument, check_threads_argument, set_threads
from .outputs import RunOutputs, check_out_dir, write_json, write_text

HELP = "find share sets from layer similarity and write plan.json"
SWEEP_EPS = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
DEFAULT_SAMPLES = 64
DEFAULT_MAX_LENGTH = 128
OUTPUTS = ("plan.json", "bishare_slice.json", "bishare_gate.json", "bishare_kron.json", "similarity.json", "similarity.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="Transformers model directory (default: the built-in tiny LLaMA)")
    p.add_argument("--text", metavar="FILE",
                   help="calibration text file, paragraphs separated by blank lines (default: the built-in corpus)")
    p.add_argument("--samples", metavar="N", type=int, default=None,
                   help=f"calibration paragraphs (default: {DEFAULT_SAMPLES}, or all of a shorter --text)")
    p.add_argument("--max-length", metavar="N", type=int, default=None,
                   help="tokens per calibration sample, longer ones are truncated; at most the model's maximum "
                        f"positions (default: {DEFAULT_MAX_LENGTH}, or that maximum when smaller)")
    p.add_argument("--eps", metavar="EPS", type=float, default=0.85,
                   help="similarity threshold in [0, 1] (default: 0.85)")
    p.add_argument("--method", choices=("complete", "anchor"), default="complete",
                   help="share-set construction: complete (every pair in a set >= eps) or anchor (every layer "
                        ">= eps to the set's first) (default: complete)")
    p.add_argument("--contiguous", action="store_true", help="only sets of consecutive layers (default: off)")
    p.add_argument("--position", choices=("input", "output"), default="input",
                   help="residual stream entering (input) or leaving (output) each layer, the last layer's as the "
                        "model reports it, e.g. after LLaMA's final norm (default: input)")
    p.add_argument("--batch-size", metavar="N", type=int, default=16,
                   help="calibration samples per forward pass (default: 16)")
    add_adapter_arguments(p)
    add_device_argument(p)
    add_threads_argument(p)
    p.add_argument("--expand-rank", action="store_true",
                   help="write expand_rank=true into plan.json: rank floor(L/U r), about LoRA's parameter count "
                        "(default: off)")
    p.add_argument("--kron-dim", metavar="D", type=int,
                   help="Bi-Share Kronecker d_s, must divide every module dim (default: 256, or the largest power "
                        "of two dividing every module dim)")
    p.add_argument("--out", metavar="DIR", default="sharelora_plan", help="output folder (default: ./sharelora_plan)")


def similarity(model, tokenizer, texts: list[str], max_length: int, position: str, batch_size: int):
    """(L, L) float64 layer similarity 1 - angular distance of ``model`` on ``texts``, each truncated to
    ``max_length`` tokens, at ``position`` ("input" / "output"), streamed ``batch_size`` samples at a time.
    CommandError naming the sample and layer of a representation with no direction."""
    from ..similarity import RepresentationError, angular_distance, iter_layer_representations

    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    reps = iter_layer_representations(model, batch["input_ids"], batch["attention_mask"], position=position,
                                      batch_size=batch_size)
    try:
        return 1.0 - angular_distance(reps)
    except RepresentationError as err:  # a representation with no direction (zero) or NaN / Inf
        raise CommandError(f"cannot measure the layer similarity: {err}") from err


def run(args: argparse.Namespace) -> dict:
    """Check everything, compute and write the plan; returns the similarity.json content."""
    import dataclasses

    require_positive(args, "samples", "max_length", "r", "alpha", "kron_dim", "batch_size")
    require_between(args, "eps", 0, 1)
    check_threads_argument(args)

    from ..similarity import share_sets, similarity_heatmap, sweep_thresholds

    model_dir = resolve_model_dir(args.model)
    model_config = read_model_config(model_dir, causal_lm=False)
    if getattr(model_config, "is_encoder_decoder", False):
        raise CommandError(f"{model_dir} ({model_config.model_type}) is an encoder-decoder model: share sets name the "
                           "layers of one stack, and plan measures a single stack's similarity (use a decoder-only or "
                           "encoder-only model, or method 'lora' / 'share_*' through the Python API)")
    out = check_out_dir(args.out, OUTPUTS)
    texts = load_texts(args.text, args.samples, default=DEFAULT_SAMPLES)
    device = resolve_device(args.device)
    limit = max_positions(model_config)
    if args.max_length is not None and limit is not None and args.max_length > limit:
        raise CommandError(f"--max-length {args.max_length} is longer than the model of {model_dir} takes: at most "
                           f"{limit} tokens (its maximum positions, config.json)")
    max_length = args.max_length or min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    skeleton = model_skeleton(model_config, causal_lm=False)
    check_weight_shapes(model_dir, skeleton)
    infos, num_layers = target_modules(skeleton, args.target_modules, model_dir)
    base = lora_config(infos, args.r, args.alpha, args.target_modules, args.kron_dim)
    bishare = bishare_configs(base, infos, num_layers)
    tokenizer = load_tokenizer(model_dir)

    set_threads(args)
    model = load_model(model_dir, causal_lm=False, device=device)
    S = similarity(model, tokenizer, texts, max_length, args.position, args.batch_size)
    if num_layers != S.shape[0]:
        raise CommandError(f"{model_dir} reports {S.shape[0]} layers of hidden states but {num_layers} layers of "
                           "target modules")
    sets = share_sets(S, args.eps, method=args.method, contiguous=args.contiguous)
    multi = [g for g in sets if len(g) > 1]
    plan_config = dataclasses.replace(base, method="similarity", share_sets=multi, expand_rank=args.expand_rank)
    point = sweep_thresholds(S, [args.eps], base, infos, num_layers, args.method, args.contiguous)[0]
    sweep = sweep_thresholds(S, SWEEP_EPS, base, infos, num_layers, args.method, args.contiguous)
    info = {
        "model": str(model_dir), "model_type": model_config.model_type, "num_layers": num_layers,
        "samples": len(texts), "position": args.position, "eps": args.eps, "method": args.method,
        "contiguous": args.contiguous, "share_sets": sets, "counts": point.to_dict(),
        "bishare": {t: {"label": label(c, infos, num_layers), "ranks": list(c.bishare_ranks()),
                        "params": parameter_count(c, infos, num_layers, t), "file": f"bishare_{t}.json",
                        **({"kron_dim": c.kron_dim} if t == "kron" else {}),
                        **({"gate_dims": list(c.gate_dims)} if t == "gate" else {})} for t, c in bishare.items()},
        "sweep": [p.to_dict() for p in sweep], "similarity": S.tolist(),
    }
    expanded = dataclasses.replace(plan_config, expand_rank=True)
    rows = [(label(base, infos, num_layers), point.lora_params, ""),
            (label(dataclasses.replace(plan_config, expand_rank=False), infos, num_layers), point.share_params,
             "(plan.json with expand_rank false)" if args.expand_rank else "plan.json"),
            (label(expanded, infos, num_layers), point.share_expanded_params,
             "plan.json" if args.expand_rank else "(plan --expand-rank)")]
    rows += [(c["label"], c["params"], c["file"]) for c in info["bishare"].values()]
    _report(info, point, sweep, rows)
    title = (f"{model_dir.name} ({model_config.model_type}, {counted(num_layers, 'layer')}): layer similarity\n"
             f"{counted(len(texts), 'sample')}, residual stream {'entering' if args.position == 'input' else 'leaving'} "
             f"each layer; share sets at eps={args.eps} ({args.method}{', contiguous' if args.contiguous else ''})")

    configs = {"plan.json": plan_config, **{f"bishare_{t}.json": c for t, c in bishare.items()}}
    RunOutputs(out, OUTPUTS).write(
        [(name, lambda path, c=c: write_text(path, c.to_json() + "\n")) for name, c in configs.items()]
        + [("similarity.json", lambda path: write_json(path, info)),
           ("similarity.png", lambda path: similarity_heatmap(S, multi, path, title=title, eps=args.eps))])
    print("wrote " + ", ".join(str(out / name) for name in OUTPUTS))
    return info


def _report(info: dict, point, sweep, rows: list[tuple[str, int, str]]) -> None:
    """Print the share sets, the trainable parameters of each (label, count, file that trains it) row and the sweep."""
    lora = point.lora_params
    print(f"model {info['model']} ({info['model_type']}, {counted(info['num_layers'], 'layer')}); "
          f"{counted(info['samples'], 'calibration sample')}, position {info['position']}")
    print(f"share sets at eps={info['eps']} ({info['method']}{', contiguous' if info['contiguous'] else ''}):")
    multi = [g for g in info["share_sets"] if len(g) > 1]
    print("  " + (" ".join("{" + ",".join(map(str, g)) + "}" for g in multi) or "none (every layer keeps its own adapter)"))
    print(f"  adapter slots per module type: {per_type(point.slots)}, for {counted(info['num_layers'], 'layer')}")
    print("trainable parameters:")
    for name, n, file in rows:
        print(f"  {name:<36} {n:>12,}  ({100.0 * n / lora:5.1f}% of LoRA)  {file}".rstrip())
    print("threshold sweep (eps: sets / slots / ShareLoRA params):")
    for p in sweep:
        print(f"  {p.eps:.2f}: {counted(len(p.sets), 'set')} / {per_type(p.slots)} / {p.share_params:,}")
