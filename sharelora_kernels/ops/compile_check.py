"""Compile every Triton kernel ahead of time for a CUDA GPU, on a machine without one, and report
what the compiler made of it.

    python -m sharelora_kernels.ops.compile_check [--arch 90] [--quick] [--all-configs] [--json FILE]

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic but not what only the GPU
compiler sees: ``tl.dot`` shape and dtype rules, pointer casts, layouts, shared memory per config,
registers, and whether the loads became TMA copies or 16-byte vectors. This lowers each kernel
through Triton's real pipeline to a cubin for ``--arch`` (``ptxas`` ships with Triton), with its
arguments specialised the way Triton's launcher specialises them at run time for the usual layouts
(unit strides become constants, pointers and feature sizes are 16-aligned), for each launch case
(forward, dx, ...) and adapter/input dtype pair the ops produce.

Each entry of the report: ``kernel``, ``variant`` (case, dtypes, constexpr flags), ``config``
(tiles, warps, stages), ``shared_bytes``, ``registers`` and ``spill_bytes`` (``ptxas -v``),
``uses_tma`` (bulk tensor copies in the PTX), ``uses_wgmma`` (Hopper warpgroup MMA),
``narrow_global_loads`` (global loads narrower than 16 bytes: ``ld.global`` and ``cp.async`` of
1-8 bytes), ``narrow_global_loads_base_gemm`` (those of them whose source line is in the
pointer base-GEMM loop, ``gemm_tiles.matmul_tile``), ``loop_nesting`` (deepest ``scf.for`` nest in
the TTGIR) and ``flattened`` (persistent kernels: their tile and K loops compiled to one loop).

``--quick``: the bf16-base / fp32-adapter case of every kernel at its ``perf`` configs (the GEMMs;
those ``autotune.kronecker_fits`` leaves for the variant) or its heuristic configs (the memory-bound
kernels), with and without Kronecker rows. Without it: every dtype case; ``--all-configs`` uses
the ``full`` autotune space. It must run with
``TRITON_INTERPRET`` unset (the GPU configs and code paths are chosen at import).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# (input dtype, factor dtype, dot precision): every combination the launchers produce
DTYPE_CASES = [("bf16", "fp32", "tf32"), ("bf16", "bf16", "tf32"), ("fp16", "fp16", "tf32"),
               ("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32")]
QUICK_DTYPES = [("bf16", "fp32", "tf32")]
TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory per block (opt-in)
PERSISTENT = ("tma_linear",)  # kernels whose programs loop over tiles: ``flattened`` is reported for them


@dataclass
class Case:
    """One way a launcher calls a kernel: its name, the stride arguments that are 1 there, the
    constexpr flags, and the integer arguments that are multiples of 16."""

    name: str
    units: set[str]
    flags: dict
    aligned: set[str] = field(default_factory=set)


@dataclass
class KernelSpec:
    """How to type one kernel: pointer types per dtype case, its launch cases, its configs."""

    name: str
    fn: object  # the triton JITFunction
    pointers: callable  # (input dtype, factor dtype) -> {argument: type}
    cases: list[Case]
    configs: callable  # (all_configs, input dtype, rank tile, flags) -> the [triton.Config] a launch tries
    kronecker: bool = True  # has a PERIODIC flag (Kronecker rows or not)
    rank_tile: int | None = None  # a fixed BLOCK_R (the GEMMs' low-rank chunk; 0: none), else each of --block-r
    ieee: bool = True  # launched with IEEE float32 dots (the TMA kernel is not: tma_linear.usable)


def _config(spec: dict) -> triton.Config:
    tiles = {k: v for k, v in spec.items() if k.startswith(("BLOCK", "GROUP"))}
    return triton.Config(tiles, num_warps=spec["num_warps"], num_stages=spec["num_stages"])


def _specs() -> list[KernelSpec]:
    from . import autotune
    from .dy_lowrank import _dy_lowrank_kernel
    from .fused_lora_linear import _fused_linear_kernel, pointer_kernel
    from .gemm_tiles import LOWRANK_CHUNK
    from .grouped_lora_linear import _grouped_linear_kernel, grouped_kernel
    from .lowrank_grad import _lowrank_grad_kernel, _reduce_splits_kernel
    from .lowrank_input import _lowrank_project_kernel
    from .lowrank_only_triton import _lowrank_add_kernel
    from .multi_adapter import BLOCK_MS
    from .multi_adapter_triton import _expand_kernel, _shrink_kernel, expand_config, shrink_config, shrink_rank_tile
    from .tma_linear import _tma_linear_kernel, tma_kernel

    tuned = lambda kernel: lambda all_configs, dt, block_r, flags: kernel.configs("full" if all_configs else "perf",
                                                                                  **flags)
    fixed = lambda make: lambda all_configs, dt, block_r, flags: [_config(make(BYTES[dt], block_r))]
    gemm_aligned = {"K", "N", "stride_am", "stride_wk", "stride_wn", "stride_om", "stride_hm", "stride_mm"}
    forward = dict(HAS_BIAS=True, APPLY_SCALE=True, DROPOUT=False)
    dx = dict(HAS_BIAS=False, APPLY_SCALE=False, DROPOUT=True)
    return [
        KernelSpec("tma_linear", _tma_linear_kernel,
                   lambda dt, ft: {"bias_ptr": dt, "h_ptr": "fp32", "table_ptr": "i64", "scale_ptr": "fp32",
                                   "out_ptr": dt, "mask_ptr": "i32"},
                   [Case("forward", {"stride_hr", "stride_on"}, dict(W_KMAJOR=True, R_CHUNKS=1, **forward), gemm_aligned),
                    Case("dx", {"stride_hr", "stride_on"}, dict(W_KMAJOR=False, R_CHUNKS=1, **dx), gemm_aligned),
                    Case("forward, r=64", {"stride_hr", "stride_on"}, dict(W_KMAJOR=True, R_CHUNKS=4, **forward),
                         gemm_aligned)],
                   tuned(tma_kernel), rank_tile=LOWRANK_CHUNK, ieee=False),
        KernelSpec("fused_linear", _fused_linear_kernel,
                   lambda dt, ft: {"a_ptr": dt, "w_ptr": dt, "bias_ptr": dt, "h_ptr": "fp32", "table_ptr": "i64",
                                   "scale_ptr": "fp32", "out_ptr": dt, "mask_ptr": "i32"},
                   [Case("forward", {"stride_ak", "stride_wk", "stride_hr", "stride_on"}, dict(INT64=False, **forward),
                         gemm_aligned),
                    Case("dx", {"stride_ak", "stride_wn", "stride_hr", "stride_on"}, dict(INT64=False, **dx),
                         gemm_aligned)],
                   tuned(pointer_kernel), rank_tile=LOWRANK_CHUNK),
        KernelSpec("grouped_linear", _grouped_linear_kernel,
                   lambda dt, ft: {"prob_ptr": "i64", "seg_ptr": "i64", "hcol_ptr": "i32", "h_ptr": "fp32",
                                   "mask_ptr": "i32", **{f"{name}{i}": dt for name in ("a", "out") for i in range(4)}},
                   [Case("forward", {"stride_ak", "stride_wk"},
                         dict(APPLY_SCALE=True, DROPOUT=False, ACCUMULATE=False, ALIGNED=True, INT64=False),
                         {"stride_wn", "stride_mm", "stride_hm"}),
                    Case("dx", {"stride_ak", "stride_wn"},
                         dict(APPLY_SCALE=False, DROPOUT=True, ACCUMULATE=False, ALIGNED=True, INT64=False),
                         {"stride_wk", "stride_mm", "stride_hm"})],
                   tuned(grouped_kernel), rank_tile=LOWRANK_CHUNK),
        KernelSpec("lowrank_project", _lowrank_project_kernel,
                   lambda dt, ft: {"a_ptr": dt, "table_ptr": "i64", "out_ptr": "fp32", "seed_ptr": "i64",
                                   "mask_ptr": "i32"},
                   [Case("h=dropout(x)@A^T", {"stride_ad", "stride_or"}, dict(DROPOUT=True, RNG64=False, INT64=False),
                         {"D", "stride_am"})],
                   fixed(lambda es, br: autotune.project_config(8192, 4096, es, br))),
        KernelSpec("dy_lowrank", _dy_lowrank_kernel,
                   lambda dt, ft: {"dy_ptr": dt, "h_ptr": "fp32", "table_ptr": "i64", "scale_ptr": "fp32",
                                   "dh_ptr": "fp32", "db_ptr": "fp32"},
                   [Case("dh, dB from dy", {"stride_yn", "stride_hr", "stride_dhr", "stride_dbn"}, dict(INT64=False),
                         {"N", "stride_ym", "stride_dbr"})],
                   fixed(lambda es, br: autotune.dy_config(br))),
        KernelSpec("lowrank_grad", _lowrank_grad_kernel,
                   lambda dt, ft: {"g_ptr": "fp32", "a_ptr": dt, "out_ptr": "fp32", "mask_ptr": "i32"},
                   [Case("dA=dh^T@dropout(x)", {"stride_gr", "stride_ad", "stride_od"},
                         dict(DROPOUT=True, INT64=False, ATOMIC=False), {"D", "stride_am", "stride_or", "stride_os"}),
                    Case("dA atomic", {"stride_gr", "stride_ad", "stride_od"},
                         dict(DROPOUT=True, INT64=False, ATOMIC=True), {"D", "stride_am", "stride_or"})],
                   fixed(lambda es, br: autotune.grad_config(4096, es, br)), kronecker=False),
        KernelSpec("reduce_splits", _reduce_splits_kernel, lambda dt, ft: {"part_ptr": "fp32", "out_ptr": "fp32"},
                   [Case("sum of S slabs", {"stride_py", "stride_oy"}, {}, {"Y", "stride_px", "stride_ox", "stride_ps"})],
                   fixed(lambda es, br: autotune.reduce_config()), kronecker=False, rank_tile=0),
        KernelSpec("lowrank_add", _lowrank_add_kernel,  # the low-rank-only op of quantized bases
                   lambda dt, ft: {"h_ptr": "fp32", "table_ptr": "i64", "scale_ptr": "fp32", "out_ptr": dt,
                                   "mask_ptr": "i32"},
                   [Case("y+=(h s)@B^T in place", {"stride_hr", "stride_on"},
                         dict(ACCUMULATE=True, APPLY_SCALE=True, DROPOUT=False), {"N", "stride_om", "stride_hm"}),
                    Case("dx=mask(dh@A)", {"stride_hr", "stride_on"},
                         dict(ACCUMULATE=False, APPLY_SCALE=False, DROPOUT=True),
                         {"N", "stride_om", "stride_hm", "stride_mm"})],
                   lambda all_configs, dt, block_r, flags: [_config(autotune.lowrank_add_config())],
                   rank_tile=LOWRANK_CHUNK),
        # the multi-adapter op: every tile height (16 rows: decode; 64: prefill)
        KernelSpec("multi_shrink", _shrink_kernel,
                   lambda dt, ft: {"x_ptr": dt, "order_ptr": "i64", "tile_ptr": "i32", "rank_ptr": "i32",
                                   "table_ptr": "i64", "h_ptr": "fp32"},
                   [Case("h=x[order]@A_a^T", {"stride_xk"}, {}, {"K", "stride_xm"})],
                   lambda all_configs, dt, block_r, flags: [
                       _config({**shrink_config(BYTES[dt], block_r, bm), "BLOCK_M": bm}) for bm in BLOCK_MS
                       if shrink_rank_tile(bm, block_r, BYTES[dt]) == block_r]),
        KernelSpec("multi_expand", _expand_kernel,
                   lambda dt, ft: {"h_ptr": "fp32", "order_ptr": "i64", "tile_ptr": "i32", "rank_ptr": "i32",
                                   "table_ptr": "i64", "scale_ptr": "fp32", "y_ptr": dt},
                   [Case("y[order]+=(h s)@B_a^T", {"stride_yn"}, {}, {"N", "stride_ym"})],
                   lambda all_configs, dt, block_r, flags: [_config({**expand_config(bm), "BLOCK_M": bm})
                                                            for bm in BLOCK_MS],
                   rank_tile=LOWRANK_CHUNK),
    ]


def kernel_names() -> set[str]:
    """Every kernel the report covers (what a complete report holds)."""
    return {spec.name for spec in _specs()}


def _signature(spec: KernelSpec, case: Case, config: triton.Config, dtypes: tuple[str, str, str], flags: dict,
               block_r: int) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of one compile, specialised as the launcher specialises."""
    dt, ft, precision = dtypes
    fn = spec.fn
    names = fn.arg_names
    types = {k: f"*{v}" for k, v in spec.pointers(dt, ft).items()}
    if spec.name == "tma_linear":
        c = config.kwargs
        types["a_desc"] = f"tensordesc<{dt}[{c['BLOCK_M']}, {c['BLOCK_K']}]>"
        w_block = (c["BLOCK_N"], c["BLOCK_K"]) if flags["W_KMAJOR"] else (c["BLOCK_K"], c["BLOCK_N"])
        types["w_desc"] = f"tensordesc<{dt}[{w_block[0]}, {w_block[1]}]>"
    extra = {"DOT_PRECISION": precision, "BLOCK_R": block_r, "FACTOR_DTYPE": TL[ft], "DTYPE": TL[dt]}
    constexprs = {**flags, **config.kwargs, **{k: v for k, v in extra.items() if k in names},
                  **{name: 1 for name in case.units}}
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in [*types, *case.aligned]
             if n in names and n not in constexprs and not types.get(n, "").startswith("tensordesc")}
    signature = {n: types.get(n, "constexpr" if n in constexprs else ("fp32" if n == "p" else "i32")) for n in names}
    return signature, {(names.index(k),): v for k, v in constexprs.items()}, attrs


def _base_gemm_lines() -> tuple[str, set[int]]:
    """(file name, source lines) of the pointer base-GEMM loop (``gemm_tiles.matmul_tile``)."""
    from .gemm_tiles import matmul_tile

    lines, start = inspect.getsourcelines(matmul_tile.fn)
    return os.path.basename(inspect.getsourcefile(matmul_tile.fn)), set(range(start, start + len(lines)))


_LD = re.compile(r"\bld\.global[\w.:]*")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-fA-F]+|\d+)")


def _load_bytes(instruction: str) -> int:
    """Bytes one ``ld.global...`` instruction moves: vector width x element bits / 8."""
    parts = instruction.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 32)
    return vec * bits // 8


def ptx_facts(ptx: str, gemm_file: str, gemm_lines: set[int]) -> dict:
    """What the PTX shows: TMA, wgmma, and the global loads narrower than 16 bytes (all, and those
    on source lines of the base-GEMM loop, from the ``.loc`` line table)."""
    files = {m.group(1): os.path.basename(m.group(2)) for m in re.finditer(r'\.file\s+(\d+)\s+"([^"]+)"', ptx)}
    current, narrow, narrow_gemm = None, 0, 0
    for line in ptx.splitlines():
        stripped = line.strip()
        if stripped.startswith(".loc"):  # (the .file table comes at the end of the PTX)
            m = re.match(r"\.loc\s+(\d+)\s+(\d+)", stripped)
            current = (files.get(m.group(1)), int(m.group(2))) if m else None
            continue
        size = None
        ld = _LD.search(stripped)
        if ld:
            size = _load_bytes(ld.group(0))
        else:
            cp = _CP_ASYNC.search(stripped)
            if cp:
                size = int(cp.group(1), 0)
        if size is not None and size < 16:
            narrow += 1
            narrow_gemm += current is not None and current[0] == gemm_file and current[1] in gemm_lines
    return {"uses_tma": "cp.async.bulk.tensor" in ptx, "uses_wgmma": "wgmma.mma_async" in ptx,
            "narrow_global_loads": narrow, "narrow_global_loads_base_gemm": narrow_gemm}


def _ptxas(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes from ``ptxas -v`` (the ptxas Triton uses; None if absent)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            report = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                                     "-v", path, "-o", os.devnull], capture_output=True, text=True).stderr
        regs, spill = re.search(r"Used (\d+) registers", report), re.search(r"(\d+) bytes spill stores", report)
        return {"registers": int(regs.group(1)), "spill_bytes": int(spill.group(1))}
    except (ImportError, OSError, AttributeError):
        return {"registers": None, "spill_bytes": None}


def compile_one(spec: KernelSpec, case: Case, config: triton.Config, dtypes: tuple[str, str, str], flags: dict,
                arch: int, block_r: int) -> dict:
    """Lower one (kernel, case, config, dtype case, flags) to a cubin; returns the report entry."""
    signature, constexprs, attrs = _signature(spec, case, config, dtypes, flags, block_r)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(spec.fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptx = compiled.asm["ptx"]
    variant = {"case": case.name, **dict(zip(("input", "factor", "dot"), dtypes)), **flags,
               **({"BLOCK_R": block_r} if "BLOCK_R" in spec.fn.arg_names else {})}
    nesting = loop_nesting(compiled.asm.get("ttgir", ""))
    return {"kernel": spec.name, "variant": variant,
            "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
            "shared_bytes": compiled.metadata.shared, **_ptxas(ptx, arch), **ptx_facts(ptx, *_base_gemm_lines()),
            "loop_nesting": nesting, "flattened": nesting <= 1 if spec.name in PERSISTENT else None,
            "seconds": round(time.perf_counter() - start, 2)}


def loop_nesting(ttgir: str) -> int:
    """The deepest nest of ``scf.for`` loops in a TTGIR module (0: no loop). A persistent kernel whose
    tile loop the compiler flattened with its K loop (``tl.range(flatten=True)``: only a single
    inner loop fuses) shows 1; one that drains its pipeline at every tile shows 2 or more."""
    depth, opened, deepest = 0, [], 0
    for line in ttgir.splitlines():
        if re.search(r"\bscf\.for\b", line):
            opened.append(depth)
            deepest = max(deepest, len(opened))
        depth += line.count("{") - line.count("}")
        while opened and depth <= opened[-1]:
            opened.pop()
    return deepest


def run(arch: int = 90, quick: bool = False, all_configs: bool = False, only: list[str] | None = None,
        block_rs: tuple[int, ...] = (16, 64)) -> list[dict]:
    """Compile the cases; raises on the first kernel that does not compile (naming the case)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: the GPU configs and code paths are "
                           "chosen when the kernels are imported")
    results = []
    for spec in _specs():
        if only and spec.name not in only:
            continue
        periodic = [False, True] if spec.kronecker else [None]
        for dtypes in QUICK_DTYPES if quick else DTYPE_CASES:
            if dtypes[2] == "ieee" and not spec.ieee:
                continue
            for case in spec.cases:
                for kron in periodic:
                    flags = {**case.flags, **({"PERIODIC": kron} if kron is not None else {})}
                    for block_r, config in ((b, c) for b in ([spec.rank_tile] if spec.rank_tile is not None else block_rs)
                                            for c in spec.configs(all_configs, dtypes[0], b, flags)):
                        try:
                            results.append(compile_one(spec, case, config, dtypes, flags, arch, block_r))
                        except Exception as err:
                            raise RuntimeError(f"{spec.name} ({case.name}) does not compile for sm_{arch} with {config}, "
                                               f"dtypes {dtypes}, {flags}: {err}") from err
    return results


def _write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename (never half-written)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharelora_kernels.ops.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as a number (default 90)")
    parser.add_argument("--quick", action="store_true", help="bf16 base + fp32 adapters only")
    parser.add_argument("--all-configs", action="store_true", help="the full autotune space, not the perf list")
    parser.add_argument("--only", nargs="*", help="kernel names to compile (default: all)")
    parser.add_argument("--block-r", type=int, nargs="+", default=[16, 64], choices=(16, 32, 64),
                        help="rank tiles of the memory-bound kernels (default 16 and 64: r <= 16 and the largest); "
                             "the GEMMs' low-rank chunk is fixed")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(args.arch, args.quick, args.all_configs, args.only, tuple(args.block_r))
    limit = SHARED_LIMIT.get(args.arch)
    for r in results:
        v = r["variant"]
        over = limit is not None and r["shared_bytes"] > limit
        print(f"{r['kernel']:15s} {v['case']:20s} {v['input']}/{v['factor']}/{v['dot']:4s} {json.dumps(r['config'])}: "
              f"shared {r['shared_bytes']} B, {r['registers']} registers, {r['spill_bytes']} B spilled, "
              f"tma {r['uses_tma']}, wgmma {r['uses_wgmma']}, loops nested {r['loop_nesting']}"
              + ("" if r["flattened"] is None else f" (flattened {r['flattened']})")
              + f", narrow loads {r['narrow_global_loads']} "
              f"({r['narrow_global_loads_base_gemm']} in the base GEMM)"
              + (f" > sm_{args.arch} limit {limit} (autotune prunes it)" if over else ""))
    seconds = round(time.perf_counter() - start, 1)
    if args.json:
        import torch

        command = shlex.join(["python", "-m", "sharelora_kernels.ops.compile_check",
                              *(sys.argv[1:] if argv is None else argv)])
        _write_json(args.json, {"arch": args.arch, "command": command, "date": time.strftime("%Y-%m-%d"),
                                "versions": {"triton": triton.__version__, "torch": torch.__version__,
                                             "python": platform.python_version()},
                                "quick": args.quick, "all_configs": args.all_configs, "block_r": args.block_r,
                                "shared_limit_bytes": limit, "seconds": seconds, "results": results})
    print(f"compiled {len(results)} kernels for sm_{args.arch} in {seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
