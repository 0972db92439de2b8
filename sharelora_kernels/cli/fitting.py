"""What fits a model, found on its weightless skeleton: the target modules, the Bi-Share Kronecker dim and
gate core, and the configs built from them (checked by planning them).

``plan`` prices and writes these configs and ``compare`` trains them, so what one reports the other runs.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import CommandError, per_type

PAPER_KRON_DIM = 256  # the Bi-Share paper's d_s = 256
PAPER_GATE_DIM = 1024  # and m = n = 1024


def add_adapter_arguments(p) -> None:
    """The adapter options ``lora_config`` reads: --r, --alpha, --target-modules."""
    p.add_argument("--r", metavar="R", type=int, default=8, help="LoRA / ShareLoRA rank (default: 8)")
    p.add_argument("--alpha", metavar="ALPHA", type=float, default=16.0,
                   help="adapter scale numerator, scale = alpha / r (default: 16)")
    p.add_argument("--target-modules", metavar="NAME", nargs="+", default=None,
                   help="modules to adapt: a name matches a module's full name or its dotted suffix, as in PEFT; "
                        "all-linear: every linear layer but the output head (default: the model type's default "
                        "targets, sharelora_kernels.targeting.DEFAULT_TARGET_MODULES)")


def config_targets(targets: list[str] | None) -> list[str] | str | None:
    """--target-modules as ``ShareLoRAConfig.target_modules`` takes it: a list, "all-linear", or None (defaults)."""
    return "all-linear" if targets == ["all-linear"] else targets


def target_modules(skeleton, targets: list[str] | None, model_dir: Path):
    """(ModuleInfo list, layer count) of ``targets`` in the model; CommandError if none or unusable."""
    from ..config import ShareLoRAConfig
    from ..targeting import find_target_modules

    try:
        infos, num_layers = find_target_modules(skeleton, ShareLoRAConfig(target_modules=config_targets(targets)))
    except (ValueError, TypeError) as err:
        raise CommandError(f"--target-modules: {err} ({model_dir})") from err
    if not infos:
        raise CommandError(f"--target-modules: no target module found in {model_dir}; "
                           "pass the names of its linear layers (e.g. query key value for BERT)")
    return infos, num_layers


def fitted_dims(infos, kron_dim: int | None = None) -> dict:
    """``{"kron_dim": d, "gate_dims": (m, n)}`` for the modules ``infos`` (ModuleInfo list).

    kron_dim: the user's choice, or None for the paper's 256, or the largest power of two dividing
    every module dim when 256 does not. gate_dims: the paper's 1024 x 1024 core, shrunk to the
    smallest in / out features among the modules (a core wider than a module only adds parameters).
    """
    if kron_dim is None:
        common = math.gcd(*(d for m in infos for d in (m.in_features, m.out_features)))
        kron_dim = min(common & -common, PAPER_KRON_DIM)
    gate_dims = (min(PAPER_GATE_DIM, *(m.in_features for m in infos)), min(PAPER_GATE_DIM, *(m.out_features for m in infos)))
    return {"kron_dim": kron_dim, "gate_dims": gate_dims}


def lora_config(infos, r: int, alpha: float, targets: list[str] | None, kron_dim: int | None = None):
    """The plain LoRA ShareLoRAConfig of the command line, with the Bi-Share dims ``fitted_dims`` finds for
    ``infos``: the base every other config of `plan` and `compare` is made from. CommandError on a bad value."""
    from ..config import ShareLoRAConfig

    try:
        return ShareLoRAConfig(method="lora", r=r, alpha=alpha, target_modules=config_targets(targets),
                               **fitted_dims(infos, kron_dim))
    except ValueError as err:
        raise CommandError(str(err)) from err


def bishare_configs(base, infos, num_layers: int) -> dict:
    """Bi-Share configs, one per shape transform at the paper's ranks, with ``base``'s targets, alpha,
    dropout, kron_dim and gate_dims: {"slice": ShareLoRAConfig, "gate": ..., "kron": ...}.

    CommandError naming the transform if one does not fit the modules (e.g. kron_dim not dividing a dim).
    """
    import dataclasses

    from ..config import SHAPE_TRANSFORMS

    configs = {}
    for transform in SHAPE_TRANSFORMS:
        config = dataclasses.replace(base, method="bishare", shape_transform=transform, share_sets=[], expand_rank=False,
                                     local_r=None, intra_r=None, inter_r=None)  # None: the paper's ranks
        parameter_count(config, infos, num_layers, what=f"Bi-Share {transform}")
        configs[transform] = config
    return configs


def parameter_count(config, infos, num_layers: int, what: str) -> int:
    """Trainable parameters of ``config`` on the modules ``infos``; CommandError starting with ``what`` if it does not fit."""
    from ..plan import build_plan

    try:
        return build_plan(config, infos, num_layers).parameter_count()
    except ValueError as err:
        raise CommandError(f"{what}: {err}") from err


def label(config, infos, num_layers: int) -> str:
    """What a config trains on target modules ``infos``, in a few words, as the rows of `plan` and
    `compare` name it: "LoRA r=8", "ShareLoRA r=20 (expanded)" (the rank the plan builds; per module
    type, "ShareLoRA r=q_proj 20, v_proj 16 (expanded)", where they differ; a type outside the
    numbered layers keeps r), "Bi-Share kron (2,4,16) d_s=64"."""
    from ..plan import build_plan

    if config.method == "lora":
        return f"LoRA r={config.r}"
    if config.method == "similarity":
        slots = build_plan(config, infos, num_layers).layer_slots() if config.expand_rank else {}
        if not slots:  # nothing expanded (no module in the numbered layers): r as configured
            return f"ShareLoRA r={config.r}"
        ranks = {t: r for t, (_, r) in slots.items()}
        for m in infos:  # a type outside the numbered layers (a head) keeps r
            ranks.setdefault(m.module_type, config.r)
        return f"ShareLoRA r={per_type(ranks)} (expanded)"
    ranks = "({},{},{})".format(*config.bishare_ranks())
    extra = {"gate": " m,n={},{}".format(*config.gate_dims), "kron": f" d_s={config.kron_dim}"}
    return f"Bi-Share {config.shape_transform} {ranks}{extra.get(config.shape_transform, '')}"


def structure(config) -> str:
    """Who shares what under ``config``, in one line (what `finetune` prints before training):
    "Bi-Share LoRA: local r=2 (per module) + intra r=4 (per layer) + inter r=32 (whole model), slice ..."."""
    if config.method == "lora":
        return f"plain LoRA r={config.r}: every module its own A and B, nothing shared"
    if config.method == "similarity":
        rank = f"r={config.r}" + (" raised by expand_rank" if config.expand_rank else "")
        if not config.share_sets:
            return f"ShareLoRA {rank}: no share set, every layer its own A and B"
        return f"ShareLoRA {rank}: the layers of each share set share A and B, share sets {config.share_sets}"
    if config.method in ("share_a", "share_b", "share_ab"):
        shared = {"share_a": "one A per module type for all layers, B per layer",
                  "share_b": "one B per module type for all layers, A per layer",
                  "share_ab": "one A and one B per module type for all layers"}[config.method]
        return f"{config.method} r={config.r}: {shared}"
    transform = {"slice": f"slice sharing ({config.slice_policy} slices)",
                 "gate": "gate transformation (core {} x {}, gate rank {})".format(*config.gate_dims, config.gate_rank),
                 "kron": f"Kronecker extension (d_s={config.kron_dim})"}[config.shape_transform]
    local_r, intra_r, inter_r = config.bishare_ranks()
    return (f"Bi-Share LoRA: local r={local_r} (per module) + intra r={intra_r} (per layer, shared by "
            f"its modules) + inter r={inter_r} (whole model), shape transform {transform}")
