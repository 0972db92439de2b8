"""Similarity heatmap with share sets outlined (needs matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def similarity_heatmap(S, sets: list[list[int]], path, title: str | None = None) -> Path:
    """Write a PNG of the (L, L) similarity S with every share set's cells outlined; returns the path.

    sets: lists of layer indices; singletons are not outlined. A set's outline surrounds the cells
    (i, j) with i and j both in the set, so a contiguous set shows as one square block.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("similarity_heatmap needs matplotlib: pip install matplotlib") from err
    s = S.detach().cpu().double().numpy() if isinstance(S, torch.Tensor) else np.asarray(S, dtype=np.float64)
    n = len(s)
    side = max(6.0, 0.3 * n)  # inches; about 0.3 inch per layer for deep models
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(s, cmap="viridis", vmin=float(s.min()), vmax=1.0, origin="upper")
    fig.colorbar(image, ax=ax, label="similarity 1 - angular distance")
    colors = ["#ff3b30", "#ffffff", "#ff9500", "#ff2d95", "#00e5ff", "#ffcc00"]
    for k, g in enumerate(x for x in sets if len(x) > 1):
        ax.add_collection(LineCollection(_outline(set(g)), colors=colors[k % len(colors)], linewidths=2.0))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title or "layer similarity and share sets")
    ticks = range(0, n, max(1, n // 16))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


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
