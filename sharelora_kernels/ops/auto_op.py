"""``auto`` inside a compiled model: one opaque custom op that consults the dispatch choice when it runs.

Dynamo cannot time anything while it traces, so a traced router would fix one backend into the
graph. ``sharelora::auto_lora_linear`` is what it traces instead (a fake kernel gives y's shape):
when the compiled graph runs, the op's implementation asks ``dispatch.auto_choice`` for the call's
signature (the remembered choice, the cache file, or a measurement, as in eager mode) and runs that
backend's forward. For calls that take no gradient (inference: ``torch.no_grad``,
``inference_mode``, ``generate``, frozen adapters) and draw no dropout; a compiled training call (or
one in training mode with dropout, under no_grad) runs the choice ``dispatch.auto_choice``
remembered for its signature (the fused op and its backward, or compose).

x (M, K), weight (N, K), bias (N,) or None, the paths flat (``encoding.encode``); y (M, N) in x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import compose, dispatch
from .encoding import decode


@torch.library.custom_op("sharelora::auto_lora_linear", mutates_args=())
def auto_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], tensors: list[Tensor], layout: list[int],
                     scales: list[float]) -> Tensor:
    """y = x W^T + b + sum_p s_p B_p A_p x on the backend auto chooses for this signature now."""
    from .fused_lora_linear import fused_lora_linear

    paths = decode(tensors, layout, scales)
    backends = {"triton": fused_lora_linear, "compose": compose.lora_linear}
    name = dispatch.auto_choice(x, weight, bias, paths, 0.0, False, backends)
    with torch.no_grad():
        return backends[name](x, weight, bias, paths, 0.0, False)


@auto_lora_linear.register_fake
def _(x, weight, bias, tensors, layout, scales):
    return x.new_empty((x.shape[0], weight.shape[0]))
