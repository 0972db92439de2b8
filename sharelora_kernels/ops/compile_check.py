"""Compile every Triton kernel ahead of time for a CUDA GPU, on a machine without one.

    python -m sharelora_kernels.ops.compile_check [--arch 90] [--all-configs]

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic but not what only the GPU
compiler sees: ``tl.dot`` shape and dtype rules, pointer casts, layouts, shared memory per config.
This lowers each kernel through Triton's real pipeline to a cubin for ``--arch`` (``ptxas`` ships
with Triton) for each adapter/input dtype pair the ops launch (bf16 input with fp32 or bf16
factors, fp16, fp32 with IEEE and TF32 dots), with and without dropout, and reports the shared
memory each config needs. By default it compiles each kernel's largest-tile config; ``--all-configs``
compiles every autotune config.

Arguments are specialised the way Triton's launcher specialises them at run time for the usual
layouts (unit strides become constants, pointers and feature sizes are 16-aligned), so the report
shows what an H100 would run: registers and spilled bytes (``ptxas -v``) next to shared memory.
``--generic`` compiles the unspecialised variant instead (odd sizes, unaligned views). It must run
with ``TRITON_INTERPRET`` unset (the GPU configs and code paths are chosen at import).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# (input dtype, factor dtype, dot precision): every combination the launchers produce
DTYPE_CASES = [("bf16", "fp32", "tf32"), ("bf16", "bf16", "tf32"), ("fp16", "fp16", "tf32"),
               ("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32")]
TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory per block (opt-in)


@dataclass
class KernelSpec:
    """How to type one autotuned kernel: pointer types per dtype case and its constexpr variants."""

    name: str
    kernel: object  # triton Autotuner
    pointers: Callable[[str, str], dict[str, str]]
    variants: list[dict]  # constexpr settings besides dtypes and the config's tile sizes
    layouts: dict[str, set[str]]  # launch layout -> stride arguments that are 1 there
    aligned: set[str]  # integer arguments that are multiples of 16 in the usual shapes
    fixed: Callable[[dict], triton.Config | None] = lambda variant: None  # a variant launched without autotuning


def _specs() -> list[KernelSpec]:
    from .fused_lora_linear import _fused_linear_kernel
    from .grouped_lora_linear import _grouped_linear_kernel
    from .lowrank_grad import _TABLE_CONFIG, _lowrank_grad_kernel
    from .lowrank_input import _lowrank_project_kernel

    flags = [dict(DROPOUT=d, APPLY_SCALE=s, RNG64=r) for d, s, r in ((False, False, False), (True, True, True))]
    # the leanest variant (no Kronecker rows, no options) and the fullest (Kronecker rows, every option)
    periodic_flags = [dict(PERIODIC=k, **f) for f, k in zip(flags, (False, True))]
    int64_flags = [dict(INT64=i, **f) for f, i in zip(periodic_flags, (False, True))]  # not grouped: int64 strides
    return [
        KernelSpec("fused_linear", _fused_linear_kernel,
                   lambda dt, ft: {"a_ptr": dt, "w_ptr": dt, "bias_ptr": dt, "h_ptr": "fp32", "table_ptr": "i64",
                                   "scale_ptr": "fp32", "out_ptr": dt, "seed_ptr": "i64"},
                   [dict(HAS_BIAS=True, **f) for f in int64_flags],
                   {"y=x@W^T": {"stride_ak", "stride_wk", "stride_hr", "stride_on"},  # w_kn = W.t()
                    "dx=dy@W": {"stride_ak", "stride_wn", "stride_hr", "stride_on"}},
                   {"K", "N", "stride_am", "stride_wk", "stride_wn", "stride_om"}),
        KernelSpec("grouped_linear", _grouped_linear_kernel,
                   lambda dt, ft: {"prob_ptr": "i64", "seg_ptr": "i64", "seed_ptr": "i64"}, periodic_flags,
                   {"strides read from the problem table": set()}, set()),
        KernelSpec("lowrank_project", _lowrank_project_kernel,
                   lambda dt, ft: {"a_ptr": dt, "table_ptr": "i64", "scale_ptr": "fp32", "out_ptr": "fp32",
                                   "seed_ptr": "i64"}, int64_flags,
                   {"h=x@A^T": {"stride_ad", "stride_or"}}, {"D", "stride_am"}),
        KernelSpec("lowrank_grad", _lowrank_grad_kernel,
                   lambda dt, ft: {"g_ptr": "fp32", "a_ptr": dt, "out_ptr": "fp32", "seed_ptr": "i64"},
                   [dict(DROPOUT=False, RNG64=False, INT64=False, TABLE_OUT=False, ATOMIC=False),
                    dict(DROPOUT=True, RNG64=True, INT64=True, TABLE_OUT=True, ATOMIC=False),
                    dict(DROPOUT=True, RNG64=False, INT64=False, TABLE_OUT=True, ATOMIC=True)],
                   {"dA=g^T@x": {"stride_gr", "stride_ad", "stride_od"}}, {"D", "stride_am", "stride_or"},
                   fixed=lambda variant: _table_config(_TABLE_CONFIG) if variant["TABLE_OUT"] else None),
    ]


def _table_config(spec: dict) -> triton.Config:
    tiles = {k: v for k, v in spec.items() if k.startswith("BLOCK")}
    return triton.Config(tiles, num_warps=spec["num_warps"], num_stages=spec["num_stages"])


def compile_one(spec: KernelSpec, config: triton.Config, dtypes: tuple[str, str, str], variant: dict,
                arch: int, layout: str | None, block_r: int = 64) -> dict:
    """Lower one (kernel, config, dtype case, constexpr variant, layout or None for unspecialised) to a
    cubin; returns the resources it needs."""
    dt, ft, precision = dtypes
    fn = spec.kernel.fn
    pointers = {k: f"*{v}" for k, v in spec.pointers(dt, ft).items()}
    if spec.name == "lowrank_grad" and variant["TABLE_OUT"]:
        pointers["out_ptr"] = "*i64"  # the (R, 5) table of fp32 buffers
    constexprs = {**variant, **config.kwargs, "DOT_PRECISION": precision, "BLOCK_R": block_r}
    attrs = {}
    if layout is not None:
        constexprs.update({name: 1 for name in spec.layouts[layout]})
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name in [*pointers, *spec.aligned] if name not in constexprs}
    if "FACTOR_DTYPE" in fn.arg_names:
        constexprs["FACTOR_DTYPE"] = TL[ft]
    if "DTYPE" in fn.arg_names:
        constexprs["DTYPE"] = TL[dt]
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else ("fp32" if name == "p" else "i32"))
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return {"kernel": spec.name, "config": {**config.kwargs, "num_warps": config.num_warps,
                                            "num_stages": config.num_stages},
            "dtypes": dict(zip(("input", "factor", "dot"), dtypes)), "variant": variant, "layout": layout,
            "shared_bytes": compiled.metadata.shared, **_registers(compiled.asm["ptx"], arch),
            "seconds": round(time.perf_counter() - start, 2)}


def _registers(ptx: str, arch: int) -> dict:
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
        return {"registers": int(regs.group(1)), "spill_store_bytes": int(spill.group(1))}
    except (ImportError, OSError, AttributeError):
        return {"registers": None, "spill_store_bytes": None}


def _largest(configs: list[triton.Config]) -> triton.Config:
    """The config with the most tile elements times pipeline stages: the one most likely to fail."""
    return max(configs, key=lambda c: c.num_stages * sum(v for k, v in c.kwargs.items() if k.startswith("BLOCK")))


def run(arch: int = 90, all_configs: bool = False, only: list[str] | None = None,
        dtype_cases: list[tuple[str, str, str]] = DTYPE_CASES, generic: bool = False, block_r: int = 64) -> list[dict]:
    """Compile the cases; raises on the first kernel that does not compile (naming the case), and on
    a config launched without autotuning that needs more shared memory than the arch has."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: the GPU configs and code paths are "
                           "chosen when the kernels are imported")
    results = []
    for spec in _specs():
        if only and spec.name not in only:
            continue
        tuned = spec.kernel.configs if all_configs else [_largest(spec.kernel.configs)]
        layouts = [None] if generic else list(spec.layouts)
        for dtypes, variant, layout in itertools.product(dtype_cases, spec.variants, layouts):
            fixed = spec.fixed(variant)
            for config in [fixed] if fixed else tuned:
                try:
                    result = compile_one(spec, config, dtypes, variant, arch, layout, block_r)
                except Exception as err:
                    raise RuntimeError(f"{spec.name} does not compile for sm_{arch} with {config}, dtypes {dtypes}, "
                                       f"{variant}, layout {layout}: {err}") from err
                limit = SHARED_LIMIT.get(arch)
                if fixed and limit is not None and result["shared_bytes"] > limit:
                    raise RuntimeError(f"{spec.name} with its fixed config {config} needs {result['shared_bytes']} B "
                                       f"of shared memory, sm_{arch} has {limit} (dtypes {dtypes}, {variant})")
                results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharelora_kernels.ops.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as a number (default 90)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only the largest")
    parser.add_argument("--only", nargs="*", help="kernel names to compile (default: all)")
    parser.add_argument("--generic", action="store_true", help="unspecialised arguments (odd sizes, unaligned views)")
    parser.add_argument("--block-r", type=int, default=64, choices=(16, 32, 64),
                        help="rank tile: 16 for r <= 16, 64 the largest (default)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.arch, args.all_configs, args.only, generic=args.generic, block_r=args.block_r)
    limit = SHARED_LIMIT.get(args.arch)
    for r in results:
        over = limit is not None and r["shared_bytes"] > limit
        print(f"{r['kernel']:16s} {r['dtypes']['input']}/{r['dtypes']['factor']}/{r['dtypes']['dot']:4s} "
              f"{json.dumps(r['config'])} {json.dumps(r['variant'])} [{r['layout']}]: shared {r['shared_bytes']} B, "
              f"{r['registers']} registers, {r['spill_store_bytes']} B spilled"
              + (f" > sm_{args.arch} limit {limit} (autotune prunes it)" if over else ""))
    if args.json:
        with open(args.json, "w") as f:
            command = shlex.join(["python", "-m", "sharelora_kernels.ops.compile_check",
                                  *(sys.argv[1:] if argv is None else argv)])
            json.dump({"arch": args.arch, "triton": triton.__version__, "command": command, "generic": args.generic,
                       "block_r": args.block_r,
                       "shared_limit_bytes": limit, "results": results}, f, indent=1)
    print(f"compiled {len(results)} kernels for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
