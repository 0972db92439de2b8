"""Compute backends for SharedLoRALinear, and the router that sends each call to one.

``lora_linear`` is the one entry point the layer calls; ``grouped_lora_linear`` runs several modules
that read the same input together (``grouping.enable_input_groups``); ``lowrank_add`` adds the paths
into the output of a base that computed it itself (quantized bases: ``ops.lowrank_only``, torch or
triton); ``multi_adapter_add`` serves a batch whose rows use different adapters (``ops.multi_adapter``:
inference, its own torch / triton choice). Backends
(``SHARELORA_BACKEND``, ``dispatch``): ``torch`` (``reference.lora_linear``), ``compose`` (``ops.compose``:
torch GEMMs, hand-written backward), ``triton`` (the fused kernels: CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1`` for tests), ``auto`` (the faster of triton and compose, measured per
call signature; the default on CUDA). The CPU default is ``dispatch.DEFAULT_CPU``. Under ``auto`` a
group runs module by module (the grouped kernel is not chosen until measured to win).

Autocast: under ``torch.autocast(device, dtype)`` a call that compose or the kernels take runs there
with the operands autocast's linear would use: x, W and b cast to the autocast dtype (fp32
adapters stay fp32 and are rounded inside the GEMMs), accumulation in fp32, the output in the
autocast dtype, adapter gradients in the adapters' dtype. The torch backend follows autocast itself.
Inputs neither takes (float64, a base weight that requires grad, ...) run the reference.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..reference import LoRAPath
from . import compose, dispatch
from .autocast import autocast_enabled
from .dispatch import BACKENDS, dispatch_table  # noqa: F401 (public)
from .encoding import check_group, check_group_sizes, check_linear, encode
from .lowrank_only import lowrank_add as _lowrank_add
from .multi_adapter import (BASE, AdapterBatch, AdapterTables, adapter_batch, adapter_tables,  # noqa: F401 (public)
                            multi_adapter_add, multi_adapter_linear)

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    from .fused_lora_linear import fused_lora_linear as _fused_lora_linear
    from .grouped_lora_linear import grouped_lora_linear as _grouped_lora_linear
    from .utils import INTERPRET
    HAS_TRITON = True
except ImportError:  # no triton on this platform: compose and the torch reference run everything
    HAS_TRITON, INTERPRET = False, False


def backend_for(x: Tensor, backend: str | None = None) -> str:
    """The backend setting for ``x``'s device: ``backend`` if given, else ``SHARELORA_BACKEND``, else
    the device's default. ValueError naming the variable for a value outside ``BACKENDS`` (or a bad
    ``SHARELORA_AUTOTUNE``), or for triton when it cannot be imported."""
    dispatch.autotune_mode()
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    name = backend or dispatch.backend_setting(x.device)
    if name == "triton" and not HAS_TRITON:
        raise ValueError("SHARELORA_BACKEND=triton but triton cannot be imported")
    return name


def _compose_takes(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath]) -> bool:
    """x, W, b in one supported dtype and frozen; every adapter tensor in a supported dtype; tensors
    with data (meta tensors, for shapes alone, run the torch path)."""
    base = [weight, *([bias] if bias is not None else [])]
    return (x.dtype in FUSED_DTYPES and not x.is_meta and all(t.dtype == x.dtype and not t.requires_grad for t in base)
            and all(t.dtype in FUSED_DTYPES for p in paths for t in p.tensors))


def _fusable(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath]) -> bool:
    """What compose takes, with every adapter tensor in one dtype (it may differ from x's)."""
    return (bool(paths) and _compose_takes(x, weight, bias, paths)
            and len({t.dtype for p in paths for t in p.tensors}) == 1)


def _group_fusable(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                   paths: Sequence[Sequence[LoRAPath]]) -> bool:
    """Whether one grouped kernel call takes the group: every module fusable, every adapter tensor of
    the group in one dtype."""
    return (all(_fusable(x, w, b, ps) for w, b, ps in zip(weights, biases, paths))
            and len({ps[0].tensors[0].dtype for ps in paths}) == 1)


def _auto_times_triton(x: Tensor) -> bool:
    """Whether auto considers the kernels for x: CUDA tensors (CPU ones only when the interpreter
    runs them and ``dispatch.TIME_INTERPRETED_KERNELS`` is set)."""
    return HAS_TRITON and (x.is_cuda or (INTERPRET and dispatch.TIME_INTERPRETED_KERNELS))


def _autocast_operands(x: Tensor, *base: Tensor | None) -> tuple[Tensor | None, ...] | None:
    """(x, *base) cast to the autocast dtype when autocast is on for x's device and would cast them
    (float32 / bf16 / fp16 tensors), else None."""
    device = x.device.type
    if not autocast_enabled(device) or any(t is not None and t.dtype not in FUSED_DTYPES for t in (x, *base)):
        return None
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in (x, *base))


def _autocast_off(device: str, cast: bool):
    return torch.autocast(device, enabled=False) if cast else contextlib.nullcontext()


def _pick(setting: str, x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
          training: bool) -> str:
    """The backend that runs one call under ``setting``: torch where the chosen one does not take it."""
    if setting == "triton":
        return "triton" if _fusable(x, weight, bias, paths) else "torch"
    if not _compose_takes(x, weight, bias, paths):
        return "torch"
    if setting == "compose":
        return "compose"
    backends = {"compose": compose.lora_linear}
    if _auto_times_triton(x) and _fusable(x, weight, bias, paths):
        backends = {"triton": _fused_lora_linear, **backends}
    return dispatch.auto_choice(x, weight, bias, paths, dropout_p, training, backends)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float = 0.0,
                training: bool = False, *, backend: str | None = None) -> Tensor:
    """y = x W^T + b + sum_p s_p B_p A_p dropout(x): x (..., K) -> (..., N), on ``backend`` (one of
    ``BACKENDS``; None: ``backend_for(x)``)."""
    setting = backend_for(x, backend)
    if (setting == "auto" and torch.compiler.is_compiling() and _auto_times_triton(x)
            and dispatch.call_mode(x, paths) == "fwd" and _autocast_operands(x, weight, bias) is None
            and _fusable(x, weight, bias, paths) and not (training and dropout_p > 0)):
        # a compiled call without dropout or gradient: auto chooses when it runs
        from .auto_op import auto_lora_linear

        check_linear(x, weight, bias, paths, dropout_p)
        x2 = x.reshape(-1, x.shape[-1])
        y = auto_lora_linear(x2, weight, bias, *encode(paths))
        return y.reshape(*x.shape[:-1], weight.shape[0])
    if paths and setting != "torch":
        cast = _autocast_operands(x, weight, bias)
        xs, ws, bs = cast or (x, weight, bias)
        name = _pick(setting, xs, ws, bs, paths, dropout_p, training)
        if name != "torch":
            run = _fused_lora_linear if name == "triton" else compose.lora_linear
            with _autocast_off(x.device.type, cast is not None):
                return run(xs, ws, bs, paths, dropout_p, training)  # which checks its inputs
    check_linear(x, weight, bias, paths, dropout_p)
    return reference.lora_linear(x, weight, bias, paths, dropout_p, training)


def grouped_lora_linear(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                        paths: Sequence[Sequence[LoRAPath]], dropout_p: float = 0.0, training: bool = False, *,
                        backend: str | None = None) -> tuple[Tensor, ...]:
    """``lora_linear`` of G modules that share the input x, as a tuple of G outputs (..., N_g).

    weights: (N_g, K) each; biases: (N_g,) or None each; paths: one sequence of LoRAPaths per module.
    triton: one grouped kernel when every module is fusable and has a path, every adapter of the
    group in one dtype (else the torch path, one mask for the group); compose and torch: one
    dropout mask on x for the whole group; auto: each module on its own (its own choice and mask).
    """
    setting = backend_for(x, backend)
    check_group_sizes(weights, biases, paths)
    if setting == "auto":
        check_group(x, weights, biases, paths, dropout_p)  # every module named before any runs
        return tuple(lora_linear(x, w, b, ps, dropout_p, training, backend="auto")
                     for w, b, ps in zip(weights, biases, paths))
    cast = _autocast_operands(x, *weights, *biases)
    xs, ws, bs = (cast[0], cast[1:1 + len(weights)], cast[1 + len(weights):]) if cast else (x, weights, biases)
    run = None
    if setting == "triton" and _group_fusable(xs, ws, bs, paths):
        run = _grouped_lora_linear
    elif setting == "compose" and all(_compose_takes(xs, w, b, ps) for w, b, ps in zip(ws, bs, paths)):
        run = compose.grouped_lora_linear
    if run is None:
        return _grouped_reference(x, weights, biases, paths, dropout_p, training)
    with _autocast_off(x.device.type, cast is not None):
        return run(xs, list(ws), list(bs), paths, dropout_p, training)


def _grouped_reference(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                       paths: Sequence[Sequence[LoRAPath]], dropout_p: float, training: bool) -> tuple[Tensor, ...]:
    """``reference.lora_linear`` per module, the one dropout mask drawn once for the group."""
    check_group(x, weights, biases, paths, dropout_p)
    xd = F.dropout(x, dropout_p, training=True) if (training and dropout_p > 0) else x
    return tuple(reference.lora_linear(x, w, b, ps, x_dropped=xd) for w, b, ps in zip(weights, biases, paths))


def lowrank_add(y: Tensor, x: Tensor, paths: Sequence[LoRAPath], dropout_p: float = 0.0, training: bool = False,
                compute_dtype: torch.dtype | None = None, *, backend: str | None = None) -> Tensor:
    """``y += sum_p s_p B_p A_p dropout(x)`` in place for a base that computed ``y`` from ``x`` itself
    (``ops.lowrank_only``); returns y, or the sum in a copy where y cannot take it in place (a view, or
    not contiguous). The Triton kernels under ``triton``, and under ``auto`` where it considers them
    (CUDA) and chose them (``lowrank_auto_choice``), when the compute dtype, y and the adapters (one
    dtype) are float32 / bfloat16 / float16; the torch path otherwise (``torch``, ``compose``: it is
    torch GEMMs)."""
    setting = backend_for(x, backend)
    dtype = compute_dtype or x.dtype
    use_triton = lowrank_takes_triton(paths, dtype, y.dtype) and (setting == "triton" or (
        setting == "auto" and _auto_times_triton(x)
        and lowrank_auto_choice(x, y.shape[-1], paths, dropout_p, training, dtype, y.dtype) == "triton"))
    return _lowrank_add(y, x, paths, dropout_p, training, compute_dtype, use_triton)


def lowrank_takes_triton(paths: Sequence[LoRAPath], dtype: torch.dtype, y_dtype: torch.dtype) -> bool:
    """Whether the Triton kernels of ``lowrank_add`` take these paths, compute dtype and y dtype."""
    adapters = {t.dtype for p in paths for t in p.tensors}
    return (bool(paths) and dtype in FUSED_DTYPES and y_dtype in FUSED_DTYPES and len(adapters) == 1
            and adapters <= set(FUSED_DTYPES))


def lowrank_auto_choice(x: Tensor, n: int, paths: Sequence[LoRAPath], dropout_p: float, training: bool,
                        dtype: torch.dtype, y_dtype: torch.dtype) -> str:
    """``auto``'s choice for ``lowrank_add`` on x (..., K) into y (..., N) of ``y_dtype``: ``triton``
    or ``compose`` (the torch path), verified and timed as ``dispatch.auto_choice`` does for a dense
    layer, on a zero y (the base's output does not change the low-rank sum). The signature names
    the base ``uint8`` (a quantized weight), so it never meets a dense layer's choice."""
    quantized = torch.empty((), dtype=torch.uint8, device=x.device).expand(n, x.shape[-1])  # no (N, K) storage

    def backend(use_triton: bool):
        def run(x, weight, bias, paths, dropout_p, training):
            y = torch.zeros((*x.shape[:-1], n), dtype=y_dtype, device=x.device)
            return _lowrank_add(y, x, paths, dropout_p, training, dtype, use_triton)
        return run
    return dispatch.auto_choice(x, quantized, None, paths, dropout_p, training,
                                {"triton": backend(True), "compose": backend(False)})


from .dispatch import refresh_settings, set_backend  # noqa: E402,F401 (public)
