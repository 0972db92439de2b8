"""Launch settings of the Triton kernels: autotuned spaces for the GEMMs, fixed heuristics for the rest.

``SHARELORA_AUTOTUNE`` picks how much the compute-bound GEMM kernels (the fused linear, its TMA
variant, the grouped linear) autotune on first use of each key:

    small   one config per kernel, valid for every dtype and shared-memory size (fast start, CI, checks)
    perf    a short list per kernel (default): the configs worth trying on an H100 / H200
    full    the whole space

The memory-bound kernels (the ``x A^T`` projection, dA / dB, the dy pass, the split reduction, the
low-rank-only op's in-place add) are not autotuned: their config is a function of the shape
(``*_config`` below), so a short GPU window spends no time benchmarking them. Under Triton's interpreter every kernel runs one small config.

Autotune keys hold what changes the best config: the GEMM sizes (N, K, R), the M bucket (a power
of two: no retuning per sequence length), the dropout flag, the weight layout (forward reads W
K-major, dx reads it N-major) and the adapter dtype; x's dtype is added by Triton itself.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence

import torch
import triton

from .dispatch import AUTOTUNE_ENV as ENV, AUTOTUNE_MODES as MODES, autotune_mode as mode  # one parser of the variable
from .utils import INTERPRET


def gemm_configs(tiles: Sequence[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Configs of (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples, GROUP_M 8."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


INTERPRETER_GEMM = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)
# One config that fits every GPU Triton runs on (fp32 operands: 2 x (64x32 + 32x64) x 4 B = 32 KiB shared)
SMALL_GEMM = gemm_configs([(64, 64, 32, 4, 2)])


def kronecker_fits(configs: list[triton.Config], nargs: dict, **flags) -> list[triton.Config]:
    """Early prune of the GEMM spaces: a launch with Kronecker rows (PERIODIC) gathers two addresses
    per element of its (16, BLOCK_N) factor chunk, and tiles above 128 x 128 then spill (compile_check),
    so they are tried only without. Never prunes to nothing."""
    if not flags.get("PERIODIC"):
        return configs
    fit = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    return fit or configs[-1:]


def _host_bench(kernel_call: Callable[[], object], quantiles: Sequence[float]) -> list[float]:
    """The interpreter's benchmark of a config (it has no device timer): one call by the host clock."""
    start = time.perf_counter()
    kernel_call()
    return [(time.perf_counter() - start) * 1e3] * len(quantiles)


TUNED_KERNELS: list["TunedKernel"] = []  # every autotuned kernel, in creation order (gpu-check reads it)


class TunedKernel:
    """A jitted kernel with one config list per mode: ``kernel[grid](...)`` launches through the
    autotuner of the current ``mode()`` (one ``triton.autotune`` per mode, made on first use), the
    list pruned by ``kronecker_fits`` for the launch's flags. ``restore_value``: arguments the kernel
    reads back (an output it accumulates onto), saved before and restored after each benchmarked
    config, so tuning never leaves its trial runs in them."""

    def __init__(self, fn, spaces: dict[str, list[triton.Config]], key: list[str],
                 pre_hook: Callable[[dict], None] | None = None, restore_value: Sequence[str] = ()):
        self.fn, self.key, self._pre_hook, self.restore_value = fn, key, pre_hook, list(restore_value)
        self.spaces = {m: [INTERPRETER_GEMM] if INTERPRET else spaces[m] for m in MODES}
        self._tuners: dict[str, object] = {}
        TUNED_KERNELS.append(self)

    @contextlib.contextmanager
    def restricted(self, keep: Callable[[list[triton.Config]], list[triton.Config]]) -> Iterator[None]:
        """Every mode's space cut to ``keep(space)`` inside the block (gpu-check bounds its compile
        count so), restored after; autotuners made inside are dropped on the way out."""
        saved = self.spaces
        self.spaces = {m: keep(space) for m, space in saved.items()}
        self._tuners = {}
        try:
            yield
        finally:
            self.spaces, self._tuners = saved, {}

    def configs(self, which: str | None = None, **flags) -> list[triton.Config]:
        """The configs of mode ``which`` (default: the current mode) a launch with constexpr ``flags``
        tries, each with the kernel's pre-hook."""
        return [self._with_hook(c) for c in kronecker_fits(self.spaces[which or mode()], {}, **flags)]

    def _with_hook(self, c: triton.Config) -> triton.Config:
        if self._pre_hook is None:
            return c
        return triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=self._pre_hook)

    def __getitem__(self, grid):
        which = mode()
        if which not in self._tuners:
            self._tuners[which] = triton.autotune(configs=[self._with_hook(c) for c in self.spaces[which]], key=self.key,
                                                  prune_configs_by={"early_config_prune": kronecker_fits},
                                                  restore_value=self.restore_value or None,
                                                  do_bench=_host_bench if INTERPRET else None)(self.fn)
        return self._tuners[which][grid]


# ----------------------------------------------------------------------------- memory-bound kernels
def _interp(**tiles) -> dict:
    return {**tiles, "num_warps": 4, "num_stages": 1}


def _block_d(d: int, elem_bytes: int, block_r: int) -> int:
    """Columns per tile: 128 (256 bytes of a 16-bit row) when the rank tile is small, else 64, so
    the gathered (BLOCK_R, BLOCK_D) factor tile does not spill (compile_check)."""
    return 128 if elem_bytes == 2 and block_r <= 32 and d >= 128 else 64


def project_config(m: int, d: int, elem_bytes: int, block_r: int) -> dict:
    """``h = dropout(x) A_eff^T`` over x (M, D): 64-row tiles once M fills them (32 below), 3-4
    stages to keep loads in flight."""
    if INTERPRET:
        return _interp(BLOCK_M=32, BLOCK_D=32)
    block_d = _block_d(d, elem_bytes, block_r)
    return {"BLOCK_M": 64 if m >= 64 else 32, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 4 if block_d == 64 else 3}


def grad_config(d: int, elem_bytes: int, block_r: int) -> dict:
    """``dA = dh^T dropout(x)`` over x (M, D): 64-row tiles, 3 stages."""
    if INTERPRET:
        return _interp(BLOCK_M=32, BLOCK_D=32)
    return {"BLOCK_M": 64, "BLOCK_D": _block_d(d, elem_bytes, block_r), "num_warps": 4, "num_stages": 3}


def dy_config(block_r: int) -> dict:
    """The dy pass (dh and dB of a (BLOCK_R, 64) column tile at once): it holds the factor tile, the
    dB accumulator, a dh block and a dy block, so wider rank tiles get more warps and fewer rows
    (the tiles that compile without spills, compile_check)."""
    if INTERPRET:
        return _interp(BLOCK_M=32, BLOCK_D=32)
    if block_r <= 16:
        return {"BLOCK_M": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64 if block_r <= 32 else 32, "BLOCK_D": 64, "num_warps": 8, "num_stages": 2}


def lowrank_add_config() -> dict:
    """``y += (h s) B_eff^T`` in place over y (M, N) (the low-rank-only op; also its dx): y is read and
    written once and the low-rank MMA is small, so one mid-size tile, 8 warps (no spill at any rank
    chunk, compile_check)."""
    if INTERPRET:
        return _interp(BLOCK_M=32, BLOCK_N=32, GROUP_M=4)
    return {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def reduce_config() -> dict:
    """The deterministic second stage: sums S partial (X, Y) fp32 slabs in order, 64 x 64 at a time."""
    if INTERPRET:
        return _interp(BLOCK_X=32, BLOCK_Y=32)
    return {"BLOCK_X": 64, "BLOCK_Y": 64, "num_warps": 4, "num_stages": 1}


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached; 4 under the interpreter, so tiny test shapes
    already exercise the persistent loop and the split reductions)."""
    if INTERPRET or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def m_splits(m: int, other_tiles: int, block_m: int, device: torch.device, min_rows: int | None = None) -> int:
    """How many programs share the M reduction of a (R, D) gradient with ``other_tiles`` tiles: about
    two waves of programs on the GPU, each with at least ``min_rows`` rows (default 4 tiles; 1 tile
    under the interpreter)."""
    rows = min_rows or (block_m if INTERPRET else 4 * block_m)
    return max(1, min(triton.cdiv(2 * sm_count(device), max(other_tiles, 1)), triton.cdiv(m, rows)))
