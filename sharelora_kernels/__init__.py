"""sharelora_kernels: fused kernels and a thin PyTorch layer for shared low-rank adapters."""
from .checkpoint import load, save
from .config import ShareLoRAConfig
from .export import export_peft
from .integrations import peft_hook
from .layer import SharedLoRALinear
from .model import (apply, delete_adapter, disable_adapters, merge, merge_and_unload, parameter_breakdown, set_adapter,
                    trainable_parameters, unload, unmerge)
from .peft_import import from_peft
from .plan import SharePlan, expanded_rank
from .serving import adapter_memory, mixed_batch
from .similarity import (angular_distance, iter_layer_representations, layer_representations, share_sets,
                         sweep_thresholds)

__all__ = [
    "ShareLoRAConfig", "ShareLoRAPeftConfig", "SharedLoRALinear", "SharePlan", "TrainerCallback", "adapter_memory",
    "angular_distance", "apply", "delete_adapter", "disable_adapters", "export_peft", "expanded_rank", "from_peft",
    "iter_layer_representations", "layer_representations", "load", "merge", "merge_and_unload", "mixed_batch",
    "parameter_breakdown", "save", "set_adapter", "share_sets", "sweep_thresholds", "trainable_parameters", "unload",
    "unmerge",
]
__version__ = "0.1.0"

peft_hook.install()  # PEFT knows the method once PEFT is imported; PEFT itself is not imported here


def __getattr__(name: str):
    """``TrainerCallback`` and ``ShareLoRAPeftConfig`` are imported on first use: they import
    transformers' Trainer machinery / PEFT (seconds)."""
    if name == "TrainerCallback":
        from .trainer import TrainerCallback

        return TrainerCallback
    if name == "ShareLoRAPeftConfig":
        from .integrations.peft_method import ShareLoRAPeftConfig

        return ShareLoRAPeftConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
