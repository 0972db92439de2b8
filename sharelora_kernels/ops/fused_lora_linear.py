"""Fused LoRA linear: ``y = x W^T + b + sum_p s_p path_p(dropout(x))``, forward and backward.

Shapes: x (M, K); W (N, K) frozen; b (N,) frozen or None; y (M, N). x, W and b share one dtype,
every adapter tensor one dtype (each fp32, bf16 or fp16; fp32 adapters of a bf16 base are the
default of ``apply``); all accumulation is fp32, each output is cast once.

Forward (two launches; the (M, N) output is written once, never read back):
  1. ``h = dropout(x) A_eff^T`` (M, R) fp32, every path at once (``lowrank_input``), which also
     draws the dropout mask and stores it bit-packed (M * K / 8 bytes).
  2. ``y = x W^T + b + (h * s) B_eff^T`` in one GEMM kernel: the low-rank product is one more
     K-chunk of the fp32 accumulator, with B_eff gathered through the factor table (slice offset,
     gate ``G_ou``, Kronecker tiling of the output by ``K_B``).
Backward (W and b get no gradient):
  1. ``dh = s * dy B_eff`` (M, R) and ``dB_eff^T = (s h)^T dy`` (R, N) fp32 from one read of dy
     (``dy_lowrank``).
  2. ``dx = dy W + mask(dh A_eff) / (1 - p)`` with the same GEMM kernel (W read transposed), the
     mask read from the forward's bits.
  3. ``dA_eff = dh^T dropout(x)`` in fp32 (``lowrank_grad``, the same bits), M split across
     programs with an ordered second-stage reduction (bitwise reproducible).
  4. the chain to each parameter tensor (slice window, Kronecker fold, gate core), routed once per
     plan (``grad_routes``: a tensor read whole by one path gets its rows of dA / dB as they are;
     a tensor read by several paths one fp32 buffer, cast once).
dx is launched only when x needs a gradient, dA only when a tensor behind A_eff does.

The GEMM kernel is the TMA + persistent one (``tma_linear``) where TMA can serve (sm_90+, aligned
row-major operands), else the pointer kernel below; both autotune over ``autotune.mode()``'s space.
Factor tables and scales come from the per-plan device cache (``tables.tables_for``) and the
dropout seed from the device generator, so a call copies nothing from the host. An eager call runs
``FusedLinear`` on a ``FusedPlan`` that the layer's call plan builds once.

Registered as the custom ops ``sharelora::fused_lora_linear`` and
``sharelora::fused_lora_linear_backward`` with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import LoRAPath
from . import tma_linear
from .autotune import SMALL_GEMM, TunedKernel, gemm_configs
from .dy_lowrank import dy_lowrank
from .encoding import KINDS, check_linear, decode, encode  # noqa: F401 (KINDS: the layout codes)
from .function import first_order, thin_apply, wants_grad
from .grad_routes import RouteCache, path_routes
from .gemm_tiles import LOWRANK_CHUNK, epilogue, lowrank_tile, matmul_tile, tile_coords
from .lowrank_grad import lowrank_grad
from .lowrank_input import lowrank_project
from .shared_grad import path_grads
from .tables import path_rank, refresh_gates, tables_for
from .utils import (TL_DTYPES, cdiv, check_kernel_device, dot_precision, dropout_seed, mask_words, needs_int64_index,
                    next_power_of_2, on_device)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). perf: the tiles that compile without spills
# for every variant (compile_check); full adds the larger ones, which spill with Kronecker + dropout.
PERF = [(128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5)]
FULL = PERF + [(128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (32, 64, 64, 4, 5)]
SPACES = {"small": SMALL_GEMM, "perf": gemm_configs(PERF), "full": gemm_configs(FULL)}


@triton.jit(do_not_specialize=["M"])
def _fused_linear_kernel(
    a_ptr, w_ptr, bias_ptr, h_ptr, table_ptr, scale_ptr, out_ptr, mask_ptr, p,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_wk, stride_wn, stride_hm, stride_hr, stride_om, stride_on, stride_mm,
    HAS_BIAS: tl.constexpr, APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr, INT64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FACTOR_DTYPE: tl.constexpr, PERIODIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M, N) = a (M, K) @ w (K, N) + bias + mask((h * scale) (M, R) @ U (R, N)) / (1 - p)."""
    _, pid_n, rows64, row_mask, cols, col_mask = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = lowrank_tile(h_ptr, h_ptr, table_ptr, scale_ptr, mask_ptr, p, stride_mm, rows64, row_mask, pid_n * BLOCK_N,
                       cols, col_mask, N, R, stride_hm, stride_hr, False, APPLY_SCALE, DROPOUT, DOT_PRECISION,
                       BLOCK_M, BLOCK_N, BLOCK_R, a_ptr.dtype.element_ty, FACTOR_DTYPE, PERIODIC)
    acc = matmul_tile(acc, a_ptr, stride_am, stride_ak, w_ptr, stride_wk, stride_wn, rows64, row_mask, cols, col_mask,
                      K, DOT_PRECISION, BLOCK_K, INT64)
    epilogue(acc, bias_ptr, out_ptr, rows64, row_mask, cols, col_mask, stride_om, stride_on, HAS_BIAS)


# stride_wk keys the weight layout: 1 for the forward's W^T (K-major), K for dx's W
pointer_kernel = TunedKernel(_fused_linear_kernel, SPACES,
                             key=["N", "K", "R", "M_BUCKET", "DROPOUT", "stride_wk", "FACTOR_DTYPE", "PERIODIC"])


def fused_linear(a: Tensor, w_kn: Tensor, bias: Tensor | None, h: Tensor, table: Tensor, factor_dtype: tl.dtype,
                 periodic: bool, scale: Tensor | None, dropout_p: float, mask: Tensor,
                 w_int64: bool | None = None) -> Tensor:
    """``a @ w_kn + bias + mask((h * scale) @ U) / (1 - p)`` on the TMA kernel where it can serve,
    else the pointer kernel. a (M, K); w_kn (K, N) any strides; h (M, R) fp32; table (R, 5) over N
    with factor_dtype elements (``periodic``: it may hold Kronecker rows); mask the bit-packed
    dropout mask of the (M, N) output coordinates, read when ``dropout_p > 0``; ``w_int64``:
    ``needs_int64_index(w_kn)`` where the caller knows it (a plan's frozen weight)."""
    m, k = a.shape
    n = w_kn.shape[1]
    out = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if out.numel() == 0:
        return out
    r = table.shape[0]
    if tma_linear.usable(a, w_kn):
        tma_linear.tma_linear(out, a, w_kn, bias, h, table, factor_dtype, periodic, scale, dropout_p, mask)
        return out
    dropout = dropout_p > 0
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)
    with on_device(a):
        pointer_kernel[grid](
            a, w_kn, bias if bias is not None else a, h, table, scale if scale is not None else h, out,
            mask if dropout else h, dropout_p,
            m, n, k, r, next_power_of_2(m),
            *a.stride(), *w_kn.stride(), *h.stride(), *out.stride(),
            mask.stride(0) if dropout else 0,
            HAS_BIAS=bias is not None, APPLY_SCALE=scale is not None, DROPOUT=dropout,
            INT64=needs_int64_index(a) or (needs_int64_index(w_kn) if w_int64 is None else w_int64),
            DOT_PRECISION=dot_precision(a.dtype), FACTOR_DTYPE=factor_dtype,
            PERIODIC=periodic, BLOCK_R=LOWRANK_CHUNK,
        )
    return out


# ----------------------------------------------------------------------------- forward and backward
def forward_impl(x: Tensor, w_kn: Tensor, bias: Tensor | None, tables, dropout_p: float, seed: Tensor,
                 w_int64: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """y (M, N) in x's dtype, h = dropout(x) A_eff^T (M, R) float32 and the dropout mask
    (M, ceil(K / 32)) int32 bit-packed (empty when dropout_p == 0), from the paths' factor tables.
    w_kn: W^T (a view); bias contiguous or None; ``w_int64``: as ``fused_linear``'s."""
    h, mask = lowrank_project(x, tables.a, tables.dtype, tables.periodic, dropout_p, seed)
    y = fused_linear(x, w_kn, bias, h, tables.b, tables.dtype, tables.periodic, tables.scale, 0.0, mask, w_int64)
    return y, h, mask


def backward_impl(dy: Tensor, x: Tensor, weight: Tensor, h: Tensor, mask: Tensor, tables, dropout_p: float,
                  needs_dx: bool, needs_da: bool = True,
                  w_int64: bool | None = None) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """dx (M, K) in x's dtype (None unless needs_dx), dA_eff (R, K) (None unless needs_da) and
    dB_eff^T (R, N) float32: the dy pass, then dx and dA where wanted (one launch each)."""
    dh, grad_b = dy_lowrank(dy, h, tables.b, tables.scale, tables.dtype, tables.periodic)
    dx = fused_linear(dy, weight, None, dh, tables.a, tables.dtype, tables.periodic, None, dropout_p, mask,
                      w_int64) if needs_dx else None
    return dx, lowrank_grad(dh, x, mask, dropout_p) if needs_da else None, grad_b


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("sharelora::fused_lora_linear", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], tensors: list[Tensor], layout: list[int],
                scales: list[float], dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (M, N) in x's dtype, h = dropout(x) A_eff^T (M, R) float32 and the dropout mask
    (M, ceil(K / 32)) int32 bit-packed (empty when dropout_p == 0), both saved for backward."""
    return forward_impl(x, weight.t(), None if bias is None else bias.contiguous(),
                        tables_for(decode(tensors, layout, scales), x.device), dropout_p, seed)


@_forward_op.register_fake
def _(x, weight, bias, tensors, layout, scales, dropout_p, seed):
    r = sum(path_rank(p) for p in decode(tensors, layout, scales))
    m = x.shape[0]
    mask = x.new_empty((m, mask_words(x.shape[1])) if dropout_p > 0 else (0,), dtype=torch.int32)
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, r), dtype=torch.float32), mask


@torch.library.custom_op("sharelora::fused_lora_linear_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, weight: Tensor, h: Tensor, mask: Tensor, tensors: list[Tensor],
                 layout: list[int], scales: list[float], dropout_p: float,
                 needs_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx (M, K) in x's dtype (empty unless needs_dx), dA_eff (R, K) and dB_eff^T (R, N) float32.
    mask: the forward's bit-packed dropout mask (read when dropout_p > 0; nothing is drawn here)."""
    dx, grad_a, grad_b = backward_impl(dy, x, weight, h, mask, tables_for(decode(tensors, layout, scales), x.device),
                                       dropout_p, needs_dx)
    return x.new_empty((0,)) if dx is None else dx, grad_a, grad_b


@_backward_op.register_fake
def _(dy, x, weight, h, mask, tensors, layout, scales, dropout_p, needs_dx):
    r = h.shape[1]
    dx = x.new_empty(x.shape if needs_dx else (0,))
    return dx, x.new_empty((r, x.shape[1]), dtype=torch.float32), x.new_empty((r, dy.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, tensors, layout, scales, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, output[1], output[2], *tensors)
    ctx.layout, ctx.scales, ctx.dropout_p = layout, scales, dropout_p


@first_order("the triton backend")
def _backward(ctx, dy, _dh, _mask):
    x, weight, h, mask, *tensors = ctx.saved_tensors
    dx, grad_a, grad_b = _backward_op(dy, x, weight, h, mask, tensors, ctx.layout, ctx.scales, ctx.dropout_p,
                                      ctx.needs_input_grad[0])
    grads = path_grads(tensors, [t.requires_grad for t in tensors], decode(tensors, ctx.layout, ctx.scales), grad_a,
                       grad_b)
    return (dx if ctx.needs_input_grad[0] else None), None, None, grads, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry
def _check(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float) -> None:
    """Raise ValueError naming the problem when the inputs do not fit one another
    (``encoding.check_linear``) or the kernels."""
    check_linear(x, weight, bias, paths, dropout_p)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the triton backend takes a frozen weight and bias (requires_grad=False)")
    check_kernel_device(x)
    for t in (weight, *([bias] if bias is not None else [])):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"the triton backend needs x, weight and bias in one dtype and device: x is {x.dtype} "
                             f"on {x.device}, the weight or bias {t.dtype} on {t.device}")
    adapter_dtype = paths[0].tensors[0].dtype if paths else x.dtype
    for t in (t for p in paths for t in p.tensors):
        if t.dtype != adapter_dtype or t.device != x.device:
            raise ValueError(f"the triton backend needs every adapter tensor in one dtype on x's device ({x.device}): "
                             f"found {adapter_dtype} and {t.dtype} on {t.device}")
    for what, dtype in (("x", x.dtype), ("the adapters", adapter_dtype)):
        if dtype not in TL_DTYPES:
            raise ValueError(f"the triton backend supports float32, bfloat16, float16; {what} are {dtype}")


def fused_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath],
                      dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """The Triton path of ``ops.lora_linear``: x (..., K) -> (..., N), same dtype throughout.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    _check(x, weight, bias, paths, dropout_p)
    p = dropout_p if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    if not torch.compiler.is_compiling():  # eager: one Function, no custom-op wrapper
        plan = FusedPlan(weight, bias, paths, p, x.device)
        y = _fused_apply(plan, x2, *plan.tensors)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    seed = dropout_seed(p, x.device)
    tensors, layout, scales = encode(paths)
    y = _forward_op(x2, weight, bias, tensors, layout, scales, p, seed)[0]
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- the planned eager call
class FusedPlan:
    """What an eager call of the kernels reads that does not change between calls, built once per
    call plan (the way vLLM builds its LoRA kernel metadata once): the frozen weight and its K-major
    view, the bias, the paths and their flat tensors, the factor tables, dropout p and
    the zero seed of p == 0, the weight's index width, and where each factor gradient goes
    (``grad_routes``, one routing per set of tensors needing a gradient). A call then allocates
    its outputs and launches; the launchers keep their grids per shape (``utils.memo``)."""

    __slots__ = ("weight", "w_kn", "bias", "paths", "tensors", "tables", "p", "seed", "n", "k", "w_int64", "routes")

    def __init__(self, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], p: float, device: torch.device):
        self.weight, self.w_kn, self.bias = weight, weight.t(), bias  # a strided bias: made contiguous per call
        self.paths = list(paths)
        self.tensors = [t for q in self.paths for t in q.tensors]
        self.tables = tables_for(self.paths, device)
        self.p, self.seed = p, dropout_seed(0.0, device)
        self.n, self.k = weight.shape
        self.w_int64 = needs_int64_index(weight)
        self.routes = RouteCache(self.tensors, path_routes(self.paths, self.k, self.n))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """y (M, N), h (M, R) float32 and the bit-packed dropout mask of x (M, K) (two launches)."""
        tables, p = self.tables, self.p
        if tables.gates:
            refresh_gates(tables, self.paths)
        bias = self.bias if self.bias is None or self.bias.is_contiguous() else self.bias.contiguous()
        return forward_impl(x, self.w_kn, bias, tables, p, self.seed if p == 0 else dropout_seed(p, x.device),
                            self.w_int64)


class FusedLinear(torch.autograd.Function):
    """One eager call of the kernels: ``apply(plan, x (M, K), *tensors)`` -> y (M, N), with no
    custom-op wrapper (``torch.compile`` reaches the custom ops through ``fused_lora_linear``);
    ``plan`` a ``FusedPlan``. Backward launches the dy pass, dx (when x needs it) and dA (when a
    tensor behind some A_eff needs a gradient), then routes the factor gradients. The adapter
    tensors, which backward reads through the plan's tables, and the weight dx reads are saved too,
    so that autograd raises its error for one changed in place since the forward (backward would
    read its new values)."""

    @staticmethod
    def forward(ctx, plan, x, *tensors):
        y, h, mask = plan.forward(x)
        ctx.save_for_backward(x, h, mask, *tensors, plan.weight)
        ctx.plan = plan
        return y

    @staticmethod
    @first_order("the triton backend")
    def backward(ctx, dy):
        x, h, mask = ctx.saved_tensors[:3]  # unpacking checks every saved tensor's version
        plan = ctx.plan
        needs = ctx.needs_input_grad
        routes = plan.routes(needs[2:])
        # dy.contiguous(): autograd's dy of a sum() is an expanded (stride 0) tensor
        dx, grad_a, grad_b = backward_impl(dy.contiguous(), x, plan.weight, h, mask, plan.tables, plan.p, needs[1],
                                           routes.uses(0), plan.w_int64)
        return (None, dx, *routes((grad_a, grad_b)))


_fused_apply = thin_apply(FusedLinear)


def planned_call(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                 training: bool):
    """The run(x) of a call plan on the kernels: the checks of ``fused_lora_linear`` and its
    ``FusedPlan`` made once (a plan is rebuilt when a tensor it read is replaced)."""
    p = dropout_p if training else 0.0
    _check(x, weight, bias, paths, p)
    plan = FusedPlan(weight, bias, paths, p, x.device)
    tensors, n = plan.tensors, plan.n
    # a plan is rebuilt when grad mode or a requires_grad changes: no gradient wanted, no Function
    call = _fused_apply if wants_grad(x, tensors) else lambda plan, x, *tensors: plan.forward(x)[0]

    def run(x: Tensor) -> Tensor:
        if x.dim() == 2:
            return call(plan, x, *tensors)
        return call(plan, x.reshape(-1, x.shape[-1]), *tensors).view(*x.shape[:-1], n)
    return run
