"""The torch and compose backends against the base matmul on the CPU: what chose the CPU default.

    python bench/bench_compose_cpu.py --out bench/results/cpu-compose.json [--repeats 40]

Plain LoRA r=16, M=2048, K=N=1024, fwd+bwd (x requires grad), three settings: a float32 layer, a
bf16 layer with fp32 adapters (``apply``'s default on a bf16 model), and a float32 layer under
``torch.autocast("cpu", torch.bfloat16)``. Per setting, base / torch / compose are timed
interleaved (``benchmarks.timing``); medians and their ratios to base go to the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

from sharelora_kernels import ops
from sharelora_kernels.benchmarks.environment import describe, loadavg
from sharelora_kernels.benchmarks.ops import plain_paths
from sharelora_kernels.benchmarks.timing import Timer, time_mode
from sharelora_kernels.cli.options import out_file, positive_int
from sharelora_kernels.cli.outputs import write_json

SHAPE = (2048, 1024, 1024)
SETTINGS = {"float32": (torch.float32, False), "bf16 base, fp32 adapters": (torch.bfloat16, False),
            "float32 under bf16 autocast": (torch.float32, True)}


def setting(dtype: torch.dtype, autocast: bool, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    m, k, n = SHAPE
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    weight, bias = (torch.randn(n, k) / k ** 0.5).to(dtype), torch.randn(n).to(dtype)
    paths = plain_paths(k, n, "cpu", torch.float32)
    grad_out = torch.randn(m, n, dtype=torch.bfloat16 if autocast else dtype)

    def under_autocast(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                return fn()
        return run

    forwards = {"base": under_autocast(lambda: F.linear(x, weight, bias))}
    for backend in ("torch", "compose"):
        forwards[backend] = under_autocast(lambda b=backend: ops.lora_linear(x, weight, bias, paths, backend=b))
    stats = time_mode("fwd+bwd", forwards, grad_out, Timer(torch.device("cpu")), warmup, repeats)
    return {"fwd+bwd_ms": stats, "ratio_vs_base": {v: s["median"] / stats["base"]["median"] for v, s in stats.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=out_file, required=True, help="JSON file to write")
    parser.add_argument("--repeats", type=positive_int, default=40)
    parser.add_argument("--warmup", type=positive_int, default=3)
    args = parser.parse_args(argv)
    env = describe(torch.device("cpu"), sys.argv[1:] if argv is None else argv, prog="python bench/bench_compose_cpu.py")
    results = {name: setting(dtype, autocast, args.warmup, args.repeats) for name, (dtype, autocast) in SETTINGS.items()}
    env["loadavg_after"] = loadavg()
    report = {"environment": env, "shape": dict(zip("MKN", SHAPE)), "r": 16, "results": results}
    write_json(args.out, report)
    for name, row in results.items():
        print(name, {v: round(r, 3) for v, r in row["ratio_vs_base"].items()})
    return report


if __name__ == "__main__":
    main()
