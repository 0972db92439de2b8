"""sharelora_kernels: fused kernels and a thin PyTorch layer for shared low-rank adapters."""
from .checkpoint import load, save
from .config import ShareLoRAConfig
from .export import export_peft
from .layer import SharedLoRALinear
from .model import apply, merge, parameter_breakdown, trainable_parameters, unmerge
from .plan import SharePlan, expanded_rank
from .similarity import (angular_distance, iter_layer_representations, layer_representations, share_sets,
                         sweep_thresholds)

__all__ = [
    "ShareLoRAConfig", "SharedLoRALinear", "SharePlan", "angular_distance", "apply", "export_peft", "expanded_rank",
    "iter_layer_representations", "layer_representations", "load", "merge", "parameter_breakdown", "save", "share_sets", "sweep_thresholds",
    "trainable_parameters", "unmerge",
]
__version__ = "0.1.0"
