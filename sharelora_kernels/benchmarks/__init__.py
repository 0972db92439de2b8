"""bench: time our adapters next to the frozen matmul and a real PEFT LoRA layer, on this machine.

Each op is one module's low-rank paths (plain LoRA r=16; a Bi-Share slice, gate or Kronecker path;
a whole Bi-Share slice module; q/k/v of one layer as a group) on one x (M, K) and W (N, K). Every op
runs as: base (F.linear alone), peft (PEFT's LoRA layer), torch (our torch path), compose (our
cuBLAS-style composition, the CPU default), auto (the measured choice of fused and compose),
unsloth_order (base GEMM, then out.addmm_(x A^T, B^T)) and, on CUDA, fused (our Triton kernels), on
the same tensors, interleaved, forward, backward and both. The similarity op times our
angular_distance against the plain torch formula, forward only. Then, on the CPU, the default-backend
check (plain r=16 against its 1.10x target) and, unless --no-e2e, one training step of a random LLaMA
with PEFT LoRA, ShareLoRA and Bi-Share LoRA.

Read ratios, not times: each is a variant's median time over base's median in the same run, so
load from other work hits both alike. Every option and the output folder are checked before any
timing starts.

--host times only the host work of one layer call (benchmarks/host.py: tiny shapes on the CPU,
one thread, CPU time of this process; nn.Linear, PEFT's layer and ours on torch / compose / triton
with stubbed launches, every layer kind, a tiny-LLaMA step) into host.json / host.md / host.png;
a CPU run without --host includes it too.

Writes results.json (every figure, the device, library versions, the command and the machine load),
results.md (the tables) and ratio_vs_base.png into ./sharelora-bench/<device>-<date>/, or a new
<device>-<date>-2, -3, ... when that exists (never overwriting), or into --out. --quick is a smoke
run: tiny shapes and few repeats (under 2 minutes on 2 cores), to check that everything runs; its
numbers are noise, and the table and the plot say so. bench/README.md explains every figure.

examples:
  python -m sharelora_kernels bench --device cpu
  python -m sharelora_kernels bench --quick --out /tmp/bench
  python -m sharelora_kernels bench --ops plain,kron --repeats 50 --no-e2e
  python -m sharelora_kernels bench --host
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}  # --dtype value -> torch dtype name
# The op cases, in order: ``ops.OPS`` builds them (named here so that --help and --ops answer without importing torch)
OPS = ("plain", "slice", "gate", "kron", "bishare_slice", "grouped_qkv", "similarity")
# (warm-up, repeats) per profile: ops, the default-backend check, end-to-end
REPEATS = {"quick": ((1, 5), (1, 5), (1, 3)), "cpu": ((2, 15), (3, 40), (2, 10)), "cuda": ((10, 100), (10, 100), (3, 20))}


HELP = "time the adapters against the base matmul and PEFT LoRA; writes results.json/.md/.png"
OUT_ROOT = Path("sharelora-bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli.options import add_threads_argument

    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to time (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="base weight dtype of the op cases and the end-to-end model; the default-backend check is always float32 "
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
    add_threads_argument(p)
    p.add_argument("--host", action="store_true",
                   help="time only the host work of one layer call (tiny shapes, CPU, one thread) against PEFT; "
                        "writes host.json/.md/.png (default: off; a CPU run includes it)")
    p.add_argument("--serving", action="store_true",
                   help="instead: many adapters in one batch on the built-in tiny model (prefill and decode "
                        "tokens/s, bytes per adapter; 1, 8, 64 adapters against PEFT's mixed-batch LoRA and one "
                        "forward per adapter); writes serving.json/.md (default: off)")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Run the suite; returns the paths written (json, markdown, and png when matplotlib is installed).

    ``argv`` is the command line recorded in the JSON, after ``bench`` (default: read from sys.argv).
    """
    from ..cli import CommandError, check_settings, require_positive
    from ..cli.options import check_threads_argument, set_threads
    from ..cli.outputs import check_out_dir, numbered_dir
    from .report import HOST_OUTPUTS, OUTPUTS

    if args.host and args.serving:
        raise CommandError("--host and --serving are two benchmarks: run them one at a time")
    if args.serving:
        _refuse_unused(args, "--serving (the built-in tiny model)", ("device", "threads"))
        return run_serving(args, argv)  # its own option checks, then check_settings
    if args.host:
        _refuse_unused(args, "--host (tiny layer calls on the CPU, one thread)", ())
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise CommandError(f"--ops: unknown op(s) {unknown}; known: {list(OPS)}")
    require_positive(args, "repeats")
    check_threads_argument(args)
    if args.out is not None:
        check_out_dir(args.out, HOST_OUTPUTS if args.host else OUTPUTS + HOST_OUTPUTS)
    check_settings()
    if args.host:
        return _run_host(args, argv)

    import torch

    from ..cli.loading import resolve_device
    from .e2e import run_e2e
    from .environment import describe, device_label, loadavg
    from .host import run_host
    from .host import write as write_host
    from .ops import shapes_for
    from .report import write_all
    from .suite import run_default_backend_check, run_ops

    set_threads(args)
    device = torch.device(resolve_device(args.device))
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    profile = "quick" if args.quick else device.type
    (op_w, op_r), (check_w, check_r), (e2e_w, e2e_r) = REPEATS[profile]
    op_r = args.repeats or op_r
    env = describe(device, recorded_argv(argv))
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
        "default_backend_check": (run_default_backend_check(device, check_w, check_r, judged=not args.quick)
                                  if device.type == "cpu" else None),
    }
    results["ops"] = run_ops(ops, {op: shapes_for(op, profile) for op in ops}, device, dtype, op_w, op_r, skipped)
    if args.no_e2e:
        skipped.append({"what": "end-to-end step", "reason": "--no-e2e"})
        results["e2e"] = None
    else:
        results["e2e"] = run_e2e(profile, device, dtype, e2e_w, e2e_r)
    results["skipped"] = skipped
    if device.type == "cpu":
        results["host"] = run_host(quick=args.quick)
    env["loadavg_after"] = loadavg()
    written = write_all(results, out)
    if device.type == "cpu":
        written.update({f"host {k}": v for k, v in write_host(results, out).items()})
    _report(written, env)
    return written


def recorded_argv(argv: list[str] | None) -> list[str]:
    """The command line a result records: ``argv``, or (``python -m sharelora_kernels bench ...``)
    what follows "bench" in ``sys.argv``."""
    if argv is not None:
        return argv
    return sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]


def _report(written: dict, env: dict) -> None:
    """Print the files written, then the load warning when the machine was busier than its cores."""
    from .environment import load_warning

    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    warning = load_warning(env)
    if warning:
        print(warning, file=sys.stderr)


# Options of the op benchmark, with their defaults: --host and --serving refuse the ones they do not read.
_OPTION_DEFAULTS = {"device": None, "dtype": None, "ops": ",".join(OPS), "repeats": None, "no_e2e": False, "threads": None}


def _refuse_unused(args: argparse.Namespace, mode: str, used: tuple[str, ...]) -> None:
    """CommandError naming an option given that ``mode`` does not read (it would be silently ignored)."""
    from ..cli import CommandError

    for name, default in _OPTION_DEFAULTS.items():
        if name not in used and getattr(args, name) != default:
            raise CommandError(f"--{name.replace('_', '-')} does not apply to bench {mode}")


def _run_host(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """bench --host: the host benchmark alone (always on the CPU; options checked by ``run``)."""
    import torch

    from ..cli.outputs import numbered_dir
    from .environment import describe, device_label, loadavg
    from .host import run_host
    from .host import write as write_host

    argv = recorded_argv(argv)
    device = torch.device("cpu")
    env = describe(device, argv)
    out = args.out or numbered_dir(OUT_ROOT, f"host-{device_label(device)}-{env['date']}")
    print(f"bench --host: results go to {out}" + (" (smoke run: --quick)" if args.quick else ""), file=sys.stderr)
    results = {"environment": env, "host": run_host(quick=args.quick)}
    env["loadavg_after"] = loadavg()
    written = write_host(results, out)
    _report(written, env)
    return written


def run_serving(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """``bench --serving``: ``serving.run``, written as serving.json and serving.md in the output folder."""
    from ..cli import CommandError, check_settings
    from ..cli.options import check_threads_argument, set_threads
    from ..cli.outputs import check_out_dir, numbered_dir, write_json, write_text
    from .report import SERVING_OUTPUTS, SMOKE_NOTE

    check_threads_argument(args)
    if args.out is not None:
        check_out_dir(args.out, SERVING_OUTPUTS)
    check_settings()
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise CommandError('--serving compares with PEFT\'s mixed-batch LoRA: pip install "sharelora_kernels[peft]"') from err
    import torch

    from ..cli.loading import resolve_device
    from . import serving
    from .environment import describe, device_label, loadavg

    set_threads(args)
    device = torch.device(resolve_device(args.device))
    profile = "quick" if args.quick else device.type
    argv = recorded_argv(argv)
    env = describe(device, argv)
    out = args.out or numbered_dir(OUT_ROOT, f"{device_label(device)}-{env['date']}-serving")
    print(f"bench --serving: results go to {out}" + (" (smoke run: --quick)" if args.quick else ""), file=sys.stderr)
    results = {"environment": env, "config": {"profile": profile, "smoke_run": args.quick},
               "serving": serving.run(profile, device)}
    env["loadavg_after"] = loadavg()
    table = serving.markdown(results["serving"], SMOKE_NOTE if args.quick else None)
    written = {"json": str(write_json(out / "serving.json", results, indent=2)),
               "markdown": str(write_text(out / "serving.md", table))}
    print(table)
    _report(written, env)
    return written


def main(argv: list[str] | None = None) -> dict:
    """``python -m sharelora_kernels bench`` from Python: parse ``argv`` and ``run``."""
    from ..cli.parser import Parser

    argv = list(argv) if argv is not None else sys.argv[1:]
    p = Parser(prog="python -m sharelora_kernels bench", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv), argv)


__all__ = ["HELP", "add_arguments", "main", "run"]
