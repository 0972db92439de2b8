"""The base layers ShareLoRA wraps, and how each computes ``y = x W^T + b``: the one place that knows base kinds.

  linear   ``nn.Linear`` (or a subclass that keeps its forward): weight (N, K), used as is.
  conv1d   Transformers' ``Conv1D`` (GPT-2, GPT-J style): weight stored (K, N); every backend reads
           ``weight.t()``, a transposed view (no copy), and a merge adds the update transposed.

Anything else, a subclass of ``nn.Linear`` that overrides its forward included (bitsandbytes and
other quantizers), is refused by its qualified class name: its base matmul is not ``x W^T + b``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

KINDS = ("linear", "conv1d")


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@dataclass(frozen=True)
class BaseLayout:
    """How one base module stores its weight: ``kind`` (one of KINDS), in_features K, out_features N."""

    kind: str
    in_features: int
    out_features: int

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is (K, N) (PEFT's ``fan_in_fan_out``)."""
        return self.kind == "conv1d"


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a ``Conv1D`` (subclasses included): what "all-linear" picks."""
    return isinstance(module, (nn.Linear, _conv1d_class()))


def describe_base(module: nn.Module, name: str | None = None) -> BaseLayout:
    """The layout of a base module; TypeError naming it (``name``) and its qualified class otherwise."""
    conv1d = _conv1d_class()
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return BaseLayout("linear", module.in_features, module.out_features)
    if isinstance(module, conv1d) and cls.forward is conv1d.forward:
        k, n = module.weight.shape
        return BaseLayout("conv1d", k, n)
    what = f"target module {name!r}" if name is not None else "the base module"
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(module, (nn.Linear, conv1d)):
        parent = "nn.Linear" if isinstance(module, nn.Linear) else "Conv1D"
        raise TypeError(f"{what} is a {qualified}, which subclasses {parent} but overrides its forward (a quantized "
                        "or custom layer): sharelora_kernels cannot fuse its base matmul (remove it from target_modules)")
    raise TypeError(f"{what} is a {qualified}, not an nn.Linear or a transformers Conv1D: sharelora_kernels "
                    "cannot wrap it (remove it from target_modules)")

