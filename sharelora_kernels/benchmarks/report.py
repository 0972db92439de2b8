"""Write one run's results: the JSON (source of every figure), then a markdown table and a PNG read from it."""
from __future__ import annotations

import json
from pathlib import Path

MB = 2 ** 20


OUTPUTS = ("results.json", "results.md", "ratio_vs_base.png")
HOST_OUTPUTS = ("host.json", "host.md", "host.png")  # bench --host (benchmarks/host.py)
SERVING_OUTPUTS = ("serving.json", "serving.md")  # bench --serving (benchmarks/serving.py)
SMOKE_NOTE = ("SMOKE RUN (--quick): tiny shapes and few repeats, to check that everything runs. "
              "Its times and ratios are noise, not measurements: run without --quick for figures.")


def write_all(results: dict, out_dir: Path) -> dict[str, str]:
    """Write results.json, then results.md and ratio_vs_base.png rendered from the re-read JSON, each atomically."""
    from ..cli.outputs import write_json, write_text

    json_path = write_json(out_dir / "results.json", results, indent=2)
    data = json.loads(json_path.read_text())
    md_path = write_text(out_dir / "results.md", markdown(data))
    return {"json": str(json_path), "markdown": str(md_path), "png": str(plot_ratios(data, out_dir / "ratio_vs_base.png"))}


def is_smoke_run(data: dict) -> bool:
    """Whether a results JSON comes from ``--quick`` (older files say so only by their profile)."""
    return data["config"].get("smoke_run", data["config"]["profile"] == "quick")


def timed_mode(ratios: dict) -> str:
    """The mode an op's ratio is of: "fwd+bwd" for ops with a backward, "fwd" for forward-only ones."""
    return "fwd+bwd" if "fwd+bwd" in ratios else "fwd"


def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median']:.3f} [{stats['q1']:.3f}, {stats['q3']:.3f}]"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.2f}"


def markdown(data: dict) -> str:
    """The run as markdown tables; every figure is formatted from ``data`` (the JSON)."""
    env, cfg = data["environment"], data["config"]
    lines = [f"# sharelora_kernels benchmark: {env['device_name']}, {env['date']}", ""]
    if is_smoke_run(data):
        lines += [f"> **{SMOKE_NOTE}**", ""]
    lines += [f"Command: `{env['command']}`", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}, "
             f"CPU {env['cpu_model']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads). "
             f"Load average (1, 5, 15 min) before: {env['loadavg_before']}, after: {env['loadavg_after']}.", "",
             f"dtype {cfg['dtype']}, profile {cfg['profile']}, {cfg['warmup']} warm-up + {cfg['repeats']} timed repeats "
             "per variant, variants interleaved. Times in ms: median [q1, q3]. Ratio: median / median of base "
             "in the same case and mode (base: F.linear for the LoRA ops, the plain torch formula for similarity), "
             "of fwd+bwd, or of fwd for forward-only ops. Saved MB: activations autograd keeps for backward beyond "
             "inputs and parameters. Peak MB: CUDA peak allocation during fwd+bwd above the resident tensors.", ""]
    if data.get("default_backend_check"):
        check = data["default_backend_check"]
        lines += [f"## Default-backend check: our backends (CPU default: {check.get('default_backend', 'torch')}) vs PEFT vs base "
                  "nn.Linear (fwd+bwd)", "",
                  f"M={check['shape']['M']}, K={check['shape']['K']}, N={check['shape']['N']}, r={check['r']}, {check['dtype']}, "
                  f"{check['repeats']} repeats.", "",
                  "| variant | fwd+bwd ms | ratio vs base (medians) | ratio vs base (minima) |", "|---|---|---|---|"]
        for v, row in check["variants"].items():
            lines.append(f"| {v} | {_ms(row['fwd+bwd_ms'])} | {check['ratio_vs_base'][v]:.3f} | "
                         f"{check['ratio_of_min_vs_base'][v]:.3f} |")
        met = "not judged (smoke run: too few repeats)" if check["target_met"] is None else f"**{check['target_met']}**"
        lines += ["", f"Target: {check['target']}. Met: {met}.", ""]
    lines += ["## Ops", "",
              "| op | M x K x N | variant | fwd ms | bwd ms | fwd+bwd ms | ratio vs base (mode) | saved MB | peak MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for case in data["ops"]:
        shape = "x".join(str(case["shape"][d]) for d in "MKN")
        for v, row in case["variants"].items():
            if "skipped" in row:
                continue  # listed under "Skipped"
            ratios = case["ratio_vs_base"].get(v, {})
            ratio = "-" if not ratios else f"{ratios[timed_mode(ratios)]:.3f} ({timed_mode(ratios)})"
            lines.append(f"| {case['op']} | {shape} | {v} | {_ms(row.get('fwd_ms'))} | {_ms(row.get('bwd_ms'))} | "
                         f"{_ms(row.get('fwd+bwd_ms'))} | {ratio} | "
                         f"{_mb(row.get('saved_for_backward_bytes'))} | {_mb(row.get('cuda_peak_bytes'))} |")
    if data.get("e2e"):
        e2e = data["e2e"]
        m = e2e["model"]
        lines += ["", "## End-to-end training step (random-weight LlamaForCausalLM)", "",
                  f"hidden {m['hidden_size']}, MLP {m['intermediate_size']}, {m['num_hidden_layers']} layers, "
                  f"{m['num_attention_heads']} heads, vocab {m['vocab_size']}, batch {m['batch']} x {m['seq']} tokens, "
                  f"{m['dtype']}, targets {', '.join(m['targets'])}, {m['optimizer']}.", "",
                  "| variant | step ms | tokens/s | trainable params | saved MB | peak MB |", "|---|---|---|---|---|---|"]
        for v, row in e2e["variants"].items():
            lines.append(f"| {v} | {_ms(row['step_ms'])} | {row['tokens_per_s']:.1f} | {row['trainable_params']:,} | "
                         f"{_mb(row['saved_for_backward_bytes'])} | {_mb(row['cuda_peak_bytes'])} |")
    if data["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['what']}: {s['reason']}" for s in data["skipped"]]
    return "\n".join(lines) + "\n"


PANEL_LABELS = {"fwd+bwd": "fwd+bwd time / base F.linear fwd+bwd time",
                "fwd": "forward time / plain torch formula's time"}
PANEL_TITLES = {"fwd+bwd": "LoRA ops, forward + backward (median of repeats)",
                "fwd": "similarity: angular_distance, forward only"}
VARIANT_LABELS = {"fwd+bwd": {"base": "base: F.linear alone", "peft": "peft: PEFT LoRA layer",
                              "torch": "torch: our torch path", "compose": "compose: our GEMM composition",
                              "auto": "auto: measured choice", "unsloth_order": "unsloth_order: base, then addmm_",
                              "fused": "fused: our Triton kernels"},
                  "fwd": {"base": "base: plain torch formula", "torch": "torch: our angular_distance"}}


def plot_ratios(data: dict, path: Path) -> Path:
    """Grouped bars of time / base time: the ops with a backward by their fwd+bwd time (left), the
    forward-only ones (similarity: angular_distance vs the plain torch formula) by their forward time
    (right). A smoke run is marked in the title and its bars hatched. Written atomically; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..files import atomic_write

    panels: dict[str, list] = {"fwd+bwd": [], "fwd": []}
    for case in data["ops"]:
        mode = timed_mode(case["ratio_vs_base"].get("base", {}))
        ratios = {v: r[mode] for v, r in case["ratio_vs_base"].items() if mode in r}
        panels[mode].append((_case_label(case), ratios))
    panels = {mode: groups for mode, groups in panels.items() if groups}
    widths = [max(3.0, 1.1 * len(groups)) for groups in panels.values()]
    fig = Figure(figsize=(max(6.0, sum(widths) + 1.0), 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    smoke = is_smoke_run(data)
    for ax, (mode, groups) in zip(axes, panels.items()):
        variants = list(dict.fromkeys(v for _, ratios in groups for v in ratios))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            xs = [g + i * width for g, (_, r) in enumerate(groups) if v in r]
            ys = [r[v] for _, r in groups if v in r]
            ax.bar(xs, ys, width, label=VARIANT_LABELS[mode].get(v, v), hatch="//" if smoke else None,
                   alpha=0.5 if smoke else 1.0)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [name for name, _ in groups], fontsize=7)
        ax.set_ylabel(PANEL_LABELS[mode])
        ax.set_title(PANEL_TITLES[mode], fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: never over a bar
    title = f"{data['environment']['device_name']}, {data['config']['dtype']}, {data['environment']['date']}"
    fig.suptitle(f"{SMOKE_NOTE}\n{title}" if smoke else title, fontsize=8 if smoke else 10,
                 color="#c62828" if smoke else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return path


def _case_label(case: dict) -> str:
    shape = case["shape"]
    if case["op"] == "similarity":  # M = samples, K = dim, N = layers
        return f"similarity\nL={shape['N']} n={shape['M']} d={shape['K']}"
    return f"{case['op']}\n{'x'.join(str(shape[d]) for d in 'MKN')}"
