"""The base layers ShareLoRA wraps, and how each computes ``y = x W^T + b``: the one place that knows base kinds.

  linear    ``nn.Linear`` (or a subclass that keeps its forward, or one of ``LINEAR_EQUIVALENT``, whose
            forward computes the same ``x W^T + b``): weight (N, K), used as is.
  conv1d    Transformers' ``Conv1D`` (GPT-2, GPT-J style): weight stored (K, N); every backend reads
            ``weight.t()``, a transposed view (no copy), and a merge adds the update transposed.
  bnb_4bit  bitsandbytes' ``Linear4bit`` (nf4 or fp4, with or without double quantization) and
  bnb_8bit  ``Linear8bitLt`` (int8, frozen): bases that *compute themselves*. Their output comes
            from their own forward (its dequantizing GEMM, in its compute dtype) and the low-rank
            paths are added by ``ops.lowrank_add``; the quantized weight gets no gradient and is
            never dequantized into a persistent full-precision copy (only ``merge`` dequantizes,
            one module at a time, and requantizes).

The linear and conv1d kinds are dense: their weight goes to the fused kernels. Anything else is
refused by its qualified class name, a subclass of ``nn.Linear`` that overrides its forward
included (other quantizers): its base matmul is not ``x W^T + b``. bitsandbytes is imported only
when a module's class comes from it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

KINDS = ("linear", "conv1d", "bnb_4bit", "bnb_8bit")
QUANTIZED_KINDS = ("bnb_4bit", "bnb_8bit")
WRAPPED_MARK = "is_sharelora_layer"  # a class attribute, True on the layer classes that wrap a base
INSTALL_HINT = 'pip install "sharelora_kernels[qlora]"'
# nn.Linear subclasses whose own forward is nn.Linear's math (qualified class names, so nothing is
# imported to ask): Falcon's FalconLinear computes ``x @ W.T + b`` by hand.
LINEAR_EQUIVALENT = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


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

    @property
    def computes_itself(self) -> bool:
        """Whether the base runs its own forward (quantized kinds) and the paths are added to its output."""
        return self.kind in QUANTIZED_KINDS


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters of half-precision bases train in float32 (as PEFT's default autocast_adapter_dtype)."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def new_adapter_dtype(module: nn.Module, autocast: bool = True) -> torch.dtype:
    """The dtype of new adapters on base ``module``: float32 on a quantized base, else ``adapter_dtype``
    (``autocast=False``, PEFT's ``autocast_adapter_dtype=False``: the base weight's own dtype)."""
    if describe_base(module).computes_itself:
        return torch.float32
    return adapter_dtype(module.weight.dtype) if autocast else module.weight.dtype


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a ``Conv1D`` (subclasses included): what "all-linear" picks."""
    return isinstance(module, (nn.Linear, _conv1d_class()))


def is_wrapped(module: nn.Module) -> bool:
    """Whether ``module`` already is a ShareLoRA layer (``layer.SharedLoRALinear`` sets ``WRAPPED_MARK``):
    asked without importing the layer class, so code below the layer can ask it."""
    return getattr(type(module), WRAPPED_MARK, False) is True


def describe_base(module: nn.Module, name: str | None = None) -> BaseLayout:
    """The layout of a base module; TypeError naming it (``name``) and its qualified class otherwise.

    A bitsandbytes module when bitsandbytes cannot be imported raises ImportError; one that is not
    quantized yet, or an 8-bit one that trains its weight (``has_fp16_weights``), ValueError; so does
    a module with no input or no output feature (nothing for an adapter to read or write).
    """
    layout = _layout(module, name)
    if layout.in_features == 0 or layout.out_features == 0:
        what = f"target module {name!r}" if name is not None else "the base module"
        raise ValueError(f"{what} has in_features={layout.in_features}, out_features={layout.out_features}: "
                         "a low-rank adapter needs at least one of each")
    return layout


def _layout(module: nn.Module, name: str | None) -> BaseLayout:
    conv1d = _conv1d_class()
    cls = type(module)
    what = f"target module {name!r}" if name is not None else "the base module"
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(module, nn.Linear) and (cls.forward is nn.Linear.forward or qualified in LINEAR_EQUIVALENT):
        return BaseLayout("linear", module.in_features, module.out_features)
    if isinstance(module, conv1d) and cls.forward is conv1d.forward:
        k, n = module.weight.shape
        return BaseLayout("conv1d", k, n)
    kind = _bitsandbytes_kind(module, what) if _from_bitsandbytes(cls) else None
    if kind is not None:
        return BaseLayout(kind, module.in_features, module.out_features)
    if isinstance(module, (nn.Linear, conv1d)):
        parent = "nn.Linear" if isinstance(module, nn.Linear) else "Conv1D"
        raise TypeError(f"{what} is a {qualified}, which subclasses {parent} but overrides its forward (a quantized "
                        "or custom layer other than bitsandbytes' Linear4bit / Linear8bitLt): sharelora_kernels "
                        "cannot wrap its base matmul (remove it from target_modules)")
    raise TypeError(f"{what} is a {qualified}, not an nn.Linear or a transformers Conv1D: sharelora_kernels "
                    "cannot wrap it (remove it from target_modules)")


def _from_bitsandbytes(cls: type) -> bool:
    return any(c.__module__.split(".")[0] == "bitsandbytes" for c in cls.__mro__)


def import_bitsandbytes(what: str = "this model"):
    """The bitsandbytes module; ImportError saying how to install it when it cannot be imported."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"{what} is a bitsandbytes quantized layer, and bitsandbytes cannot be imported ({e}): "
                          f"{INSTALL_HINT}") from e
    return bitsandbytes


def _bitsandbytes_kind(module: nn.Module, what: str) -> str | None:
    """bnb_4bit / bnb_8bit for bitsandbytes' Linear4bit / Linear8bitLt with their own forward, else None."""
    bnb = import_bitsandbytes(what)
    cls = type(module)
    if isinstance(module, bnb.nn.Linear4bit) and cls.forward is bnb.nn.Linear4bit.forward:
        if not getattr(module.weight, "bnb_quantized", False) or module.weight.quant_state is None:
            raise ValueError(f"{what} is a bitsandbytes Linear4bit whose weight is not quantized yet (bitsandbytes "
                             "quantizes it when the module moves to a device: call .to(device) first)")
        return "bnb_4bit"
    if isinstance(module, bnb.nn.Linear8bitLt) and cls.forward is bnb.nn.Linear8bitLt.forward:
        if module.state.has_fp16_weights:
            raise ValueError(f"{what} is a bitsandbytes Linear8bitLt with has_fp16_weights=True (it trains a float16 "
                             "weight): ShareLoRA adapters need a frozen int8 base (has_fp16_weights=False)")
        if module.weight.dtype != torch.int8:
            raise ValueError(f"{what} is a bitsandbytes Linear8bitLt whose weight is not quantized yet (bitsandbytes "
                             "quantizes it when the module moves to a device: call .to(device) first)")
        return "bnb_8bit"
    return None


def compute_dtype(module: nn.Module, layout: BaseLayout, x: Tensor) -> torch.dtype:
    """The dtype the low-rank paths of a quantized base compute in for input x (its operands; the
    products accumulate in float32): the autocast dtype under autocast, else the base's compute dtype
    (a Linear4bit's ``compute_dtype``, to which bitsandbytes casts an input of another dtype, handing
    its output back in x's dtype; a Linear8bitLt computes in x's dtype)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if layout.kind == "bnb_4bit" and module.compute_dtype is not None:
        return module.compute_dtype
    return x.dtype


def keep_standard_4bit_layout(module: nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of a Linear4bit's weight for its inference kernel (the
    ``support_avx512bf16_for_cpu`` switch its forward reads): converting that layout back, which a
    training pass, a merge and a save need, does not give the weight back (bitsandbytes 0.50: one
    eval pass of a K=128 nf4 weight changed it by 23%). An eval pass then runs bitsandbytes'
    standard kernel, on the weight training uses."""
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False


def _repacked(module: nn.Module) -> bool:
    """Whether a module's 4-bit weight is in bitsandbytes' CPU inference layout (False for any other module)."""
    return bool(getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False))


def check_4bit_layouts(model: nn.Module) -> None:
    """ValueError naming a 4-bit module of ``model`` whose weight bitsandbytes' CPU backend has repacked
    for its inference kernel (an eval-mode forward without grad): that layout has no working backward,
    and converting it back does not give the loaded weight (bitsandbytes 0.50: an nf4 weight of K=128
    changed by up to half its size), so training through it would train on another base."""
    for name, module in model.named_modules():
        if _repacked(module):
            where = f"module {name!r}" if name else "the base"
            raise ValueError(f"{where} is a 4-bit layer whose weight bitsandbytes repacked for its CPU "
                             "inference kernel (an eval-mode forward without grad ran before the adapters were "
                             "added), which cannot be converted back exactly: load the model again and add the "
                             "adapters before evaluating it (they keep every 4-bit layer in the standard layout)")


def keep_standard_4bit_layouts(model: nn.Module) -> None:
    """``keep_standard_4bit_layout`` on every module of ``model``: a 4-bit layer that is no target is
    still on the gradient's way to the adapters before it, so an eval pass must not repack it either."""
    for module in model.modules():
        keep_standard_4bit_layout(module)


def standard_4bit_layout(module: nn.Module) -> nn.Parameter:
    """A Linear4bit's weight in bitsandbytes' standard layout, restored if needed; returns the weight.

    bitsandbytes' CPU backend repacks the weight for its inference kernel on an eval-mode forward
    without grad, and that layout has no working backward (with a bias its forward raises once x
    requires grad; without one it backpropagates through an op with no autograd formula).
    bitsandbytes' own ``state_dict()`` converts it back (not exactly); this calls it, for a base
    evaluated before a layer wrapped it (``keep_standard_4bit_layout`` keeps a wrapped one unpacked)."""
    if _repacked(module):
        module.state_dict()
    return module.weight


@torch.no_grad()
def dequantized_weight(module: nn.Module, layout: BaseLayout, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (N, K) weight a quantized base computes with, in ``dtype``, as bitsandbytes dequantizes it
    for an input of that dtype (a temporary: for merge and tests)."""
    if layout.kind == "bnb_4bit":
        bnb = import_bitsandbytes()
        weight = standard_4bit_layout(module)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if layout.kind == "bnb_8bit":
        state, weight = module.state, module.weight
        cb = state.CB if state.CB is not None else weight.data
        scb = state.SCB if state.SCB is not None else weight.SCB
        return cb.to(dtype) * scb.unsqueeze(1).mul(1.0 / 127.0)  # int8 rows times their fp32 scale / 127
    raise ValueError(f"a {layout.kind} base is not quantized")


@torch.no_grad()
def merge_keeps_finite(module: nn.Module, layout: BaseLayout, delta: Tensor) -> bool:
    """Whether ``add_to_weight_(module, layout, delta)`` would leave a finite weight, computed as it
    would be, in the weight's dtype (a float16 weight overflows where a float32 delta did not),
    without writing it (``safe_merge``)."""
    if not layout.computes_itself:
        weight = module.weight.t() if layout.transposed else module.weight
        return bool(torch.isfinite(weight + delta.to(weight.dtype)).all())
    merged = dequantized_weight(module, layout) + delta.to(device=module.weight.device, dtype=torch.float32)
    dtype = module.weight.quant_state.dtype if layout.kind == "bnb_4bit" else torch.float32
    return bool(torch.isfinite(merged.to(dtype)).all())


@torch.no_grad()
def add_to_weight_(module: nn.Module, layout: BaseLayout, delta: Tensor) -> None:
    """Add ``delta`` (N, K) to the weight of the module that owns it (for merge / unmerge).

    Dense kinds add in place (a Conv1D's weight transposed) in the weight's dtype. A quantized base
    is dequantized, added to in float32 and quantized again with its own settings (quant type,
    block size, double quantization, storage; int8 row-wise): PEFT's rule, which rounds the result to
    the quantization grid (the cost is measured in the README).
    """
    if not layout.computes_itself:
        weight = module.weight.t() if layout.transposed else module.weight
        weight.add_(delta.to(weight.dtype))
        return
    bnb = import_bitsandbytes()
    warnings.warn("merging into (or unmerging from) a quantized base requantizes its weight: the result is rounded "
                  "to the 4-bit / 8-bit grid, which can cost more than the adapters change (see the README); "
                  "export_peft and a merge into a full-precision base keep them exact", stacklevel=3)
    merged = dequantized_weight(module, layout) + delta.to(device=module.weight.device, dtype=torch.float32)
    weight = module.weight
    if layout.kind == "bnb_4bit":
        qs = weight.quant_state
        new = bnb.nn.Params4bit(merged.to(qs.dtype), requires_grad=False, quant_type=qs.quant_type,
                                blocksize=qs.blocksize, compress_statistics=qs.nested,
                                quant_storage=weight.quant_storage, module=module)
    else:
        new = bnb.nn.Int8Params(merged.cpu(), requires_grad=False, has_fp16_weights=False)
        module.state.reset_grads()  # the forward reads the new CB / SCB from the weight
    module.weight = new.to(weight.device)  # bitsandbytes quantizes when the parameter moves to a device
