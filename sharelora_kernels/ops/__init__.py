"""Compute backends for SharedLoRALinear: the torch reference everywhere, fused Triton kernels on CUDA.

``lora_linear`` is the one entry point the layer calls; ``grouped_lora_linear`` runs several modules
that read the same input together (``grouping.enable_input_groups``). ``SHARELORA_BACKEND=torch|triton`` overrides
the automatic choice (triton on CUDA tensors when Triton imports, torch otherwise). Forcing triton on
CPU tensors runs the kernels through the Triton interpreter (needs ``TRITON_INTERPRET=1``, for tests).
Inputs the kernels do not take (float64, adapters of mixed dtypes, autocast, or a base weight
that requires grad) run the reference.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..reference import LoRAPath

BACKENDS = ("torch", "triton")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    from .fused_lora_linear import fused_lora_linear as _fused_lora_linear
    from .grouped_lora_linear import grouped_lora_linear as _grouped_lora_linear
    HAS_TRITON = True
except ImportError:  # no triton on this platform: the torch reference runs everything
    HAS_TRITON = False


def backend_for(x: Tensor) -> str:
    """The backend that will run ``x``: the env override if set, else triton on CUDA, torch otherwise."""
    forced = os.environ.get("SHARELORA_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"SHARELORA_BACKEND must be one of {list(BACKENDS)}, got {forced!r}")
    if forced == "triton" and not HAS_TRITON:
        raise ValueError("SHARELORA_BACKEND=triton but triton cannot be imported")
    if forced:
        return forced
    return "triton" if (x.is_cuda and HAS_TRITON) else "torch"


def _fusable(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath]) -> bool:
    """Whether the kernels take these inputs: x, W, b in one supported dtype, the adapters in one
    supported dtype (may differ from x's), a frozen base, and no autocast (the reference follows it)."""
    base = [weight, *([bias] if bias is not None else [])]
    adapters = [t for p in paths for t in p.tensors]
    return (x.dtype in FUSED_DTYPES and all(t.dtype == x.dtype for t in base)
            and adapters[0].dtype in FUSED_DTYPES and all(t.dtype == adapters[0].dtype for t in adapters)
            and not any(t.requires_grad for t in base) and not torch.is_autocast_enabled(x.device.type))


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath],
                dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """y = x W^T + b + sum_p s_p B_p A_p dropout(x) on the backend ``backend_for(x)`` picks."""
    if paths and backend_for(x) == "triton" and _fusable(x, weight, bias, paths):
        return _fused_lora_linear(x, weight, bias, paths, dropout_p, training)
    return reference.lora_linear(x, weight, bias, paths, dropout_p, training)


def grouped_lora_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                        paths: Sequence[Sequence[LoRAPath]], dropout_p: float = 0.0,
                        training: bool = False) -> tuple[Tensor, ...]:
    """``lora_linear`` of G modules that share the input x, as a tuple of G outputs (..., N_g).

    weights: (N_g, K) each; biases: (N_g,) or None each; paths: one sequence of LoRAPaths per module.
    One dropout mask on x serves the whole group. The triton backend runs the group in one grouped
    kernel (``ops.grouped_lora_linear``) when every module is fusable and has a path.
    """
    if (backend_for(x) == "triton" and all(paths)
            and all(_fusable(x, w, b, ps) for w, b, ps in zip(weights, biases, paths))):
        return _grouped_lora_linear(x, weights, biases, paths, dropout_p, training)
    return _grouped_reference(x, weights, biases, paths, dropout_p, training)


def _grouped_reference(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                       paths: Sequence[Sequence[LoRAPath]], dropout_p: float, training: bool) -> tuple[Tensor, ...]:
    """``reference.lora_linear`` per module, the one dropout mask drawn once for the group."""
    xd = F.dropout(x, dropout_p, training=True) if (training and dropout_p > 0) else x
    return tuple(reference.lora_linear(x, w, b, ps, x_dropped=xd) for w, b, ps in zip(weights, biases, paths))
