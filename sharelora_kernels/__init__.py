"""sharelora_kernels: fused kernels and a thin PyTorch layer for shared low-rank adapters."""
from .checkpoint import load, save
from .config import ShareLoRAConfig
from .export import export_peft
from .layer import SharedLoRALinear
from .model import apply, merge, parameter_breakdown, trainable_parameters, unmerge
from .plan import SharePlan, expanded_rank

__all__ = [
    "ShareLoRAConfig", "SharedLoRALinear", "SharePlan", "apply", "export_peft", "expanded_rank", "load",
    "merge", "parameter_breakdown", "save", "trainable_parameters", "unmerge",
]
__version__ = "0.1.0"
