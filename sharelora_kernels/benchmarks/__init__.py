"""bench: time our adapters next to the frozen matmul and a real PEFT LoRA layer, on this machine.

Each op is one module's low-rank paths (plain LoRA r=16; a Bi-Share slice, gate or Kronecker path;
a whole Bi-Share slice module; q/k/v of one layer as a group) on one x (M, K) and W (N, K). Every op
runs as: base (F.linear alone), peft (PEFT's LoRA layer), torch (our torch path), compose (our
cuBLAS-style composition, the CPU default), auto (the measured choice of fused and compose),
unsloth_order (base GEMM, then out.addmm_(x A^T, B^T)) and, on CUDA, fused (our Triton kernels), on
the same tensors, interleaved, forward, backward and both. The similarity op times our
angular_distance against the plain torch formula, forward only. Then, on the CPU, issue 3's check
(plain r=16 against its 1.10x target) and, unless --no-e2e, one training step of a random LLaMA
with PEFT LoRA, ShareLoRA and Bi-Share LoRA.

Read ratios, not times: each is a variant's median time over base's median in the same run, so
load from other work hits both alike. Every option and the output folder are checked before any
timing starts.

Writes results.json (every figure, the device, library versions, the command and the machine load),
results.md (the tables) and ratio_vs_base.png into ./sharelora-bench/<device>-<date>/, or a new
<device>-<date>-2, -3, ... when that exists (never overwriting), or into --out. --quick is a smoke
run: tiny shapes and few repeats (under 2 minutes on 2 cores), to check that everything runs; its
numbers are noise, and the table and the plot say so. bench/README.md explains every figure.

examples:
  python -m sharelora_kernels bench --device cpu
  python -m sharelora_kernels bench --quick --out /tmp/bench
  python -m sharelora_kernels bench --ops plain,kron --repeats 50 --no-e2e
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .environment import describe, device_label, loadavg
from .ops import OPS, shapes_for
from .report import write_all

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# (warm-up, repeats) per profile: ops, issue 3, end-to-end
REPEATS = {"quick": ((1, 5), (1, 5), (1, 3)), "cpu": ((2, 15), (3, 40), (2, 10)), "cuda": ((10, 100), (10, 100), (3, 20))}


HELP = "time the adapters against the base matmul and PEFT LoRA; writes results.json/.md/.png"
OUT_ROOT = Path("sharelora-bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device,
                   help=f"where to time (default: cuda if available, else cpu; here {default_device})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="base weight dtype of the op cases and the end-to-end model; issue 3 is always float32 "
                        "(default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny shapes, few repeats, under 2 minutes on 2 cores; checks that everything "
                        "runs, its numbers are noise (default: off)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help=f"output folder (default: ./{OUT_ROOT}/<device>-<date>, or -2, -3, ... when it exists)")
    p.add_argument("--ops", metavar="LIST", default=",".join(OPS),
                   help=f"comma-separated subset of {','.join(OPS)} (default: all)")
    p.add_argument("--repeats", metavar="N", type=int, default=None,
                   help="timed repeats per variant of each op (default: {} on cpu, {} on cuda, {} with --quick)".format(
                       *(REPEATS[profile][0][1] for profile in ("cpu", "cuda", "quick"))))
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training step (default: off)")
    p.add_argument("--serving", action="store_true",
                   help="instead: many adapters in one batch on the built-in tiny model (prefill and decode "
                        "tokens/s, bytes per adapter; 1, 8, 64 adapters against PEFT's mixed-batch LoRA and one "
                        "forward per adapter); writes serving.json/.md (default: off)")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Run the suite; returns the paths written (json, markdown, and png when matplotlib is installed).

    ``argv`` is the command line recorded in the JSON, after ``bench`` (default: read from sys.argv).
    """
    from ..cli import CommandError, require_positive
    from ..cli.loading import resolve_device
    from ..cli.outputs import check_out_dir, numbered_dir
    from .e2e import run_e2e
    from .report import OUTPUTS
    from .suite import run_issue3, run_ops

    if args.serving:
        return run_serving(args, argv)
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise CommandError(f"--ops: unknown op(s) {unknown}; known: {list(OPS)}")
    require_positive(args, "repeats")
    if args.out is not None:
        check_out_dir(args.out, OUTPUTS)
    device = torch.device(resolve_device(args.device))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    profile = "quick" if args.quick else device.type
    (op_w, op_r), (i3_w, i3_r), (e2e_w, e2e_r) = REPEATS[profile]
    op_r = args.repeats or op_r
    if argv is None:  # python -m sharelora_kernels bench ...: record what follows "bench"
        argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]
    env = describe(device, argv)
    env["sharelora_backend_env"] = os.environ.get("SHARELORA_BACKEND")
    out = args.out or numbered_dir(OUT_ROOT, f"{device_label(device)}-{env['date']}")
    print(f"bench: results go to {out}" + (" (smoke run: --quick)" if args.quick else ""), file=sys.stderr)
    skipped: list[dict] = []
    results = {
        "environment": env,
        "config": {"profile": profile, "smoke_run": args.quick, "dtype": str(dtype), "ops": ops, "warmup": op_w,
                   "repeats": op_r,
                   "shapes": {op: shapes_for(op, profile) for op in ops}},
        "units": {"*_ms": "milliseconds (median, q1, q3, min, max over n repeats)", "ratio_vs_base": "time / base time",
                  "*_bytes": "bytes", "tokens_per_s": "tokens per second", "trainable_params": "count"},
        "issue3": run_issue3(device, i3_w, i3_r) if device.type == "cpu" else None,
    }
    results["ops"] = run_ops(ops, {op: shapes_for(op, profile) for op in ops}, device, dtype, op_w, op_r, skipped)
    if args.no_e2e:
        skipped.append({"what": "end-to-end step", "reason": "--no-e2e"})
        results["e2e"] = None
    else:
        results["e2e"] = run_e2e(profile, device, dtype, e2e_w, e2e_r)
    results["skipped"] = skipped
    env["loadavg_after"] = loadavg()
    written = write_all(results, out)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return written


def run_serving(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """``bench --serving``: ``serving.run``, written as serving.json and serving.md in the output folder."""
    from ..cli import CommandError
    from ..cli.loading import resolve_device
    from ..cli.outputs import check_out_dir, numbered_dir, write_json, write_text
    from .report import SMOKE_NOTE
    from . import serving

    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise CommandError('--serving compares with PEFT\'s mixed-batch LoRA: pip install "sharelora_kernels[peft]"') from err
    if args.out is not None:
        check_out_dir(args.out, serving.OUTPUTS)
    device = torch.device(resolve_device(args.device))
    profile = "quick" if args.quick else device.type
    if argv is None:
        argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]
    env = describe(device, argv)
    out = args.out or numbered_dir(OUT_ROOT, f"{device_label(device)}-{env['date']}-serving")
    print(f"bench --serving: results go to {out}" + (" (smoke run: --quick)" if args.quick else ""), file=sys.stderr)
    results = {"environment": env, "config": {"profile": profile, "smoke_run": args.quick},
               "serving": serving.run(profile, device)}
    env["loadavg_after"] = loadavg()
    written = {"json": str(write_json(out / "serving.json", results, indent=2)),
               "markdown": str(write_text(out / "serving.md", serving.markdown(
                   results["serving"], SMOKE_NOTE if args.quick else None)))}
    print(serving.markdown(results["serving"], SMOKE_NOTE if args.quick else None))
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return written


def main(argv: list[str] | None = None) -> dict:
    """``python -m sharelora_kernels bench`` from Python: parse ``argv`` and ``run``."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    p = argparse.ArgumentParser(prog="python -m sharelora_kernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv), argv)


__all__ = ["HELP", "add_arguments", "main", "run"]
