"""sharelora_kernels: fused kernels and a thin PyTorch layer for shared low-rank adapters.

The public names below are imported on first use (``sk.apply`` imports ``model``, which imports
torch), so ``import sharelora_kernels`` and the command line's ``--help`` start at once. PEFT is not
imported here either: ``peft_hook`` makes PEFT know the ShareLoRA method once PEFT is imported.
"""
from __future__ import annotations

import importlib
import importlib.util

from .integrations import peft_hook
from .version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "ShareLoRAConfig": "config", "SharedLoRALinear": "layer", "SharePlan": "plan", "expanded_rank": "plan",
    "apply": "model", "merge": "model", "unmerge": "model", "parameter_breakdown": "model",
    "trainable_parameters": "model", "set_adapter": "model", "disable_adapters": "model",
    "delete_adapter": "model", "unload": "model", "merge_and_unload": "model",
    "load": "checkpoint", "save": "checkpoint", "export_peft": "export",
    "from_peft": "peft_import", "TrainerCallback": "trainer", "angular_distance": "similarity",
    "iter_layer_representations": "similarity", "layer_representations": "similarity", "share_sets": "similarity",
    "sweep_thresholds": "similarity", "ShareLoRAPeftConfig": "integrations.peft_method",
    "mixed_batch": "serving", "adapter_memory": "model", "adapter_parameters": "model", "set_bank_limit": "model",
    "BankFullError": "model",
}
__all__ = sorted(_PUBLIC)

peft_hook.install()


def __getattr__(name: str):
    """A public name, or a submodule (``sk.ops``), imported on first use."""
    if name in _PUBLIC:
        module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
        if _PUBLIC[name] == "model":  # its models' save_pretrained writes adapters through checkpoint's writer
            importlib.import_module(".checkpoint", __name__)
        value = getattr(module, name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
