"""The ``bench`` subcommand: microbenchmarks vs PEFT LoRA and the base matmul, an end-to-end step, a report.

``main(argv)`` parses the arguments of ``python -m sharelora_kernels bench``, runs the suite on one
device and writes results.json, results.md and ratio_vs_base.png under ``--out``
(default ``bench/results/<device>-<date>/``). See bench/README.md for what each figure means.
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


HELP = "microbenchmarks vs PEFT LoRA and the base matmul; writes results.json/.md/.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="base weight dtype of the op cases and the end-to-end model (default: float32 on cpu, "
                        "bfloat16 on cuda); issue 3 is always float32")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run, < 2 min on 2 cores)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<device>-<date>)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant of each op (overrides the profile)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training step")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Run the suite; returns the paths written (json, markdown, and png when matplotlib is installed).

    ``argv`` is the command line recorded in the JSON, after ``bench`` (default: read from sys.argv).
    """
    from ..cli import CommandError, require_positive
    from ..cli.loading import resolve_device
    from .e2e import run_e2e
    from .suite import run_issue3, run_ops

    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise CommandError(f"unknown op(s) {unknown}; known: {list(OPS)}")
    require_positive(args, "repeats")
    device = torch.device(resolve_device(args.device))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    profile = "quick" if args.quick else device.type
    (op_w, op_r), (i3_w, i3_r), (e2e_w, e2e_r) = REPEATS[profile]
    op_r = args.repeats or op_r
    if argv is None:  # python -m sharelora_kernels bench ...: record what follows "bench"
        argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]
    env = describe(device, argv)
    env["sharelora_backend_env"] = os.environ.get("SHARELORA_BACKEND")
    skipped: list[dict] = []
    results = {
        "environment": env,
        "config": {"profile": profile, "dtype": str(dtype), "ops": ops, "warmup": op_w, "repeats": op_r,
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
    out = args.out or Path("bench") / "results" / f"{device_label(device)}-{env['date']}"
    written = write_all(results, out)
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return written


def main(argv: list[str] | None = None) -> dict:
    """``python -m sharelora_kernels bench`` from Python: parse ``argv`` and ``run``."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    p = argparse.ArgumentParser(prog="python -m sharelora_kernels bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv), argv)


__all__ = ["HELP", "add_arguments", "main", "run"]
