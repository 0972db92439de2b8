"""sharelora_kernels: fused kernels and a thin PyTorch layer for shared low-rank adapters."""
from .checkpoint import load, save
from .config import ShareLoRAConfig
from .export import export_peft
from .layer import SharedLoRALinear
from .model import (apply, delete_adapter, disable_adapters, merge, merge_and_unload, parameter_breakdown, set_adapter,
                    trainable_parameters, unload, unmerge)
from .peft_import import from_peft
from .plan import SharePlan, expanded_rank
from .similarity import (angular_distance, iter_layer_representations, layer_representations, share_sets,
                         sweep_thresholds)

__all__ = [
    "ShareLoRAConfig", "ShareLoRAPeftConfig", "SharedLoRALinear", "SharePlan", "TrainerCallback", "angular_distance",
    "apply", "delete_adapter", "disable_adapters", "export_peft", "expanded_rank", "from_peft",
    "iter_layer_representations", "layer_representations", "load", "merge", "merge_and_unload",
    "parameter_breakdown", "save", "set_adapter", "share_sets", "sweep_thresholds", "trainable_parameters", "unload",
    "unmerge",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``TrainerCallback`` is imported on first use: it imports transformers' Trainer machinery (seconds)."""
    if name == "TrainerCallback":
        from .trainer import TrainerCallback

        return TrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
