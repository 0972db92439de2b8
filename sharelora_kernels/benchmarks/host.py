"""bench --host: the host time of one layer call (Python, dispatcher, autograd), at tiny shapes on the CPU.

Below ~0.3 ms of device work per call a step is host-bound, so what the host spends issuing a
layer's ops decides whether it beats PEFT. At M=8, K=N=64 (one thread) the arithmetic is
negligible and the time of a call is its host time. Variants, on the same x:

    linear       the frozen base alone (nn.Linear; the Linear4bit itself for the 4-bit case)
    peft         PEFT's LoRA layer (lora.Linear / lora.Linear4bit), r=8, of the same base, called
                 itself as a model calls it (not through a PeftModel, whose forward a model pays once)
    torch        our layer on the torch backend
    compose      our layer on compose (the CPU default)
    triton_stub  our layer on triton with every kernel launch replaced by a no-op: the launchers'
                 host work without the interpreter or a GPU (its outputs are garbage, untimed)

Layer kinds: plain r=8; one slice, gate or Kronecker path; a 3-path Bi-Share module (plain r=2, and
r=4 and r=32 parts of shared tensors) of each shape transform: slices (``bishare3``), gates
(``bishare3_gate``), Kronecker factors (``bishare3_kron``); q/k/v of one input as an input group;
plain r=8 on a bitsandbytes 4-bit base (when bitsandbytes is installed), computing in float32, and
as QLoRA runs it (``4bit_qlora``: nf4 computing in bf16, dropout 0.05, bf16 autocast, x in
float32); plain r=8 with fp32 adapters under bf16 autocast (what a Trainer with ``bf16=True``
runs) on a bf16 base, x in bf16 (``bf16_autocast``), and on a float32 base, x in float32
(``fp32_autocast``: the base cast every call, as autocast casts it). Modes: ``fwd_nograd`` (under
torch.no_grad), ``fwd`` (x and the adapters require grad), ``fwd+bwd``. Plus one training step
(forward, loss, backward, AdamW, zero_grad) of a tiny LLaMA (hidden 64, 4 layers, every
q/k/v/o/gate/up/down, r=8, batch 2 x 32): ours (lora, similarity, and Bi-Share of each shape
transform at its default ranks) against PEFT's LoRA.

Variants run interleaved (each round times every variant once), each sample the mean of a burst
of calls in CPU time of this process (``time.process_time``: what other processes on a shared
machine run is not counted, their cache and memory traffic still is); figures are medians in
microseconds per call, and ratios to PEFT of the same run.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .. import ops
from ..layer import AdapterStore, LoRAPathModule, SharedLoRALinear
from ..config import PATH_ROLES
from ..plan import PathSpec, TensorSpec
from ..reference import LoRAPath
from .ops import bishare_paths, gate_paths, kron_paths, peft_layer, plain_paths, slice_paths

M, K, N, R = 8, 64, 64, 8
MODES = ("fwd_nograd", "fwd", "fwd+bwd")
VARIANTS = ("linear", "peft", "torch", "compose", "triton_stub")
KINDS = ("plain", "slice", "gate", "kron", "bishare3", "bishare3_gate", "bishare3_kron", "grouped_qkv", "4bit",
         "4bit_qlora", "bf16_autocast", "fp32_autocast")
AUTOCAST_KINDS = ("4bit_qlora", "bf16_autocast", "fp32_autocast")  # run under bf16 autocast
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- stubbed launches
@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel launch is a no-op inside the block (and the kernels' CPU guard lifted):
    what remains of a triton call is its host work."""
    import triton.runtime.jit as jit

    from ..ops import autotune, utils

    noop = lambda *args, **kwargs: None  # noqa: E731
    saved = (jit.KernelInterface.__getitem__, autotune.TunedKernel.__getitem__, utils.INTERPRET)
    jit.KernelInterface.__getitem__ = lambda self, grid: noop
    autotune.TunedKernel.__getitem__ = lambda self, grid: noop
    utils.INTERPRET = True  # check_kernel_device: the kernels' CPU guard lifted
    try:
        yield
    finally:
        jit.KernelInterface.__getitem__, autotune.TunedKernel.__getitem__, utils.INTERPRET = saved


# ----------------------------------------------------------------------------- layers
def layer_with_paths(base: nn.Module, paths: list[LoRAPath]) -> SharedLoRALinear:
    """A SharedLoRALinear computing ``paths`` (their tensors moved into its own store)."""
    params, specs, path_specs = {}, {}, []
    for i, p in enumerate(paths):
        names = {}
        for role, t in zip(PATH_ROLES[p.kind], p.tensors):
            name = next((n for n, q in params.items() if q is t), f"p{i}.{role}")
            params[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach())
            specs[name] = TensorSpec(name, tuple(t.shape), "zeros", "lora")
            names[role] = name
        path_specs.append(PathSpec(p.kind, "lora", names, p.scale, p.rank, p.k_offset, p.n_offset))
    store = AdapterStore(params, specs)
    layer = SharedLoRALinear(base, [LoRAPathModule(s, store) for s in path_specs])
    layer.bench_store = store  # owned here (a model's store sits on its root)
    return layer


PATHS = {"plain": lambda: plain_paths(K, N, "cpu", torch.float32, r=R),
         "slice": lambda: slice_paths(K, N, "cpu", torch.float32, r=R),
         "gate": lambda: gate_paths(K, N, "cpu", torch.float32),
         "kron": lambda: kron_paths(K, N, "cpu", torch.float32, r=R),
         "bishare3": lambda: bishare_paths(K, N, "cpu", torch.float32, "slice"),
         "bishare3_gate": lambda: bishare_paths(K, N, "cpu", torch.float32, "gate"),
         "bishare3_kron": lambda: bishare_paths(K, N, "cpu", torch.float32, "kron")}


def _base(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(K, N).requires_grad_(False)


def _peft(base: nn.Module) -> nn.Module:
    return peft_layer(base.weight.detach(), base.bias.detach(), R)


def kind_calls(kind: str) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, str]]:
    """variant -> call(x) of one layer kind, and the variants skipped with their reason."""
    if kind == "4bit":
        return _4bit_calls(torch.float32, 0.0)
    if kind == "4bit_qlora":
        return _4bit_calls(torch.bfloat16, 0.05)
    if kind == "grouped_qkv":
        return _grouped_calls()
    base = _base(0)
    if kind in ("bf16_autocast", "fp32_autocast"):  # fp32 adapters (PEFT's default under autocast), bf16 autocast
        if kind == "bf16_autocast":  # a bf16 base; fp32_autocast: a float32 base, cast every call
            base = base.to(torch.bfloat16)
        return {"linear": base, "peft": _peft(base), "ours": layer_with_paths(copy.deepcopy(base), PATHS["plain"]())}, {}
    ours = layer_with_paths(copy.deepcopy(base), PATHS[kind]())
    peft = _peft(base)
    return {"linear": base, "peft": peft, "ours": ours}, {}


def _grouped_calls():
    from ..grouping import InputGroup

    bases = [_base(i) for i in range(3)]
    layers = [SharedLoRALinear(copy.deepcopy(b), r=R, alpha=2 * R) for b in bases]
    for layer in layers:
        nn.init.normal_(layer.lora_paths[0].B, std=0.02)
    group = InputGroup(layers)
    for layer in layers:
        layer.input_group = group
    pefts = [_peft(b) for b in bases]
    return ({"linear": lambda x: [b(x) for b in bases], "peft": lambda x: [p(x) for p in pefts],
             "ours": lambda x: [layer(x) for layer in layers]}, {})


def _4bit_calls(compute_dtype: torch.dtype, dropout: float):
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        return {}, {v: f"bitsandbytes or peft is not installed ({e})" for v in VARIANTS}
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    dense = _base(0)

    def quantized():
        q = bnb.nn.Linear4bit(K, N, compute_dtype=compute_dtype, quant_type="nf4")
        q.load_state_dict(dense.state_dict())
        return q.to("cpu").train()

    base = quantized().requires_grad_(False)  # frozen, as the base of a LoRA layer is
    ours = SharedLoRALinear(quantized(), r=R, alpha=2 * R, dropout=dropout).train()
    nn.init.normal_(ours.lora_paths[0].B, std=0.02)
    holder = nn.Sequential()
    holder.add_module("lin", quantized())
    peft = get_peft_model(holder, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=dropout,
                                             target_modules=["lin"])).train().base_model.model.lin
    return {"linear": base, "peft": peft, "ours": ours}, {}


# ----------------------------------------------------------------------------- timing
def _step(call, mode: str, x: torch.Tensor) -> Callable[[], None]:
    if mode == "fwd_nograd":
        def run():
            with torch.no_grad():
                call(x)
        return run
    if mode == "fwd":
        return lambda: call(x)

    def run():
        out = call(x)
        outs = out if isinstance(out, list) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


Run = Callable[[], None]


def _time_us(run: Run, burst: int, context: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Microseconds per call of a burst of ``run`` inside ``context()``, after one untimed call there
    (a layer whose backend just changed builds its call plan in it)."""
    with context():
        run()
        t0 = time.process_time()
        for _ in range(burst):
            run()
        return (time.process_time() - t0) / burst * 1e6


def interleaved_us(runs: dict[str, tuple[Callable, Run]], rounds: int, burst: int, warmup: int = 2) -> dict[str, dict]:
    """Median (and quartiles) microseconds per call of each (context, run), rounds interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + rounds):
        for name, (context, run) in runs.items():
            us = _time_us(run, burst, context)
            if i >= warmup:
                samples[name].append(us)
    out = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else s * 3
        out[name] = {"median_us": statistics.median(s), "q1_us": q[0], "q3_us": q[2], "n": len(s)}
    return out


def run_kind(kind: str, rounds: int, burst: int) -> dict:
    """Every variant and mode of one layer kind: microseconds per call and ratios to PEFT."""
    calls, skipped = kind_calls(kind)
    if not calls:
        return {"kind": kind, "skipped": skipped}
    autocast = kind in AUTOCAST_KINDS
    x = torch.randn(M, K, dtype=torch.bfloat16 if kind == "bf16_autocast" else torch.float32)
    xg = x.clone().requires_grad_()
    ours = calls.pop("ours")
    variants = {"linear": calls["linear"], "peft": calls["peft"]}
    backends = {"torch": "torch", "compose": "compose", "triton_stub": "triton"}
    result: dict = {"kind": kind, "modes": {}, "skipped": skipped}
    for mode in MODES:
        xm = x if mode == "fwd_nograd" else xg
        runs = {name: (lambda: _autocast(autocast), _step(call, mode, xm)) for name, call in variants.items()}
        for name, backend in backends.items():
            runs[name] = (lambda b=backend: _on_backend_autocast(b, autocast), _step(ours, mode, xm))
        times = interleaved_us(runs, rounds, burst)
        peft = times["peft"]["median_us"]
        result["modes"][mode] = {name: {**t, "ratio_vs_peft": t["median_us"] / peft} for name, t in times.items()}
    return result


def _autocast(on: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


@contextlib.contextmanager
def _on_backend_autocast(backend: str, autocast: bool):
    with on_backend(backend), _autocast(autocast):
        yield


@contextlib.contextmanager
def on_backend(backend: str):
    """Every call inside on ``backend`` (triton: its launches stubbed)."""
    ops.set_backend(backend)
    try:
        with stubbed_launches() if backend == "triton" else contextlib.nullcontext():
            yield
    finally:
        ops.set_backend(None)


# Bi-Share in the tiny-LLaMA step: the paper's default ranks of each transform, its shared tensors
# sized to the model (hidden 64, MLP 128)
BISHARE_STEP = {"slice": {}, "gate": {"gate_dims": (128, 128)}, "kron": {"kron_dim": 16}}


def run_llama_step(rounds: int) -> dict:
    """Milliseconds per training step of a tiny LLaMA: PEFT LoRA, ours lora, similarity and Bi-Share
    (each transform: what a layer call's host time comes to when its shared tensors are shared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..config import ShareLoRAConfig
    from ..model import apply
    from .e2e import _train_step

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    tokens = torch.randint(0, config.vocab_size, (2, 32))
    from peft import LoraConfig, get_peft_model

    models = {"peft_lora": get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS)),
              "lora": apply(copy.deepcopy(base), ShareLoRAConfig(method="lora", r=R, alpha=2 * R, target_modules=TARGETS)),
              "similarity": apply(copy.deepcopy(base), ShareLoRAConfig(method="similarity", r=R, alpha=2 * R,
                                                                      target_modules=TARGETS, share_sets=[[2, 3]]))}
    for transform, extra in BISHARE_STEP.items():
        models[f"bishare_{transform}"] = apply(copy.deepcopy(base), ShareLoRAConfig(
            method="bishare", alpha=2 * R, target_modules=TARGETS, shape_transform=transform, **extra))
    steps = {name: _train_step(model, tokens) for name, model in models.items()}
    times = interleaved_us({name: (contextlib.nullcontext, step) for name, step in steps.items()}, rounds, 1)
    peft = times["peft_lora"]["median_us"]
    return {"model": {"hidden_size": 64, "layers": 4, "targets": TARGETS, "r": R, "batch": [2, 32]},
            "variants": {name: {"median_ms": t["median_us"] / 1e3, "q1_ms": t["q1_us"] / 1e3, "q3_ms": t["q3_us"] / 1e3,
                                "ratio_vs_peft": t["median_us"] / peft} for name, t in times.items()}}


def run_host(quick: bool = False, kinds: tuple[str, ...] = KINDS) -> dict:
    """The whole host benchmark, one thread (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rounds, burst, step_rounds = (3, 5, 2) if quick else (15, 40, 15)
    try:
        cases = []
        for kind in kinds:
            cases.append(run_kind(kind, rounds, burst))
            print(f"bench --host: {kind} done", file=sys.stderr, flush=True)
        step = run_llama_step(step_rounds)
    finally:
        torch.set_num_threads(threads)
    return {"shape": {"M": M, "K": K, "N": N, "r": R}, "threads": 1, "rounds": rounds, "burst": burst,
            "smoke_run": quick, "cases": cases, "llama_step": step}


# ----------------------------------------------------------------------------- report
def markdown(host: dict, env: dict | None = None) -> str:
    lines = ["## Host time per layer call (CPU, one thread)", ""]
    if env:
        lines += [f"Command: `{env['command']}`; {env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
                  f"Python {env['python']}; load average before {env['loadavg_before']}, after {env['loadavg_after']}.",
                  ""]
    if host.get("smoke_run"):
        lines += ["> **SMOKE RUN (--quick): its figures are noise.**", ""]
    s = host["shape"]
    lines += [f"M={s['M']}, K={s['K']}, N={s['N']}, r={s['r']}; {host['rounds']} interleaved rounds of "
              f"{host['burst']} calls; median microseconds per call (ratio to PEFT's layer in the same run).", "",
              "| layer | mode | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for case in host["cases"]:
        if "modes" not in case:
            lines.append(f"| {case['kind']} | skipped: {next(iter(case['skipped'].values()))} |")
            continue
        for mode, row in case["modes"].items():
            cells = [f"{row[v]['median_us']:.1f} ({row[v]['ratio_vs_peft']:.2f}x)" if v in row else "-" for v in VARIANTS]
            lines.append(f"| {case['kind']} | {mode} | " + " | ".join(cells) + " |")
    step = host["llama_step"]
    lines += ["", f"Tiny-LLaMA training step (hidden {step['model']['hidden_size']}, {step['model']['layers']} layers, "
              f"q/k/v/o/gate/up/down, r={step['model']['r']}, batch 2 x 32): median ms (ratio to PEFT).", "",
              "| variant | step ms | ratio vs PEFT |", "|---|---|---|"]
    for name, row in step["variants"].items():
        lines.append(f"| {name} | {row['median_ms']:.2f} | {row['ratio_vs_peft']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(host: dict, path: Path) -> Path:
    """Bars of host time / PEFT's per layer kind, one panel per mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..files import atomic_write

    cases = [c for c in host["cases"] if "modes" in c]
    fig = Figure(figsize=(4.5 * len(MODES), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(MODES), squeeze=False)[0]
    width = 0.8 / len(VARIANTS)
    for ax, mode in zip(axes, MODES):
        for i, v in enumerate(VARIANTS):
            ax.bar([g + i * width for g in range(len(cases))], [c["modes"][mode][v]["ratio_vs_peft"] for c in cases],
                   width, label=v)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(cases))], [c["kind"] for c in cases], fontsize=7)
        ax.set_title(mode)
        ax.set_ylabel("host time / PEFT's")
    axes[0].legend(fontsize=7)
    title = "host time per layer call (CPU, one thread)" + (" - SMOKE RUN (--quick)" if host.get("smoke_run") else "")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def write(results: dict, out: Path) -> dict[str, str]:
    """host.json (every figure, environment, command), host.md and host.png in ``out``."""
    from ..cli.outputs import write_json, write_text

    json_path = write_json(out / "host.json", results, indent=2)
    md = write_text(out / "host.md", markdown(results["host"], results["environment"]))
    return {"json": str(json_path), "markdown": str(md), "png": str(plot(results["host"], out / "host.png"))}


__all__ = ["run_host", "write", "markdown", "stubbed_launches", "layer_with_paths"]
