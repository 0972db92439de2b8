"""Run op cases: every mode of every variant, memory, and ratios to the base matmul.

Also the default-backend check: the torch and compose backends vs PEFT LoRA vs the base nn.Linear, fwd+bwd,
M=2048, K=N=1024, r=16, float32, with its target checked on the CPU default backend's ratios of the same run.
"""
from __future__ import annotations

import sys

import torch

from ..ops.dispatch import DEFAULT_CPU
from .ops import OPS, Case, lora_case
from .timing import MODES, Timer, cuda_peak_bytes, saved_bytes, time_mode

CHECK_SHAPE = (2048, 1024, 1024)
CHECK_VARIANTS = ("base", "peft", "torch", "compose")
CHECK_TARGET = "the CPU default backend <= 1.10x base and < peft (fwd+bwd medians)"


def run_case(case: Case, device: torch.device, warmup: int, repeats: int, modes=MODES) -> dict:
    """Per variant: stats (ms) of each mode, saved bytes, CUDA peak; and time / base per mode."""
    timer = Timer(device)
    if case.grad_out is None:
        modes = ("fwd",)
    variants: dict[str, dict] = {name: {} for name in case.forwards}
    for mode in modes:
        for name, stats in time_mode(mode, case.forwards, case.grad_out, timer, warmup, repeats).items():
            variants[name][f"{mode}_ms"] = stats
    for name, forward in case.forwards.items():
        variants[name]["saved_for_backward_bytes"] = saved_bytes(forward, case.live) if case.grad_out is not None else None
        step = (lambda f=forward: f().backward(case.grad_out)) if case.grad_out is not None else forward
        variants[name]["cuda_peak_bytes"] = cuda_peak_bytes(step) if device.type == "cuda" else None
    base = variants.get("base", {})
    ratios = {name: {mode: row[f"{mode}_ms"]["median"] / base[f"{mode}_ms"]["median"]
                     for mode in modes if f"{mode}_ms" in row and f"{mode}_ms" in base}
              for name, row in variants.items()}
    for name, reason in case.skipped.items():
        variants[name] = {"skipped": reason}
    return {"variants": variants, "ratio_vs_base": ratios, "params": case.params}


def run_ops(ops: list[str], shapes: dict[str, list[tuple[int, int, int]]], device: torch.device,
            dtype: torch.dtype, warmup: int, repeats: int, skipped: list[dict]) -> list[dict]:
    """Every op at each of its shapes; skip reasons go to ``skipped`` too."""
    results = []
    for op in ops:
        for m, k, n in shapes[op]:
            torch.manual_seed(0)
            res = run_case(OPS[op](m, k, n, device, dtype), device, warmup, repeats)
            results.append({"op": op, "shape": {"M": m, "K": k, "N": n}, "dtype": str(dtype), **res})
            print(f"bench: {op} {m}x{k}x{n} done", file=sys.stderr, flush=True)
            skipped += [{"what": f"{op} {m}x{k}x{n} {v}", "reason": row["skipped"]}
                        for v, row in res["variants"].items() if "skipped" in row]
    return results


def run_default_backend_check(device: torch.device, warmup: int, repeats: int, judged: bool = True) -> dict:
    """The default-backend check: plain r=16 fwd+bwd in float32, base / PEFT / torch / compose, ratios of the same run;
    the target is judged on ``dispatch.DEFAULT_CPU``, the backend CPU tensors run by default (not in a smoke
    run, ``judged`` False: ``target_met`` None)."""
    torch.manual_seed(0)
    m, k, n = CHECK_SHAPE
    case = lora_case("plain", m, k, n, device, torch.float32)
    case.forwards = {v: case.forwards[v] for v in CHECK_VARIANTS}
    case.skipped = {}
    res = run_case(case, device, warmup, repeats, modes=("fwd+bwd",))
    ratio = {v: r["fwd+bwd"] for v, r in res["ratio_vs_base"].items()}
    fastest = {v: row["fwd+bwd_ms"]["min"] for v, row in res["variants"].items()}
    ratio_min = {v: t / fastest["base"] for v, t in fastest.items()}
    default = DEFAULT_CPU
    met = (ratio[default] <= 1.10 and ratio[default] < ratio["peft"]) if judged else None
    return {"shape": {"M": m, "K": k, "N": n}, "r": 16, "dtype": "torch.float32", "repeats": repeats,
            "default_backend": default,
            "variants": res["variants"], "ratio_vs_base": ratio, "ratio_of_min_vs_base": ratio_min,
            "target": CHECK_TARGET, "target_met": met}
