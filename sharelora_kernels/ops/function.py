"""Applying an autograd Function with the least host work: the C entry point directly.

``torch.autograd.Function.apply`` is a Python wrapper around ``torch._C._FunctionBase.apply`` that
binds default arguments (for a ``setup_context`` style Function) and unwraps functorch's dead
wrappers (for ``torch.func`` transforms). The planned calls' Functions use neither: outside
functorch transforms ``thin_apply(cls)`` calls the C entry point (about 2 us less per call on a
CPU); inside one it is the ordinary ``cls.apply``. ``wants_grad``: whether a call needs its
Function at all (a call autograd will not record runs its forward alone). ``first_order``: the
compose and triton Functions' hand-written backwards give first derivatives only.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
from torch import Tensor


def thin_apply(cls: type[torch.autograd.Function]) -> Callable:
    """``cls.apply`` without its Python wrapper where functorch transforms are not active."""
    direct = super(torch.autograd.Function, cls).apply
    wrapped = cls.apply

    def apply(*args):
        if torch._C._are_functorch_transforms_active():
            return wrapped(*args)
        return direct(*args)
    return apply


def wants_grad(x: Tensor, tensors: Iterable[Tensor]) -> bool:
    """Whether autograd records a call on x and ``tensors`` (grad mode on, something requires grad)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))


def first_order(what: str, torch_exact: bool = True) -> Callable[[Callable], Callable]:
    """Marks the hand-written ``backward`` of ``what`` (e.g. "the compose backend") as first-order
    only: under ``create_graph=True`` (grad mode on inside backward) it raises instead of returning
    gradients whose own derivatives would be wrong, naming the torch backend where that computes
    them exactly (``torch_exact``: dense bases). An ordinary backward runs as it is."""
    message = (f"a second derivative (create_graph=True) through a sharelora_kernels layer: {what} computes "
               "first derivatives only")
    message += ("; the torch backend's second derivatives are exact: sharelora_kernels.ops.set_backend('torch')"
                if torch_exact else "")

    def mark(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(message)
            return backward(ctx, *grads)
        return wrapper
    return mark
