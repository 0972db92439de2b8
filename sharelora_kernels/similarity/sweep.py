"""Share sets and trainable-parameter counts over a range of thresholds."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import ShareLoRAConfig
from ..plan import build_plan
from ..targeting import ModuleInfo
from .share_sets import share_sets


@dataclass(frozen=True)
class SweepPoint:
    """One threshold of a sweep. ``sets`` holds the multi-layer share sets only (singletons dropped)."""

    eps: float
    sets: list[list[int]]
    slots: dict[str, int]  # per module type, as built: U = L - sum|S_i| + |S| over its L adapted layers
    lora_params: int  # plain LoRA at config.r
    share_params: int  # ShareLoRA at config.r
    expanded_r: dict[str, int]  # per module type, as built with expand_rank: floor(L / U * r)
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
    ``sharelora_kernels.targeting.find_target_modules`` returns them. Counts, slots and ranks come from
    the plans ``plan.build_plan`` builds.
    """
    if len(S) != num_layers:
        raise ValueError(f"S has {len(S)} layers but num_layers is {num_layers}")
    lora = dataclasses.replace(config, method="lora", share_sets=[], expand_rank=False, rank_pattern={},
                               alpha_pattern={})
    lora_params = build_plan(lora, modules, num_layers).parameter_count()
    points = []
    for eps in eps_values:
        sets = [g for g in share_sets(S, eps, method, contiguous) if len(g) > 1]
        share, expanded = (build_plan(dataclasses.replace(lora, method="similarity", share_sets=sets, expand_rank=e),
                                      modules, num_layers) for e in (False, True))
        points.append(SweepPoint(float(eps), sets, {t: u for t, (u, _) in share.layer_slots().items()}, lora_params,
                                 share.parameter_count(), {t: r for t, (_, r) in expanded.layer_slots().items()},
                                 expanded.parameter_count()))
    return points
