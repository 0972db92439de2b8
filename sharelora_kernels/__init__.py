"""sharelora_kernels: fused kernels and a thin PyTorch layer for shared low-rank adapters."""
from .config import ShareLoRAConfig
from .layer import SharedLoRALinear
from .plan import SharePlan, expanded_rank

__all__ = ["ShareLoRAConfig", "SharedLoRALinear", "SharePlan", "expanded_rank"]
__version__ = "0.1.0"
