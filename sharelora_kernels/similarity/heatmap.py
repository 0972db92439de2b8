"""Similarity heatmap with share sets outlined and named in a legend (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SET_COLORS = ("#ff3b30", "#ffffff", "#ff9500", "#ff2d95", "#00e5ff", "#ffcc00")


def similarity_heatmap(S, sets: list[list[int]], path, title: str | None = None) -> Path:
    """Write a PNG of the (L, L) similarity S with every share set's cells outlined; returns the path.

    S: (L, L) tensor or array, any float dtype. sets: lists of layer indices; singletons are not
    outlined. A set's outline surrounds the cells (i, j) with i and j both in the set, so a contiguous
    set shows as one square block; the legend names each outline's layers. title: e.g. the model's
    name and how S was measured. The file is written to a temporary name and renamed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from ..files import atomic_write

    s = S.detach().cpu().double().numpy() if isinstance(S, torch.Tensor) else np.asarray(S, dtype=np.float64)
    n = len(s)
    side = max(6.0, 0.3 * n)  # inches; about 0.3 inch per layer for deep models
    fig = Figure(figsize=(side + 1.2, side + 0.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(s, cmap="viridis", vmin=float(s.min()), vmax=1.0, origin="upper")
    fig.colorbar(image, ax=ax, label="similarity = 1 - angular distance")
    handles = []
    for k, g in enumerate(x for x in sets if len(x) > 1):
        color = SET_COLORS[k % len(SET_COLORS)]
        ax.add_collection(LineCollection(_outline(set(g)), colors=color, linewidths=2.0))
        handles.append(Line2D([], [], color=color, linewidth=2.0, label=f"share set {k + 1}: layers {_layers(g)}"))
    if not handles:
        handles.append(Line2D([], [], color="none", label="no share set at this threshold"))
    # below the axes, on grey so the white outline colour shows
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(handles)),
              fontsize=8, facecolor="#9e9e9e", framealpha=1.0, title="outlined cells: both layers in one share set",
              title_fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title or "layer similarity and share sets", fontsize=10)
    ticks = range(0, n, max(1, n // 16))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return path


def _layers(members: list[int]) -> str:
    """"3-8" for a contiguous run, else "1, 4, 7"."""
    g = sorted(members)
    return f"{g[0]}-{g[-1]}" if g == list(range(g[0], g[-1] + 1)) else ", ".join(map(str, g))


def _outline(members: set[int]) -> list[list[tuple[float, float]]]:
    """Boundary segments of the cells {(i, j): i, j in members}, in imshow coordinates (x = column)."""
    segments = []
    for i in members:
        for j in members:
            if i - 1 not in members:
                segments.append([(j - 0.5, i - 0.5), (j + 0.5, i - 0.5)])
            if i + 1 not in members:
                segments.append([(j - 0.5, i + 0.5), (j + 0.5, i + 0.5)])
            if j - 1 not in members:
                segments.append([(j - 0.5, i - 0.5), (j - 0.5, i + 0.5)])
            if j + 1 not in members:
                segments.append([(j + 0.5, i - 0.5), (j + 0.5, i + 0.5)])
    return segments
