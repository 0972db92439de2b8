"""QLoRA comparison: a 4-bit (nf4) LLaMA-shaped layer stack with shared adapters vs PEFT's QLoRA on the same base.

    python -m sharelora_kernels.benchmarks.qlora [--device cpu|cuda] [--quick] [--out DIR]

The base is a random-weight ``LlamaForCausalLM`` (sizes: ``e2e.MODEL_SIZES``) saved once and loaded
through Transformers' bitsandbytes integration as nf4 for every variant (the same 4-bit weights),
then ``peft.prepare_model_for_kbit_training`` (without checkpointing). Compute dtype float32 on the
CPU; bfloat16 on CUDA, where the steps run under ``torch.autocast(bfloat16)`` as ``Trainer(bf16=True)``
runs them. Variants, targets q, k, v, up, down:

  peft_qlora  PEFT ``LoraConfig(r=8, lora_alpha=16)``: what a QLoRA user runs today
  lora        ``apply(method="lora", r=8)``: the same adapters on our low-rank-only op
  sharelora   ``apply(method="similarity", r=8)``, the top half of the layers in one share set
  bishare     ``apply(method="bishare")``: Slice Sharing at the paper's ranks

One step is forward + loss + backward + AdamW step + zero_grad on a fixed random batch; the variants
are timed round-robin in one process. Reported per variant: step time (ms, median and spread;
on the CPU also the process's CPU time per step, which other load disturbs far less with
``--threads 1``), tokens/s, trainable parameters, AdamW state bytes, and the peak memory of one step, in all and
above what was in use before it: CUDA ``max_memory_allocated``; on the CPU the process's peak
resident set (VmHWM, reset through ``/proc/self/clear_refs``), each variant in a fresh process
(``--memory-of VARIANT``) so that one variant's freed memory cannot hide another's.
``merge_rounding``: after the timed steps (lr 1e-3), how much the logits of a held-out batch move
when ``sharelora``'s adapters are merged into the 4-bit weights (requantized), next to how much
the adapters moved them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..files import atomic_write
from ..config import ShareLoRAConfig
from ..model import apply, merge
from .e2e import MODEL_SIZES, TARGETS, peft_lora
from .environment import describe, device_label, loadavg
from .timing import Timer, cuda_peak_bytes, interleaved, summarize

VARIANTS = ("peft_qlora", "lora", "sharelora", "bishare")
REPEATS = {"quick": (1, 3), "cpu": (2, 10), "cuda": (3, 20)}  # (warm-up, timed) steps per variant
PROG = "python -m sharelora_kernels.benchmarks.qlora"
R = 8


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def save_base(profile: str, directory: Path) -> dict:
    """Save the random LLaMA of ``profile`` into ``directory``; returns its sizes (batch and seq included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(MODEL_SIZES[profile])
    batch, seq = size.pop("batch"), size.pop("seq")
    config = LlamaConfig(**size, num_key_value_heads=size["num_attention_heads"], max_position_embeddings=seq)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return {**size, "num_key_value_heads": size["num_attention_heads"], "batch": batch, "seq": seq}


def quantized_base(directory: Path, device: torch.device) -> nn.Module:
    """The saved LLaMA in nf4 on ``device`` (compute dtype per device), prepared for k-bit training."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(device)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization_config=quant,
                                                 device_map={"": str(device)})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).train()


def build(variant: str, base: nn.Module, num_layers: int) -> nn.Module:
    """``variant`` (one of VARIANTS) on ``base``, in place."""
    if variant == "peft_qlora":
        return peft_lora(base, R)
    share_set = list(range(num_layers - max(2, num_layers // 2), num_layers))
    configs = {"lora": dict(method="lora", r=R),
               "sharelora": dict(method="similarity", r=R, share_sets=[share_set]),
               "bishare": dict(method="bishare")}
    return apply(base, ShareLoRAConfig(alpha=2 * R, target_modules=TARGETS, **configs[variant]))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the norms are float32 after k-bit preparation), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train_step(model: nn.Module, tokens: torch.Tensor,
               lr: float = 1e-3) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """One AdamW training step on ``tokens`` (labels = tokens)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        with autocast(tokens.device):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def tokens_for(model_size: dict, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (model_size["batch"], model_size["seq"])
    return torch.randint(0, model_size["vocab_size"], shape, generator=gen).to(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def step_peak(step: Callable[[], None], device: torch.device) -> dict[str, int | None]:
    """Peak memory during one ``step``: in all (``peak_bytes``: CUDA allocated, or the process's
    resident set on the CPU) and above what was in use before it (``step_peak_bytes``)."""
    if device.type == "cuda":
        above = cuda_peak_bytes(step)
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "step_peak_bytes": above}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        before = _status_kib("VmRSS")
        step()
        peak = _status_kib("VmHWM")
        return {"peak_bytes": peak * 1024, "step_peak_bytes": (peak - before) * 1024}
    except OSError:  # not Linux: no resident-set peak to read
        return {"peak_bytes": None, "step_peak_bytes": None}


def memory_of(variant: str, directory: Path, model_size: dict, device: torch.device) -> dict:
    """In this process: build ``variant``, take two warm-up steps, then the peaks of one step."""
    model = build(variant, quantized_base(directory, device), model_size["num_hidden_layers"])
    step, _ = train_step(model, tokens_for(model_size, device))
    step()
    step()
    return step_peak(step, device)


def _memory_in_subprocess(variant: str, directory: Path, model_size: dict, device: torch.device) -> dict:
    cmd = [sys.executable, "-m", "sharelora_kernels.benchmarks.qlora", "--memory-of", variant, "--model-dir",
           str(directory), "--model-size", json.dumps(model_size), "--device", str(device),
           "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def merge_rounding(model: nn.Module, base_logits: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Relative (max-abs) change of the logits that the adapters make, and that merging them into the
    4-bit weights makes on top of that (``merge`` requantizes)."""
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    with autocast(tokens.device):
        unmerged = model(tokens).logits
        merge(model)
        merged = model(tokens).logits
    return {"adapters_vs_base": rel(unmerged, base_logits), "merged_vs_unmerged": rel(merged, unmerged)}


def run(profile: str, device: torch.device, variants: list[str], measure_memory: bool, argv: list[str]) -> dict:
    """Time every variant round-robin, then memory per variant and the merge rounding; the results dict."""
    warmup, repeats = REPEATS[profile]
    env = describe(device, argv, prog=PROG)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        size = save_base(profile, directory)
        base_logits = None
        models = {}
        for name in variants:
            models[name] = build(name, quantized_base(directory, device), size["num_hidden_layers"])
        held_out = tokens_for(size, device, seed=1)
        if "sharelora" in models:
            with torch.no_grad(), autocast(device):
                base_logits = models["sharelora"](held_out).logits
        tokens = tokens_for(size, device)
        steps = {name: train_step(model, tokens) for name, model in models.items()}
        timer = Timer(device)
        cpu_ms: dict[str, list[float]] = {name: [] for name in steps}

        def timed(name: str, step: Callable[[], None]) -> float:
            start = time.process_time()
            ms = timer.time(step)
            cpu_ms[name].append((time.process_time() - start) * 1e3)
            return ms

        timings = interleaved({name: (lambda n=name, s=step: timed(n, s)) for name, (step, _) in steps.items()},
                              warmup, repeats)
        out = {}
        for name, model in models.items():
            stats = timings[name]
            out[name] = {"step_ms": stats, "tokens_per_s": size["batch"] * size["seq"] / (stats["median"] / 1e3),
                         "step_cpu_ms": summarize(cpu_ms[name][warmup:]) if device.type == "cpu" else None,
                         "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "optimizer_state_bytes": optimizer_state_bytes(steps[name][1])}
        rounding = merge_rounding(models["sharelora"], base_logits, held_out) if base_logits is not None else None
        del models, steps
        if measure_memory:
            for name in variants:
                out[name].update(_memory_in_subprocess(name, directory, size, device))
    env["loadavg_after"] = loadavg()
    return {"environment": env, "model": {**size, "quantization": "nf4", "compute_dtype": str(compute_dtype(device)),
                                          "targets": TARGETS, "optimizer": "AdamW(lr=1e-3)", "warmup": warmup,
                                          "repeats": repeats},
            "units": {"step_ms": "milliseconds (median, q1, q3, min, max over n steps)", "*_bytes": "bytes",
                      "merge_rounding": "max |difference| / max |reference| of the held-out logits"},
            "variants": out, "merge_rounding": rounding}


def markdown(results: dict) -> str:
    """The results as a markdown table."""
    env, model = results["environment"], results["model"]
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"
    lines = [f"# QLoRA comparison ({env['device_name']}, {env['date']})", "",
             f"`{env['command']}`; torch {env['torch']}; nf4 LLaMA, hidden {model['hidden_size']}, MLP "
             f"{model['intermediate_size']}, {model['num_hidden_layers']} layers, batch {model['batch']} x seq "
             f"{model['seq']}, compute {model['compute_dtype']}; {env['torch_threads']} torch threads; load average "
             f"{env['loadavg_before']} -> {env['loadavg_after']}.", "",
             "| variant | step ms: median [q1, q3] | min | CPU time ms: median [q1, q3] | tokens/s | trainable params | "
             "AdamW state MiB | peak MiB | step peak above resident MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in results["variants"].items():
        s = row["step_ms"]
        c = row.get("step_cpu_ms")
        cpu = f"{c['median']:.1f} [{c['q1']:.1f}, {c['q3']:.1f}]" if c else "n/a"
        lines.append(f"| {name} | {s['median']:.1f} [{s['q1']:.1f}, {s['q3']:.1f}] | {s['min']:.1f} | {cpu} | "
                     f"{row['tokens_per_s']:.0f} | {row['trainable_params']:,} | {mib(row['optimizer_state_bytes'])} | "
                     f"{mib(row.get('peak_bytes'))} | {mib(row.get('step_peak_bytes'))} |")
    if results["merge_rounding"]:
        r = results["merge_rounding"]
        lines += ["", f"Merging `sharelora` into the nf4 weights: the adapters move the held-out logits by "
                      f"{r['adapters_vs_base']:.3g} (relative), merging moves them by another "
                      f"{r['merged_vs_unmerged']:.3g}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(argv) if argv is not None else sys.argv[1:]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (a smoke run)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 makes the CPU time of a step robust to other load")
    p.add_argument("--out", type=Path, default=None, help="output folder (default ./sharelora-bench/qlora-<device>-<date>)")
    p.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one memory run
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is an existing file, not a folder")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _run_command(args, variants, argv)
    finally:
        torch.set_num_threads(threads)  # main() called from Python leaves the process as it was


def _run_command(args: argparse.Namespace, variants: list[str], argv: list[str]) -> dict:
    device = torch.device(args.device)
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args.model_dir, json.loads(args.model_size), device)))
        return {}
    results = run("quick" if args.quick else device.type, device, variants, not args.no_memory, argv)
    out = args.out or Path("sharelora-bench") / f"qlora-{device_label(device)}-{results['environment']['date']}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "qlora.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1) + "\n"))
    atomic_write(out / "qlora.md", lambda tmp: Path(tmp).write_text(markdown(results)))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
