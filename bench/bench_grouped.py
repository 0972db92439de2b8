"""Benchmark share-group batching per transformer layer; write every figure as JSON.

GPU (the real run):   python bench/bench_grouped.py --out results/grouped_h100.json
CPU smoke test (CI):  python bench/bench_grouped.py --device cpu --quick --out /tmp/bench_grouped.json

Per layer of LLaMA-7B shapes (K = 4096; q, k, v: N = 4096; gate, up: N = 11008), bf16 base, fp32
Bi-Share slice adapters (local r=2 per module, intra r=4 per layer, inter r=32 for the model), at
M = 8192 tokens, forward + backward (milliseconds, median) and peak memory above the inputs (MiB):

  grouped     ops.grouped_lora_linear: q/k/v in one group, gate/up in another
  per_module  ops.lora_linear per module (the single-module fused kernels on CUDA)
  peft        F.linear + s * (x A^T) B^T per module, plain LoRA of the same total rank (38)

and ``shared_grads``: peak memory of a forward + backward through L layers (grouped q/k/v) whose
inter tensors are shared, for L in 1, 2, 4, 8: it should not grow with L beyond the activations.

On CPU only the torch reference path runs (the Triton interpreter is far too slow to time) and no
memory is measured: CPU figures only prove the script works.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from sharelora_kernels import ops
from sharelora_kernels.benchmarks.timing import cuda_peak_bytes, step_timer
from sharelora_kernels.benchmarks.environment import describe
from sharelora_kernels.cli.options import out_file
from sharelora_kernels.cli.outputs import write_json
from sharelora_kernels.reference import LoRAPath

FULL = dict(m=8192, k=4096, qkv=(4096, 4096, 4096), gate_up=(11008, 11008), layers=(1, 2, 4, 8), shared_m=2048)
QUICK = dict(m=64, k=256, qkv=(256, 64, 64), gate_up=(688, 688), layers=(1, 2), shared_m=32)
LOCAL_R, INTRA_R, INTER_R = 2, 4, 32


def adapter(*shape, device):
    return (torch.randn(*shape, device=device) * 0.02).requires_grad_()


def slice_paths(k: int, ns: tuple[int, ...], device, inter: tuple[torch.Tensor, torch.Tensor]) -> list[list[LoRAPath]]:
    """Bi-Share slice paths of one group: own local, the group's intra, the shared inter (centre windows)."""
    n_max = max(ns)
    intra = (adapter(INTRA_R, k, device=device), adapter(n_max, INTRA_R, device=device))
    return [[LoRAPath("plain", (adapter(LOCAL_R, k, device=device), adapter(n, LOCAL_R, device=device)), 1.0),
             LoRAPath("slice", intra, 1.0, 0, (n_max - n) // 2),
             LoRAPath("slice", inter, 1.0, 0, (inter[1].shape[0] - n) // 2)] for n in ns]


def make_layer(cfg: dict, device, dtype, inter):
    groups = []
    for ns in (cfg["qkv"], cfg["gate_up"]):
        weights = [torch.randn(n, cfg["k"], device=device, dtype=dtype) * 0.02 for n in ns]
        groups.append((weights, slice_paths(cfg["k"], ns, device, inter)))
    return groups


def params_of(groups) -> list[torch.Tensor]:
    return list({id(t): t for _, paths in groups for ps in paths for p in ps for t in p.tensors}.values())


def fused_backend(x) -> str:
    """The fused kernels on CUDA (not auto's choice); the default backend elsewhere (a smoke run)."""
    return "triton" if x.is_cuda else ops.backend_for(x)


def run_grouped(x, groups):
    return [y for weights, paths in groups
            for y in ops.grouped_lora_linear(x, weights, [None] * len(weights), paths, backend=fused_backend(x))]


def run_per_module(x, groups):
    return [ops.lora_linear(x, w, None, ps, backend=fused_backend(x)) for weights, paths in groups
            for w, ps in zip(weights, paths)]


def peft_layer(cfg: dict, device, dtype):
    r = LOCAL_R + INTRA_R + INTER_R
    groups = []
    for ns in (cfg["qkv"], cfg["gate_up"]):
        weights = [torch.randn(n, cfg["k"], device=device, dtype=dtype) * 0.02 for n in ns]
        groups.append((weights, [[LoRAPath("plain", (adapter(r, cfg["k"], device=device), adapter(n, r, device=device)), 1.0)]
                                 for n in ns]))
    return groups


def run_peft(x, groups):
    """PEFT's LoRA forward: base matmul plus two skinny matmuls in the adapter dtype."""
    outs = []
    for weights, paths in groups:
        for w, (p,) in zip(weights, paths):
            a, b = p.tensors
            outs.append(F.linear(x, w) + (F.linear(F.linear(x.float(), a), b) * p.scale).to(x.dtype))
    return outs


def fwd_bwd(run, x, groups):
    def step():
        outs = run(x, groups)
        torch.autograd.backward(outs, [torch.ones_like(y) for y in outs])
    return step


def peak_mib(fn, device: str) -> float | None:
    """Peak memory above what was allocated before ``fn`` (CUDA only)."""
    return cuda_peak_bytes(fn) / 2**20 if device == "cuda" else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--out", type=out_file, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    device, dtype = args.device, torch.bfloat16
    time_ms = step_timer(device)
    torch.manual_seed(0)
    inter_n = max(cfg["gate_up"])
    inter = (adapter(INTER_R, cfg["k"], device=device), adapter(inter_n, INTER_R, device=device))
    x = torch.randn(cfg["m"], cfg["k"], device=device, dtype=dtype, requires_grad=True)

    layer, peft = make_layer(cfg, device, dtype, inter), peft_layer(cfg, device, dtype)
    per_layer = {}
    for name, run, groups in (("grouped", run_grouped, layer), ("per_module", run_per_module, layer),
                              ("peft", run_peft, peft)):
        step = fwd_bwd(run, x, groups)
        params = params_of(groups) + [x]
        per_layer[name] = {"fwd_bwd_ms": time_ms(step, params), "peak_mib": peak_mib(step, device)}

    shared = {}
    xs = torch.randn(cfg["shared_m"], cfg["k"], device=device, dtype=dtype, requires_grad=True)
    for num_layers in cfg["layers"]:
        layers = [make_layer(cfg, device, dtype, inter)[:1] for _ in range(num_layers)]  # q/k/v groups

        def step(layers=layers):
            outs = [y for groups in layers for y in run_grouped(xs, groups)]
            torch.autograd.backward(outs, [torch.ones_like(y) for y in outs])

        step()
        shared[num_layers] = {"peak_mib": peak_mib(step, device),
                              "inter_grad_mib": sum(t.numel() * 4 for t in inter) / 2**20}

    result = {"environment": describe(torch.device(device), sys.argv[1:] if argv is None else argv,
                                     prog="python bench/bench_grouped.py"),
              "config": {**cfg, "dtype": str(dtype), "ranks": [LOCAL_R, INTRA_R, INTER_R],
                         "backend": fused_backend(x)},
              "per_layer": per_layer, "shared_grads_vs_layers": shared}
    write_json(args.out, result, indent=2)
    return result


if __name__ == "__main__":
    main()
