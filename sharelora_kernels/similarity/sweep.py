"""Share sets and trainable-parameter counts over a range of thresholds."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import ShareLoRAConfig
from ..plan import build_plan, expanded_rank
from ..targeting import ModuleInfo
from .share_sets import share_sets


@dataclass(frozen=True)
class SweepPoint:
    """One threshold of a sweep. ``sets`` holds the multi-layer share sets only (singletons dropped)."""

    eps: float
    sets: list[list[int]]
    slots: int  # unique adapter slots per module type, U = L - sum|S_i| + |S|
    lora_params: int  # plain LoRA at config.r
    share_params: int  # ShareLoRA at config.r
    expanded_r: int  # floor(L / U * r)
    share_expanded_params: int  # ShareLoRA at expanded_r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sweep_thresholds(
    S,
    eps_values: Iterable[float],
    config: ShareLoRAConfig,
    modules: list[ModuleInfo],
    num_layers: int,
    method: str = "complete",
    contiguous: bool = False,
) -> list[SweepPoint]:
    """For each eps: ``share_sets(S, eps, method, contiguous)`` and the trainable-parameter counts.

    S: (L, L) similarity with L == num_layers. config supplies r, alpha and target_modules (its
    method, share sets, expand_rank and LoRA's per-module rank_pattern / alpha_pattern are ignored:
    every count is at config.r); modules / num_layers are the model's target modules, as
    ``sharelora_kernels.targeting.find_target_modules`` returns them. Counts come from
    ``plan.build_plan(...).parameter_count()``.
    """
    if len(S) != num_layers:
        raise ValueError(f"S has {len(S)} layers but num_layers is {num_layers}")
    lora = dataclasses.replace(config, method="lora", share_sets=[], expand_rank=False, rank_pattern={},
                               alpha_pattern={})
    lora_params = build_plan(lora, modules, num_layers).parameter_count()
    points = []
    for eps in eps_values:
        sets = [g for g in share_sets(S, eps, method, contiguous) if len(g) > 1]
        counts = {}
        for expand in (False, True):
            cfg = dataclasses.replace(lora, method="similarity", share_sets=sets, expand_rank=expand)
            counts[expand] = build_plan(cfg, modules, num_layers).parameter_count()
        slots = num_layers - sum(len(g) for g in sets) + len(sets)
        points.append(SweepPoint(float(eps), sets, slots, lora_params, counts[False],
                                 expanded_rank(num_layers, sets, config.r), counts[True]))
    return points
