"""Write one run's results: the JSON (source of every figure), then a markdown table and a PNG read from it."""
from __future__ import annotations

import json
from pathlib import Path

MB = 2 ** 20


def write_all(results: dict, out_dir: Path) -> dict[str, str]:
    """Write results.json, then results.md and ratio_vs_base.png rendered from the re-read JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    data = json.loads(json_path.read_text())
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(data))
    written = {"json": str(json_path), "markdown": str(md_path)}
    png = plot_ratios(data, out_dir / "ratio_vs_base.png")
    if png:
        written["png"] = png
    return written


def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median']:.3f} [{stats['q1']:.3f}, {stats['q3']:.3f}]"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.2f}"


def markdown(data: dict) -> str:
    """The run as markdown tables; every figure is formatted from ``data`` (the JSON)."""
    env, cfg = data["environment"], data["config"]
    lines = [f"# sharelora_kernels benchmark: {env['device_name']}, {env['date']}", "",
             f"Command: `{env['command']}`", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}, "
             f"CPU {env['cpu_model']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads). "
             f"Load average (1, 5, 15 min) before: {env['loadavg_before']}, after: {env['loadavg_after']}.", "",
             f"dtype {cfg['dtype']}, profile {cfg['profile']}, {cfg['warmup']} warm-up + {cfg['repeats']} timed repeats "
             "per variant, variants interleaved. Times in ms: median [q1, q3]. Ratio: median / median of base "
             "(F.linear) in the same case. Saved MB: activations autograd keeps for backward beyond inputs and "
             "parameters. Peak MB: CUDA peak allocation during fwd+bwd above the resident tensors.", ""]
    if data.get("issue3"):
        i3 = data["issue3"]
        lines += [f"## Issue 3: our backends (CPU default: {i3.get('default_backend', 'torch')}) vs PEFT vs base "
                  "nn.Linear (fwd+bwd)", "",
                  f"M={i3['shape']['M']}, K={i3['shape']['K']}, N={i3['shape']['N']}, r={i3['r']}, {i3['dtype']}, "
                  f"{i3['repeats']} repeats.", "",
                  "| variant | fwd+bwd ms | ratio vs base (medians) | ratio vs base (minima) |", "|---|---|---|---|"]
        for v, row in i3["variants"].items():
            lines.append(f"| {v} | {_ms(row['fwd+bwd_ms'])} | {i3['ratio_vs_base'][v]:.3f} | "
                         f"{i3['ratio_of_min_vs_base'][v]:.3f} |")
        lines += ["", f"Target: {i3['target']}. Met: **{i3['target_met']}**.", ""]
    lines += ["## Ops", "", "| op | M x K x N | variant | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd / base | saved MB | peak MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for case in data["ops"]:
        shape = "x".join(str(case["shape"][d]) for d in "MKN")
        for v, row in case["variants"].items():
            if "skipped" in row:
                continue  # listed under "Skipped"
            ratio = case["ratio_vs_base"].get(v, {}).get("fwd+bwd") or case["ratio_vs_base"].get(v, {}).get("fwd")
            lines.append(f"| {case['op']} | {shape} | {v} | {_ms(row.get('fwd_ms'))} | {_ms(row.get('bwd_ms'))} | "
                         f"{_ms(row.get('fwd+bwd_ms'))} | {'-' if ratio is None else f'{ratio:.3f}'} | "
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


def plot_ratios(data: dict, path: Path) -> str | None:
    """Grouped bars of fwd+bwd (fwd for forward-only ops) time / base, one group per op and shape."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plot")
        return None
    groups, variants = [], []
    for case in data["ops"]:
        ratios = {v: r.get("fwd+bwd", r.get("fwd")) for v, r in case["ratio_vs_base"].items()}
        groups.append((f"{case['op']}\n{'x'.join(str(case['shape'][d]) for d in 'MKN')}", ratios))
        variants += [v for v in ratios if v not in variants]
    if not groups:
        return None
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups)), 4))
    for i, v in enumerate(variants):
        xs = [g + i * width for g, (_, r) in enumerate(groups) if r.get(v) is not None]
        ys = [r[v] for _, r in groups if r.get(v) is not None]
        ax.bar(xs, ys, width, label=v)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [name for name, _ in groups], fontsize=7)
    ax.set_ylabel("time / base F.linear (fwd+bwd)")
    ax.set_title(f"{data['environment']['device_name']}, {data['config']['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
