"""bench --serving: many adapters in one batch on the built-in tiny LLaMA (inference).

For each method (plain LoRA, ShareLoRA similarity, Bi-Share kron; `compare`'s defaults: r=8, alpha=16,
the fitted kron_dim; ShareLoRA's share sets: adjacent layer pairs, as no calibration runs here) and
1, 8 and 64 distinct adapters over a batch of 64 rows (row i uses adapter i mod N), it times
  ours      prefill: one mixed-batch forward (``mixed_batch``) of 64 x P tokens, the block entered for
            it; decode: one step (64 x 1 token after a P-token cache) inside a mixed-batch block that
            already ran a step, as ``generate`` runs its steps (the block's first forward checks the
            adapters: ``ops.multi_adapter``);
  separate  the same work as one forward per adapter, each over that adapter's rows alone;
  peft      PEFT's mixed-batch LoRA (``adapter_names=``) with as many adapters of the same rank
            (one figure, shared by every method's rows: the plain LoRA baseline of serving today);
            prefill: one forward with ``adapter_names``; decode: one step inside PEFT's own
            ``adapter_names`` hooks, as its ``generate`` runs its steps;
and reports tokens/s and the bytes of one adapter (its unique tensors: ``adapter_memory``). Adapter
tensors are random (zero-B fresh adapters would let a path be skipped). Variants of one case are
timed interleaved, ``ours`` on the method's one-adapter model too (``vs_one_adapter`` compares the
two under the same load); read the ratios (``vs_one_adapter``, ``speedup_vs_peft``), not the times.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from .timing import interleaved

METHODS = ("lora", "sharelora", "bishare_kron")
ADAPTER_COUNTS = (1, 8, 64)
BATCH = 64
# profile -> (prompt tokens P, warm-up rounds, timed rounds, adapter counts)
PROFILES = {"quick": (8, 1, 2, (1, 8)), "cpu": (32, 2, 10, ADAPTER_COUNTS), "cuda": (128, 3, 20, ADAPTER_COUNTS)}


def method_configs(model: nn.Module) -> dict:
    """The ShareLoRAConfig of each method, as `compare` builds its defaults for this model."""
    from ..cli.fitting import bishare_configs, lora_config
    from ..targeting import find_target_modules
    from ..config import ShareLoRAConfig

    infos, num_layers = find_target_modules(model, ShareLoRAConfig())
    base = lora_config(infos, r=8, alpha=16.0, targets=None)
    pairs = [[i, i + 1] for i in range(0, num_layers - 1, 2)]
    return {"lora": base, "sharelora": dataclasses.replace(base, method="similarity", share_sets=pairs),
            "bishare_kron": bishare_configs(base, infos, num_layers)["kron"]}


def _randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def with_adapters(base: nn.Module, config, count: int) -> nn.Module:
    """A copy of ``base`` with ``count`` random named adapters a0, a1, ... of ``config``, eval mode."""
    from ..model import adapter_store, apply

    model = copy.deepcopy(base)
    for i in range(count):
        apply(model, config, adapter_name=f"a{i}")
        _randomize(adapter_store(model, f"a{i}").parameters(), seed=i)
    return model.eval().requires_grad_(False)


def peft_lora(base: nn.Module, config, count: int) -> tuple[nn.Module, int]:
    """PEFT's LoRA with ``count`` random adapters of ``config``'s rank and target modules; (model, bytes of one)."""
    from peft import LoraConfig, get_peft_model

    from ..model import plan_model

    targets = sorted({name.rpartition(".")[2] for name in plan_model(base, config).modules})
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=targets)
    model = get_peft_model(copy.deepcopy(base), lora, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", lora)
    for i in range(count):
        _randomize([p for n, p in model.named_parameters() if f".a{i}." in n], seed=i)
    per = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".a0." in n)
    return model.eval().requires_grad_(False), per


def _cache_arg() -> str:
    """The forward argument (and output field) of the KV cache: ``cache`` (Transformers 5.2x), else ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _step(model: nn.Module, ids: torch.Tensor, cache, names=None, peft_names=None):
    """One forward of ``ids`` (a decode step when ``cache`` is given: cropped back to its length after)."""
    from ..serving import mixed_batch

    kwargs = {_cache_arg(): cache, "use_cache": cache is not None}
    if peft_names is not None:
        kwargs["adapter_names"] = peft_names
    if names is None:
        model(ids, **kwargs)
    else:
        with mixed_batch(model, names):
            model(ids, **kwargs)
    if cache is not None:
        cache.crop(-ids.shape[1])  # back to the prompt's length


def _cache(model: nn.Module, ids: torch.Tensor, names=None, peft_names=None):
    from ..serving import mixed_batch

    kwargs = {"use_cache": True} if peft_names is None else {"use_cache": True, "adapter_names": peft_names}
    if names is None:
        return getattr(model(ids, **kwargs), _cache_arg())
    with mixed_batch(model, names):
        return getattr(model(ids, **kwargs), _cache_arg())


def _decode_in_block(model: nn.Module, token: torch.Tensor, cache, names: list[str], timer) -> float:
    """ms of one decode step inside a mixed-batch block that already ran one (as in ``generate``)."""
    from ..serving import mixed_batch

    with mixed_batch(model, names):
        _step(model, token, cache)
        return timer.time(lambda: _step(model, token, cache))


def _peft_decode_in_hooks(peft_model: nn.Module, token: torch.Tensor, cache, names: list[str], timer) -> float:
    """ms of one PEFT decode step inside its ``adapter_names`` hooks, as PEFT's ``generate`` runs
    its steps (PEFT internals: ``PeftModel._enable_peft_forward_hooks``, the context generate uses)."""
    hooks = getattr(peft_model, "_enable_peft_forward_hooks", None)
    if hooks is None:
        raise RuntimeError("this PEFT version has no PeftModel._enable_peft_forward_hooks (the adapter_names "
                           "context its generate uses): bench --serving needs PEFT 0.13 to 0.21")
    with hooks(adapter_names=names):
        return timer.time(lambda: _step(peft_model, token, cache))


def _separate(model: nn.Module, ids: torch.Tensor, names: list[str], caches: dict | None) -> None:
    """Each adapter's rows as their own forward with that adapter active."""
    from ..model import set_adapter

    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        set_adapter(model, name)
        _step(model, ids[rows], None if caches is None else caches[name])


def time_case(model, peft_model, peft_cache, names: list[str], prompt, token, timer, warmup: int,
              repeats: int, one_model=None) -> dict:
    """Prefill and decode of one model and its adapters ``names`` (one per row): ours, separate, peft,
    and ``one``: ours on ``one_model`` (the method's model with one adapter, every row "a0"; default
    ``model``), interleaved with the others so that the ratio to it sees the same load (ms stats)."""
    from ..model import set_adapter

    one_model = model if one_model is None else one_model
    one_names = ["a0"] * len(names)
    with torch.inference_mode():
        cache = _cache(model, prompt, names)
        one_cache = _cache(one_model, prompt, one_names)
        caches = {}
        for name in dict.fromkeys(names):
            set_adapter(model, name)
            caches[name] = _cache(model, prompt[[i for i, n in enumerate(names) if n == name]])
        calls = {
            "prefill_ours": lambda: timer.time(lambda: _step(model, prompt, None, names)),
            "prefill_separate": lambda: timer.time(lambda: _separate(model, prompt, names, None)),
            "prefill_peft": lambda: timer.time(lambda: _step(peft_model, prompt, None, peft_names=names)),
            "decode_ours": lambda: _decode_in_block(model, token, cache, names, timer),
            "decode_separate": lambda: timer.time(lambda: _separate(model, token, names, caches)),
            "decode_peft": lambda: _peft_decode_in_hooks(peft_model, token, peft_cache, names, timer),
            "prefill_one": lambda: timer.time(lambda: _step(one_model, prompt, None, one_names)),
            "decode_one": lambda: _decode_in_block(one_model, token, one_cache, one_names, timer),
        }
        return interleaved(calls, warmup, repeats)


def run(profile: str, device: torch.device, seed: int = 0) -> dict:
    """Every method x adapter count: tokens/s of prefill and decode (ours, separate, PEFT), bytes per adapter."""
    from ..cli.loading import load_model, resolve_model_dir
    from ..model import adapter_memory
    from .timing import Timer

    past, warmup, repeats, counts = PROFILES[profile]
    base = load_model(resolve_model_dir(None), causal_lm=True, device=str(device)).float()
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (BATCH, past), generator=g).to(device)
    token = torch.randint(0, vocab, (BATCH, 1), generator=g).to(device)
    timer = Timer(device)
    configs = method_configs(base)
    out = {"batch": BATCH, "prompt_tokens": past, "adapter_counts": list(counts), "warmup": warmup, "repeats": repeats,
           "configs": {m: dataclasses.asdict(c) for m, c in configs.items()},
           "rows": []}
    peft_cases = {}
    for count in counts:  # models are built outside inference mode (their tensors keep versions)
        names = [f"a{i % count}" for i in range(BATCH)]
        peft_model, peft_bytes = peft_lora(base, configs["lora"], count)
        with torch.inference_mode():
            peft_cache = _cache(peft_model, prompt, peft_names=names)
        peft_cases[count] = (peft_model, peft_bytes, peft_cache, names)
    for method, config in configs.items():
        one_model = with_adapters(base, config, 1)
        for count in counts:
            model = with_adapters(base, config, count)
            peft_model, peft_bytes, peft_cache, names = peft_cases[count]
            stats = time_case(model, peft_model, peft_cache, names, prompt, token, timer, warmup, repeats, one_model)
            row = {"method": method, "adapters": count, "bytes_per_adapter": adapter_memory(model)["a0"],
                   "peft_lora_bytes_per_adapter": peft_bytes, "ms": stats}
            for phase, tokens in (("prefill", BATCH * past), ("decode", BATCH)):
                for variant in ("ours", "separate", "peft"):
                    row[f"{phase}_{variant}_tokens_per_s"] = tokens / stats[f"{phase}_{variant}"]["median"] * 1e3
                for variant in ("peft", "separate"):
                    row[f"{phase}_speedup_vs_{variant}"] = (stats[f"{phase}_{variant}"]["median"]
                                                            / stats[f"{phase}_ours"]["median"])
                row[f"{phase}_vs_one_adapter"] = stats[f"{phase}_ours"]["median"] / stats[f"{phase}_one"]["median"]
            out["rows"].append(row)
    return out


def markdown(data: dict, smoke_note: str | None = None) -> str:
    """The serving table: one row per method and adapter count."""
    lines = ["# Serving many adapters (bench --serving)", ""]
    if smoke_note:
        lines += [f"**{smoke_note}**", ""]
    lines += [f"Batch {data['batch']} rows, prompt {data['prompt_tokens']} tokens; row i uses adapter i mod N. "
              "tok/s: median; x1: time / time with one adapter (timed interleaved with it); vs PEFT / vs separate: "
              "their time / ours.", "",
              "| method | N | KiB/adapter (PEFT LoRA) | prefill tok/s | x1 | vs PEFT | vs separate "
              "| decode tok/s | x1 | vs PEFT | vs separate |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['method']} | {r['adapters']} | {r['bytes_per_adapter'] / 1024:.1f} "
                     f"({r['peft_lora_bytes_per_adapter'] / 1024:.1f}) "
                     f"| {r['prefill_ours_tokens_per_s']:.0f} | {r['prefill_vs_one_adapter']:.2f} "
                     f"| {r['prefill_speedup_vs_peft']:.2f} | {r['prefill_speedup_vs_separate']:.2f} "
                     f"| {r['decode_ours_tokens_per_s']:.0f} | {r['decode_vs_one_adapter']:.2f} "
                     f"| {r['decode_speedup_vs_peft']:.2f} | {r['decode_speedup_vs_separate']:.2f} |")
    return "\n".join(lines) + "\n"
