"""Benchmark the fused LoRA linear against cuBLAS and PEFT-style LoRA; write every figure as JSON.

GPU (the real run):   python bench/bench_fused_lora.py --out results/fused_lora_h100.json
CPU smoke test (CI):  python bench/bench_fused_lora.py --device cpu --quick --out /tmp/bench.json

For each (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)} and r in {8, 16, 64}
at M = 8192 tokens, bf16, it times (milliseconds, median):

  base            F.linear(x, W) (cuBLAS), forward and forward+backward (dx only, W frozen)
  peft            F.linear(x, W) + s * (dropout(x) A^T) B^T, the PEFT LoRA forward (two skinny matmuls)
  fused_plain     ops.lora_linear with one plain path of rank r (the Triton kernels on CUDA)
  fused_kron      one Kronecker path (d = 256) of rank r: the same effective rank as plain
  fused_gate      one gate path (m = n = 1024) of gate rank r: effective rank r

On CPU the fused kernels do not run (the Triton interpreter is far too slow to time): the backend
``ops.backend_for`` picks there runs instead, and its figures are named after it (``compose_plain_fwd_ms``,
``compose_plain_fwd_over_base``, ... where CUDA writes ``fused_...``; each row's ``backend`` says which).
CPU figures say nothing about the kernels; they only prove the script works.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from sharelora_kernels import ops
from sharelora_kernels.benchmarks.environment import describe
from sharelora_kernels.benchmarks.timing import step_timer
from sharelora_kernels.cli.options import out_file
from sharelora_kernels.cli.outputs import write_json
from sharelora_kernels.reference import LoRAPath

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)]
RANKS = [8, 16, 64]
KRON_DIM, GATE_DIM = 256, 1024


def make_paths(kind: str, k: int, n: int, r: int, dtype, device, kron_dim: int, gate_dim: int) -> list[LoRAPath]:
    """One path of ``kind`` with random (non-zero) trainable tensors."""
    t = lambda *s: (torch.randn(*s, dtype=dtype, device=device) * 0.02).requires_grad_()
    if kind == "plain":
        return [LoRAPath("plain", (t(r, k), t(n, r)), 2.0)]
    if kind == "kron":
        d = kron_dim
        return [LoRAPath("kron", (t(r, d), t(d, r), t(1, k // d), t(n // d, 1)), 2.0)]
    g, m = r, gate_dim  # gate rank r: effective rank r
    return [LoRAPath("gate", (t(r, m), t(m, r), t(g, k), t(m, g), t(g, m), t(n, g)), 2.0)]


def bench_shape(m: int, k: int, n: int, r: int, dtype, device: str, time_ms, kron_dim: int, gate_dim: int) -> dict:
    x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, device=device) * 0.02
    dy = torch.randn(m, n, dtype=dtype, device=device)
    row = {"M": m, "K": k, "N": n, "r": r, "flops_base_fwd": 2 * m * n * k}
    backend = "triton" if device == "cuda" else ops.backend_for(x)  # the fused kernels, not auto's choice
    ran = "fused" if backend == "triton" else backend  # the figures' name: what ran

    def both(name, forward, params):
        row[f"{name}_fwd_ms"] = time_ms(lambda: forward(), [])
        row[f"{name}_fwd_bwd_ms"] = time_ms(lambda: forward().backward(dy), [x, *params])

    both("base", lambda: F.linear(x, w), [])
    plain = make_paths("plain", k, n, r, dtype, device, kron_dim, gate_dim)[0]
    a, b = plain.tensors
    both("peft", lambda: F.linear(x, w) + plain.scale * F.linear(F.linear(x, a), b), [a, b])
    for kind in ("plain", "kron", "gate"):
        paths = make_paths(kind, k, n, r, dtype, device, kron_dim, gate_dim)
        both(f"{ran}_{kind}", lambda: ops.lora_linear(x, w, None, paths, backend=backend), list(paths[0].tensors))
    row["backend"] = backend
    row[f"{ran}_plain_fwd_over_base"] = row[f"{ran}_plain_fwd_ms"] / row["base_fwd_ms"]
    row[f"{ran}_plain_fwd_bwd_over_base"] = row[f"{ran}_plain_fwd_bwd_ms"] / row["base_fwd_bwd_ms"]
    row[f"{ran}_plain_fwd_bwd_over_peft"] = row[f"{ran}_plain_fwd_bwd_ms"] / row["peft_fwd_bwd_ms"]
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=out_file, required=True, help="path of the JSON file to write")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="one tiny shape and rank (smoke test)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu --quick for a smoke test")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.quick:
        m, shapes, ranks, kron_dim, gate_dim = 64, [(256, 128)], [8], 64, 64
    else:
        m, shapes, ranks, kron_dim, gate_dim = 8192, SHAPES, RANKS, KRON_DIM, GATE_DIM
    time_ms = step_timer(args.device)
    results = []
    for k, n in shapes:
        for r in ranks:
            results.append(bench_shape(m, k, n, r, dtype, args.device, time_ms, kron_dim, gate_dim))
            print(json.dumps(results[-1]), flush=True)
    env = describe(torch.device(args.device), sys.argv[1:] if argv is None else argv, prog="python bench/bench_fused_lora.py")
    report = {"environment": env, "dtype": str(dtype), "quick": args.quick, "results": results}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
