"""Mean angular distance between layer representations (the README's "The methods"), streamed and
optionally distributed.

Formula (fixed for the project; the C++/CUDA extension implements the same): per sample n, upcast
the (L, d) vectors to float64, form the float64 Gram matrix G = X X^T (batched matmul), then

    c_ij     = G_ij / (||x_i|| ||x_j||)  clamped to [-1, 1]
    theta_ij = 2 * atan2(sqrt(1 - c_ij), sqrt(1 + c_ij))        (= arccos(c_ij))
    d_n(i,j) = theta_ij / pi

Why this is accurate for nearly parallel vectors: a product of two float32 numbers has at most 48
significant bits, so every product in the float64 Gram is exact and only the d-term sum rounds,
with relative error about d * 2^-53 (~5e-13 for d = 4096). So 1 - c is resolved to ~1e-12 absolute,
far below 1 - cos(1e-4) = 5e-9: an angle of 1e-4 rad comes out with relative error ~1e-4 or better,
where a float32 cosine (spacing 6e-8 near 1) could not tell 1e-4 rad from 3.5e-4 rad or from zero.
1 - c and 1 + c are exact in float64 (Sterbenz), and atan2 of the two square roots is well
conditioned for every c, near parallel and anti-parallel alike.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..extension import RepresentationError

_CHUNK = 64  # samples per float64 Gram, bounds the float64 copy to (64, L, d)


def angular_sums_torch(reps: torch.Tensor, layer_dim: int = 0) -> torch.Tensor:
    """Sum over samples of the angular distance d_n(i, j) (reference and CPU fallback).

    reps: (L, n, d) for ``layer_dim=0`` or (n, L, d) for ``layer_dim=1``, any floating dtype; a float64
    vector of any magnitude (its squares may overflow or underflow) is scaled by a power of two first.
    Returns (L, L) float64 on reps' device: sum over the n samples, symmetric, diagonal exactly 0.
    Raises RepresentationError (a ValueError) naming the first (sample, layer), in that order, whose vector
    contains NaN/Inf or has zero norm: the same (sample, layer) and message as ``extension.angular_sums``.
    """
    if reps.dim() != 3 or layer_dim not in (0, 1):
        raise ValueError(f"reps must be 3-D with layer_dim 0 or 1, got shape {tuple(reps.shape)} and layer_dim={layer_dim}")
    if not reps.is_floating_point():
        raise ValueError(f"reps must be a floating-point tensor, got {reps.dtype}")
    x = reps if layer_dim == 1 else reps.transpose(0, 1)  # (n, L, d)
    num_layers = x.shape[1]
    total = torch.zeros(num_layers, num_layers, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        xc = x[start : start + _CHUNK].to(torch.float64)
        peak = xc.abs().amax(dim=-1) if xc.shape[-1] else xc.new_zeros(xc.shape[:-1])  # (b, L)
        nonfinite = ~torch.isfinite(xc).all(dim=-1)
        bad = nonfinite | (peak == 0)
        if bad.any():  # chunks go in sample order, so the first hit of the first bad chunk is the first overall
            n, layer = (int(v) for v in torch.nonzero(bad)[0])
            problem = "contains NaN or Inf" if nonfinite[n, layer] else "has zero norm (no direction)"
            raise RepresentationError(f"representation of sample {start + n} at layer {layer} {problem}")
        # Each vector times the power of two 2^shift that brings its largest entry into [1, 2) (exact, so the
        # angles do not change): squares of float64 entries near 1e160 or 1e-170 neither overflow nor underflow.
        # Two steps: 2^shift alone overflows for a subnormal peak (shift > 1023).
        shift = (1 - torch.frexp(peak).exponent)[..., None].to(torch.float64)
        half = torch.div(shift, 2, rounding_mode="floor")
        xc = torch.ldexp(torch.ldexp(xc, half), shift - half)
        norms = torch.linalg.vector_norm(xc, dim=-1)  # (b, L)
        c = torch.bmm(xc, xc.transpose(1, 2)) / (norms[:, :, None] * norms[:, None, :])
        c = c.clamp(-1.0, 1.0)
        theta = 2.0 * torch.atan2(torch.sqrt(1.0 - c), torch.sqrt(1.0 + c))
        total += theta.sum(dim=0) / math.pi
    total = 0.5 * (total + total.T)
    total.fill_diagonal_(0.0)
    return total


def angular_distance(reps: torch.Tensor | Iterable[torch.Tensor], process_group=None) -> torch.Tensor:
    """Mean angular distance D (L, L) float64 on the CPU: symmetric, zero diagonal, values in [0, 1].

    reps: one (L, n, d) tensor, or an iterable of (L, n_b, d) batches (streamed: a running float64
        sum and a sample count are kept, so the batches need not fit in memory together).
    process_group: a torch.distributed group (or ``torch.distributed.group.WORLD``); the sums and
        counts are all-reduced over it, so each rank may stream its own shard and every rank gets
        the mean over all samples. Every rank must pass at least one batch.

    Uses the C++/CUDA extension (``sharelora_kernels.extension.angular_sums``) when it is
    built for the batch's device and takes its dtype (float32, bfloat16, float16), else
    ``angular_sums_torch`` (float64, for one); both follow the formula in this module's docstring
    and agree to rounding, so the result does not depend on which one ran. The similarity of the
    README's "The methods" is ``S = 1 - D``. RepresentationError (a ValueError) names the first sample
    and layer whose vector has zero norm or holds NaN / Inf; ValueError for batches that do not fit together.
    """
    batches = [reps] if isinstance(reps, torch.Tensor) else reps
    total, count, num_layers, hidden = None, 0, None, None
    for k, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 3:
            raise ValueError(f"batch {k} must be an (L, n, d) tensor, got {getattr(batch, 'shape', type(batch).__name__)}")
        if batch.is_meta:
            raise ValueError(f"batch {k} is on the meta device: it has no values to measure")
        if batch.shape[0] == 0:
            raise ValueError(f"batch {k} has no layers (shape {tuple(batch.shape)}): nothing to compare")
        if num_layers is not None and batch.shape[0] != num_layers:
            raise ValueError(f"batch {k} has {batch.shape[0]} layers, earlier batches have {num_layers}")
        if hidden is not None and batch.shape[2] != hidden:
            raise ValueError(f"batch {k} has hidden size d={batch.shape[2]}, earlier batches have d={hidden}")
        num_layers, hidden = batch.shape[0], batch.shape[2]
        try:
            sums = _sums_function(batch)(batch, layer_dim=0)
        except ValueError as err:
            if k == 0:
                raise
            raise type(err)(f"{err} (sample index within batch {k}, which starts at sample {count} of the stream)") from err
        total = sums if total is None else total + sums.to(total.device)
        count += batch.shape[1]
    if total is None:
        raise ValueError("angular_distance got no batch")
    if process_group is not None:
        total, count = _all_reduce(total, count, process_group)
    if count == 0:
        raise ValueError("angular_distance got batches with no samples")
    return (total / count).cpu()


def _sums_function(batch: torch.Tensor):
    """extension.angular_sums when the extension is built for the (L, n, d) batch's device and takes
    its dtype and layer count, else the torch reference."""
    try:
        from .. import extension
    except ImportError:
        return angular_sums_torch
    return extension.angular_sums if extension.takes(batch, layer_dim=0) else angular_sums_torch


def _all_reduce(total: torch.Tensor, count: int, group) -> tuple[torch.Tensor, int]:
    """Sum (L, L) float64 sums and the sample count over ``group`` in one all-reduce."""
    import torch.distributed as dist

    flat = torch.cat([total.flatten(), torch.tensor([float(count)], dtype=torch.float64, device=total.device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return flat[:-1].view_as(total), int(flat[-1].item())
