"""plan: find share sets from layer similarities and write a ShareLoRA config.

Runs the frozen model on calibration text, takes each sample's last-token hidden state at every
layer, measures the mean angular distance between layers, groups layers with similarity >= eps,
prints the share sets and the trainable-parameter counts (LoRA, ShareLoRA with and without rank
expansion, Bi-Share LoRA at the paper defaults), and writes into --out:

    plan.json        a ShareLoRAConfig (method "similarity", the found share sets): ShareLoRAConfig.from_json
    similarity.json  the similarity matrix, all share sets, the counts and a threshold sweep
    similarity.png   the similarity heatmap with the share sets outlined (when matplotlib is installed)
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import CommandError, require_positive
from .loading import load_model, load_texts, resolve_device, resolve_model_dir

HELP = "find share sets from layer similarity and write plan.json"
SWEEP_EPS = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Transformers model directory (default: the built-in tiny LLaMA)")
    p.add_argument("--text", help="calibration text file, paragraphs separated by blank lines (default: built-in corpus)")
    p.add_argument("--samples", type=int, default=64, help="calibration paragraphs (default 64)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sample, longer ones are truncated (default 128)")
    p.add_argument("--eps", type=float, default=0.85, help="similarity threshold in [0, 1] (default 0.85)")
    p.add_argument("--method", choices=("complete", "anchor"), default="complete")
    p.add_argument("--contiguous", action="store_true", help="only sets of consecutive layers")
    p.add_argument("--position", choices=("input", "output"), default="input",
                   help="residual stream entering (input) or leaving (output) each layer")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--expand-rank", action="store_true", help="write expand_rank=true into plan.json")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="module names (a name matches a module's full name or its dotted suffix, as in PEFT), or "
                        "all-linear (default: the model type's default targets, sharelora_kernels.targeting)")
    p.add_argument("--kron-dim", type=int, help="Bi-Share Kronecker d_s for the count (default: 256, or the largest power of two dividing every module dim)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="sharelora_plan", help="output directory (default ./sharelora_plan)")


def run(args: argparse.Namespace) -> dict:
    """Compute and write the plan; returns the similarity.json content."""
    import torch

    from ..config import ShareLoRAConfig
    from ..targeting import find_target_modules
    from ..similarity import angular_distance, iter_layer_representations, share_sets, similarity_heatmap, sweep_thresholds

    require_positive(args, "samples", "max_length", "r", "alpha", "kron_dim", "batch_size")
    if not 0.0 <= args.eps <= 1.0:
        raise CommandError(f"--eps must be in [0, 1], got {args.eps}")
    model_dir = resolve_model_dir(args.model)
    model, tokenizer = load_model(model_dir, causal_lm=False, device=resolve_device(args.device))
    if getattr(model.config, "is_encoder_decoder", False):
        raise CommandError(f"{model_dir} ({model.config.model_type}) is an encoder-decoder model: share sets name the "
                           "layers of one stack, and plan measures a single stack's similarity (use a decoder-only or "
                           "encoder-only model, or method 'lora' / 'share_*' through the Python API)")
    texts = load_texts(args.text, args.samples)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    reps = iter_layer_representations(model, batch["input_ids"], batch["attention_mask"], position=args.position,
                                      batch_size=args.batch_size)
    S = 1.0 - angular_distance(reps)  # streamed: one batch of representations at a time
    sets = share_sets(S, args.eps, method=args.method, contiguous=args.contiguous)
    multi = [g for g in sets if len(g) > 1]

    targets = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules  # None: the model type's
    try:
        base = ShareLoRAConfig(method="lora", r=args.r, alpha=args.alpha, target_modules=targets)
        infos, num_layers = find_target_modules(model, base)
        if not infos:
            raise ValueError(f"no target module found in {model_dir}; pass --target-modules")
        plan_config = ShareLoRAConfig(method="similarity", r=args.r, alpha=args.alpha, target_modules=targets,
                                      share_sets=multi, expand_rank=args.expand_rank)
    except (ValueError, TypeError) as err:
        raise CommandError(str(err)) from err
    if num_layers != S.shape[0]:
        raise CommandError(f"{model_dir} reports {S.shape[0]} layers of hidden states but {num_layers} layers of target modules")
    point = sweep_thresholds(S, [args.eps], base, infos, num_layers, args.method, args.contiguous)[0]
    sweep = sweep_thresholds(S, SWEEP_EPS, base, infos, num_layers, args.method, args.contiguous)
    bishare = _bishare_counts(infos, num_layers, targets, args.alpha, args.kron_dim)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(plan_config.to_json() + "\n")
    info = {
        "model": str(model_dir), "model_type": model.config.model_type, "num_layers": num_layers,
        "samples": len(texts), "position": args.position, "eps": args.eps, "method": args.method,
        "contiguous": args.contiguous, "share_sets": sets, "counts": point.to_dict(), "bishare": bishare,
        "sweep": [p.to_dict() for p in sweep], "similarity": S.tolist(),
    }
    (out / "similarity.json").write_text(json.dumps(info, indent=1) + "\n")
    _report(info, point, sweep, bishare, args.r)
    written = [out / "plan.json", out / "similarity.json"]
    try:
        written.append(similarity_heatmap(S, multi, out / "similarity.png",
                                          title=f"{model_dir.name}: similarity, share sets at eps={args.eps} ({args.method})"))
    except ImportError as err:  # matplotlib is optional
        print(f"similarity.png not drawn: {err}")
    print("wrote " + ", ".join(str(p) for p in written))
    return info


def _bishare_counts(infos, num_layers: int, targets: list[str], alpha: float, kron_dim: int | None) -> dict:
    """Trainable parameters of Bi-Share LoRA at the paper's default ranks, per shape transform."""
    from ..config import BISHARE_DEFAULT_RANKS, ShareLoRAConfig
    from ..plan import build_plan

    dims = [d for m in infos for d in (m.in_features, m.out_features)]
    if kron_dim is None:
        common = math.gcd(*dims)
        kron_dim = min(common & -common, 256)  # the paper's 256, or the largest power of two dividing every dim
    # the paper's 1024 x 1024 gate core, or the smallest module dims when a model is smaller
    gate_dims = [min(1024, *(m.in_features for m in infos)), min(1024, *(m.out_features for m in infos))]
    counts = {}
    for transform, ranks in BISHARE_DEFAULT_RANKS.items():
        cfg = ShareLoRAConfig(method="bishare", target_modules=targets, alpha=alpha, shape_transform=transform,
                              kron_dim=kron_dim, gate_dims=gate_dims)
        try:
            counts[transform] = {"ranks": list(ranks), "params": build_plan(cfg, infos, num_layers).parameter_count()}
        except ValueError as err:
            raise CommandError(f"Bi-Share {transform}: {err}") from err
    counts["kron"]["kron_dim"] = kron_dim
    counts["gate"]["gate_dims"] = gate_dims
    return counts


def _report(info: dict, point, sweep, bishare: dict, r: int) -> None:
    lora = point.lora_params
    print(f"model {info['model']} ({info['model_type']}, {info['num_layers']} layers); "
          f"{info['samples']} calibration samples, position {info['position']}")
    print(f"share sets at eps={info['eps']} ({info['method']}{', contiguous' if info['contiguous'] else ''}):")
    multi = [g for g in info["share_sets"] if len(g) > 1]
    print("  " + (" ".join("{" + ",".join(map(str, g)) + "}" for g in multi) or "none (every layer keeps its own adapter)"))
    print(f"  {point.slots} adapter slots per module type for {info['num_layers']} layers")
    rows = [(f"LoRA r={r}", lora),
            (f"ShareLoRA r={r}", point.share_params),
            (f"ShareLoRA expanded r={point.expanded_r}", point.share_expanded_params)]
    for transform, c in bishare.items():
        extra = f" d_s={c['kron_dim']}" if "kron_dim" in c else (" m,n={},{}".format(*c["gate_dims"]) if "gate_dims" in c else "")
        rows.append((f"Bi-Share {transform} ranks {tuple(c['ranks'])}{extra}", c["params"]))
    print("trainable parameters:")
    for name, n in rows:
        print(f"  {name:<42} {n:>12,}  ({100.0 * n / lora:5.1f}% of LoRA)")
    print("threshold sweep (eps: sets / slots / ShareLoRA params):")
    for p in sweep:
        print(f"  {p.eps:.2f}: {len(p.sets)} sets / {p.slots} slots / {p.share_params:,}")
