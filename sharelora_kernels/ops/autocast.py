"""Autocast off inside a block, with the least host work: the planned calls and the kernels' table
builders compute in the dtypes they chose, whatever autocast region they are called from."""
from __future__ import annotations

import contextlib

import torch


class AutocastOff:
    """Autocast off on ``device`` inside the block, on again after: what ``torch.autocast(device,
    enabled=False)`` does inside an autocast region, without its Python bookkeeping (a few
    microseconds a call). Eager only (dynamo traces ``torch.autocast``), and only where autocast is
    on (the call plans built under it)."""

    __slots__ = ("device",)

    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> None:
        torch.set_autocast_enabled(self.device, False)

    def __exit__(self, *exc) -> None:
        torch.set_autocast_enabled(self.device, True)


_NOTHING = contextlib.nullcontext()


def autocast_enabled(device: str) -> bool:
    """Whether autocast is on for ``device`` (False for a device without autocast, such as meta)."""
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def no_autocast(device: str):
    """Autocast off inside: a context manager only when autocast is on."""
    if not torch.is_autocast_enabled(device):
        return _NOTHING
    return torch.autocast(device, enabled=False) if torch.compiler.is_compiling() else AutocastOff(device)
