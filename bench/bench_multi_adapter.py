"""Benchmark many adapters in one batch (``ops.multi_adapter``) at the op level; write every figure as JSON.

CPU (tiny model):        python bench/bench_multi_adapter.py --device cpu --out /tmp/multi_adapter_cpu.json
smoke run (seconds):     python bench/bench_multi_adapter.py --device cpu --quick --out /tmp/multi_adapter.json
GPU (the Triton kernels): python bench/bench_multi_adapter.py --device cuda --out multi_adapter_gpu.json

Shapes: the built-in tiny model's targets (hidden 128, MLP 256, 2 KV heads of 32: q 128->128,
k/v 128->64, up 128->256, down 256->128) over its 10 layers (2 with --quick), base weights in the
run's dtype (float32 on the CPU, bfloat16 on CUDA), float32 adapters. A batch of 64 rows, row i
using adapter i mod n for n in 1, 8, 64 distinct adapters; prefill (64 rows x --tokens tokens) and
decode (64 rows x 1 token). Per-batch metadata and per-module adapter tables are built once,
outside the timings (``metadata_ms``: building the batch metadata once).

Methods (every adapter of a run has the same method and ranks):
  lora           plain LoRA r=8 per module
  sharelora      similarity ShareLoRA: layers (0,1), (2,3), ... share A and B per module type, r=8
  bishare_kron   Bi-Share Kronecker (2, 4, 16), d=64: local plain r=2, intra per layer, inter per model

Variants, the forward of every target module of every layer (milliseconds, median on CUDA):
  ours           the base GEMM once for the batch, then ``multi_adapter_add`` (one call per module)
  per_adapter    each adapter's rows run separately: ``ops.lora_linear`` on the rows of one adapter
                 (its own base GEMM), scattered back: serving without mixed batches
  peft_masked    PEFT's mixed-batch loop: the base GEMM once, then for each adapter
                 ``y[rows] += s (x[rows] A^T) B^T`` with the adapter exported to plain LoRA (dense
                 per-module factors of rank sum r_p)

and bytes per adapter: its unique tensors (ours: a shared tensor once), and the exported plain
LoRA's (what PEFT / vLLM load). Ratios are against ``ours`` in the same run.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from sharelora_kernels import ops
from sharelora_kernels.benchmarks.environment import describe
from sharelora_kernels.benchmarks.timing import step_timer
from sharelora_kernels.cli.options import out_file, positive_int
from sharelora_kernels.cli.outputs import write_json
from sharelora_kernels.ops.multi_adapter import adapter_batch, adapter_tables, multi_adapter_add
from sharelora_kernels.reference import LoRAPath, path_factors

HIDDEN, MLP, KV = 128, 256, 64
MODULES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "up": (HIDDEN, MLP), "down": (MLP, HIDDEN)}
ROWS, COUNTS, KRON_D = 64, (1, 8, 64), 64
FULL = dict(layers=10, tokens=32)
QUICK = dict(layers=2, tokens=4)


def _t(*shape, device):
    return torch.randn(*shape, device=device) * 0.05


def make_adapter(method: str, layers: int, device) -> dict[tuple[int, str], list[LoRAPath]]:
    """One adapter: its paths per (layer, module)."""
    paths = {}
    if method == "lora":
        for layer in range(layers):
            for name, (k, n) in MODULES.items():
                paths[layer, name] = [LoRAPath("plain", (_t(8, k, device=device), _t(n, 8, device=device)), 2.0)]
    elif method == "sharelora":
        for name, (k, n) in MODULES.items():
            for first in range(0, layers, 2):
                pair = (_t(8, k, device=device), _t(n, 8, device=device))
                for layer in range(first, min(first + 2, layers)):
                    paths[layer, name] = [LoRAPath("plain", pair, 2.0)]
    else:  # bishare_kron: local r=2, intra r=4 per layer, inter r=16 per model; own K_A / K_B per module
        inter = (_t(16, KRON_D, device=device), _t(KRON_D, 16, device=device))
        for layer in range(layers):
            intra = (_t(4, KRON_D, device=device), _t(KRON_D, 4, device=device))
            for name, (k, n) in MODULES.items():
                kernels = lambda: (_t(1, k // KRON_D, device=device), _t(n // KRON_D, 1, device=device))
                paths[layer, name] = [LoRAPath("plain", (_t(2, k, device=device), _t(n, 2, device=device)), 1.0),
                                      LoRAPath("kron", (*intra, *kernels()), 0.5),
                                      LoRAPath("kron", (*inter, *kernels()), 0.25)]
    return paths


def exported(paths: list[LoRAPath], k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter as one plain LoRA (A (R, K), B (N, R) with the scales folded in): what PEFT serves."""
    factors = [path_factors(p, k, n) for p in paths]
    return torch.cat([a for a, _ in factors]), torch.cat([b * p.scale for (_, b), p in zip(factors, paths)], 1)


def unique_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def build(method: str, n: int, layers: int, device, dtype):
    """Base weights, the n adapters' per-module tables, exports and byte counts."""
    adapters = [make_adapter(method, layers, device) for _ in range(n)]
    modules = []
    for layer in range(layers):
        for name, (k, nn_) in MODULES.items():
            paths = [a[layer, name] for a in adapters]
            modules.append(dict(weight=_t(nn_, k, device=device).to(dtype), paths=paths,
                                tables=adapter_tables(paths, k, nn_), export=[exported(p, k, nn_) for p in paths]))
    own = unique_bytes(t for p in adapters[0].values() for q in p for t in q.tensors)
    export = sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                 for a, b in (m["export"][0] for m in modules))
    return modules, own, export


def run_ours(xs, modules, batch, use_triton):
    return [multi_adapter_add(F.linear(xs[m["weight"].shape[1]], m["weight"]), xs[m["weight"].shape[1]], batch,
                              m["tables"], use_triton=use_triton) for m in modules]


def run_per_adapter(xs, modules, groups):
    outs = []
    for m in modules:
        x = xs[m["weight"].shape[1]]
        y = x.new_empty(x.shape[0], m["weight"].shape[0])
        for a, rows in groups:
            y[rows] = ops.lora_linear(x[rows], m["weight"], None, m["paths"][a])
        outs.append(y)
    return outs


def run_peft_masked(xs, modules, groups):
    outs = []
    for m in modules:
        x = xs[m["weight"].shape[1]]
        y = F.linear(x, m["weight"])
        for a, rows in groups:
            lora_a, lora_b = m["export"][a]
            y[rows] += ((x[rows].to(lora_a.dtype) @ lora_a.t()) @ lora_b.t()).to(y.dtype)
        outs.append(y)
    return outs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="2 layers, 4 prefill tokens per row (smoke test)")
    parser.add_argument("--tokens", type=positive_int, help="prefill tokens per row (default 32; 4 with --quick)")
    parser.add_argument("--methods", default="lora,sharelora,bishare_kron", help="comma-separated subset")
    parser.add_argument("--out", type=out_file, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["tokens"] = args.tokens or cfg["tokens"]
    methods = args.methods.split(",")
    unknown = set(methods) - {"lora", "sharelora", "bishare_kron"}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)} (lora, sharelora, bishare_kron)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    use_triton = device.type == "cuda"
    time_ms = step_timer(device.type)
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for method in methods:
            for n in COUNTS:
                modules, own_bytes, export_bytes = build(method, n, cfg["layers"], device, dtype)
                row_adapters = [i % n for i in range(ROWS)]
                for phase, tokens in (("prefill", cfg["tokens"]), ("decode", 1)):
                    start = time.perf_counter()
                    batch = adapter_batch(row_adapters, n, tokens, device=device)
                    metadata_ms = (time.perf_counter() - start) * 1e3
                    groups = [(a, batch.order[s:s + c]) for a, s, c in batch.segments]
                    xs = {k: torch.randn(ROWS * tokens, k, device=device, dtype=dtype) for k in (HIDDEN, MLP)}
                    ms = {"ours": time_ms(lambda: run_ours(xs, modules, batch, use_triton), []),
                          "per_adapter": time_ms(lambda: run_per_adapter(xs, modules, groups), []),
                          "peft_masked": time_ms(lambda: run_peft_masked(xs, modules, groups), [])}
                    results.append({"method": method, "phase": phase, "adapters": n, "tokens": ROWS * tokens,
                                    "ms": ms, "vs_ours": {k: v / ms["ours"] for k, v in ms.items()},
                                    "metadata_ms": metadata_ms, "bytes_per_adapter": own_bytes,
                                    "bytes_per_adapter_exported": export_bytes})
                    r = results[-1]
                    print(f"{method:13s} {phase:7s} {n:3d} adapters: ours {ms['ours']:8.2f} ms, per-adapter "
                          f"{r['vs_ours']['per_adapter']:5.2f}x, PEFT-masked {r['vs_ours']['peft_masked']:5.2f}x; "
                          f"{own_bytes / 1024:.1f} KiB per adapter ({export_bytes / 1024:.1f} KiB exported)")
    result = {"environment": describe(device, sys.argv[1:] if argv is None else argv,
                                     prog="python bench/bench_multi_adapter.py"),
              "config": {**cfg, "rows": ROWS, "dtype": str(dtype), "backend": "triton" if use_triton else "torch",
                         "modules": MODULES, "smoke_run": args.quick},
              "results": results}
    write_json(args.out, result)  # through a temporary file and a rename
    return result


if __name__ == "__main__":
    main()
