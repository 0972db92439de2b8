"""What `compare` shows: its results (the compare.json content) as a text table and as a PNG."""
from __future__ import annotations

from pathlib import Path

from . import counted

KIB = 1024


def table(result: dict) -> str:
    """One row per finished method: parameters (and % of LoRA's), AdamW state, step time, train and held-out loss."""
    rows = result["methods"]
    lora = rows.get("lora", {}).get("trainable_params")
    header = (f"{'method':<36} {'trainable':>10} {'of LoRA':>8} {'optim. state':>12} {'step ms':>8} "
              f"{'train loss':>10} {'held-out':>9}")
    lines = [f"{result['steps']} steps each, seed {result['seed']}, held-out: {result['heldout_text']} "
             f"(without adapters: {result['base_heldout_loss']:.4f})", header, "-" * len(header)]
    for row in rows.values():
        share = "-" if lora is None else f"{100.0 * row['trainable_params'] / lora:.1f}%"
        lines.append(f"{row['label']:<36} {row['trainable_params']:>10,} {share:>8} "
                     f"{row['optimizer_state_bytes'] / KIB:>8,.1f} KiB {row['step_ms_median']:>8.1f} "
                     f"{row['train_loss']:>10.4f} {row['heldout_loss']:>9.4f}")
    lines += [f"skipped {name}: {why}" for name, why in result.get("skipped", {}).items()]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """compare.png: training loss per step of every method (left; a moving average over a tenth of the
    steps) and trainable parameters against held-out loss (right). Written atomically; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from ..files import atomic_write

    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    curves, scatter = fig.subplots(1, 2)
    colors = {}
    for name, row in result["methods"].items():
        losses = row["train_losses"]
        window = max(1, len(losses) // 10)
        smooth = [sum(losses[max(0, i + 1 - window) : i + 1]) / len(losses[max(0, i + 1 - window) : i + 1])
                  for i in range(len(losses))]
        (line,) = curves.plot(range(1, len(losses) + 1), smooth, label=row["label"], linewidth=1.5)
        colors[name] = line.get_color()
    curves.set_xlabel("optimizer step")
    curves.set_ylabel(f"training loss (moving average of {counted(max(1, result['steps'] // 10), 'step')})")
    curves.set_title(f"training loss, {result['steps']} steps, seed {result['seed']}", fontsize=10)
    curves.legend(fontsize=7)
    for name, row in result["methods"].items():
        scatter.scatter(row["trainable_params"], row["heldout_loss"], color=colors[name], s=40, zorder=3, label=row["label"])
    scatter.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    scatter.legend(fontsize=7)
    scatter.set_xlabel("trainable adapter parameters")
    scatter.set_ylabel("held-out loss (nats per token)")
    scatter.set_title(f"held-out loss after training (without adapters: {result['base_heldout_loss']:.3f})", fontsize=10)
    scatter.grid(alpha=0.3)
    scatter.margins(x=0.25, y=0.2)
    fig.suptitle(f"{Path(result['model']).name} ({result['model_type']}): what sharing buys", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path
