"""Similarity heatmap with share sets outlined and named in a legend (matplotlib, Agg backend).

Layout (nothing overlaps at any layer count; ``python_tests/test_heatmap.py`` checks the boxes):
the title across the top, wrapped to the figure's width; the heatmap with the colorbar at its right,
``eps`` marked on the colorbar; the legend in a row of its own below (one entry per share set, and
one for the layers in no set).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ..config import check_share_sets
from .share_sets import check_eps, check_matrix

SET_COLORS = ("#ff3b30", "#ffffff", "#ff9500", "#ff2d95", "#00e5ff", "#ffcc00")
LEGEND_FONT = 8  # points
LEGEND_COLUMNS = 3


def similarity_heatmap(S, sets: list[list[int]], path, title: str | None = None, eps: float | None = None) -> Path:
    """Write a PNG of the (L, L) similarity S with every share set's cells outlined; returns the path.

    S: (L, L) tensor or array, any float dtype, L >= 1, finite and symmetric. sets: disjoint lists of
    layer indices in [0, L); singletons are not outlined. A set's outline surrounds the cells (i, j)
    with i and j both in the set, so a contiguous set shows as one square block; the legend names each
    outline's layers and the layers in no set. title: e.g. the model's name and how S was measured.
    eps: the threshold in [0, 1] the sets were found at, marked on the colorbar; the legend says that
    every pair of a set reaches it only where it does (``share_sets``' "anchor" sets need not).
    ValueError naming the problem for any other S, sets or eps. The file is written to a temporary
    name and renamed.
    """
    from ..files import atomic_write

    fig = heatmap_figure(S, sets, title, eps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def heatmap_figure(S, sets: list[list[int]], title: str | None = None, eps: float | None = None):
    """The matplotlib ``Figure`` ``similarity_heatmap`` writes (same arguments, no file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    s = check_matrix(S)
    n = len(s)
    if n == 0:
        raise ValueError("S has no layers (shape (0, 0)): nothing to draw")
    sets = check_share_sets(sets, n, "sets")
    if eps is not None:
        eps = check_eps(eps)
    multi = [g for g in sets if len(g) > 1]  # sorted by check_share_sets
    alone = sorted(set(range(n)) - {layer for g in multi for layer in g})
    side = max(6.0, 0.3 * n)  # inches of heatmap; about 0.3 inch per layer for deep models
    width = side + 1.6
    chars = int(width * 72 / (0.6 * LEGEND_FONT) / LEGEND_COLUMNS) - 6  # legend label width per column
    handles = [Line2D([], [], color=SET_COLORS[k % len(SET_COLORS)], linewidth=2.0,
                      label=_wrap(f"share set {k + 1}: layers {_layers(g)}", chars)) for k, g in enumerate(multi)]
    if not multi:
        handles.append(Patch(facecolor="none", edgecolor="none", label="no share set at this threshold"))
    if alone:
        handles.append(Patch(facecolor="none", edgecolor="black", linestyle=":",
                             label=_wrap(f"in no set (own adapters): layer{'s' if len(alone) > 1 else ''} "
                                         f"{_runs(alone)}", chars)))
    columns = min(LEGEND_COLUMNS, len(handles))
    rows = -(-len(handles) // columns)
    lines = sum(max(h.get_label().count("\n") + 1 for h in handles[r * columns:(r + 1) * columns]) for r in range(rows))
    legend_height = 0.45 + lines * LEGEND_FONT * 1.5 / 72  # inches: title line and entries
    title = "\n".join(_wrap(part, int(width * 72 / (0.6 * 10)) - 2) for part in
                      (title or "layer similarity and share sets").split("\n"))

    fig = Figure(figsize=(width, side + legend_height + 0.35 * (title.count("\n") + 1) + 0.9), constrained_layout=True)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1, height_ratios=[side, legend_height])
    ax = fig.add_subplot(grid[0])
    vmin = min(float(s.min()), eps if eps is not None else 1.0)
    image = ax.imshow(s, cmap="viridis", vmin=vmin, vmax=1.0, origin="upper")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.08, label="similarity = 1 - angular distance")
    if eps is not None:
        _mark_eps(colorbar, eps, vmin)
    for k, g in enumerate(multi):
        ax.add_collection(LineCollection(_outline(set(g)), colors=SET_COLORS[k % len(SET_COLORS)], linewidths=2.0))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ticks = list(range(0, n, max(1, n // 16)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    fig.suptitle(title, fontsize=10)
    legend_ax = fig.add_subplot(grid[1])
    legend_ax.axis("off")
    # on grey so the white outline colour shows
    legend_ax.legend(handles=handles, loc="upper center", ncol=columns, fontsize=LEGEND_FONT, facecolor="#9e9e9e",
                     framealpha=1.0, title="outlined cells: both layers in one share set" + _eps_note(s, multi, eps),
                     title_fontsize=LEGEND_FONT)
    return fig


def _eps_note(s: np.ndarray, sets: list[list[int]], eps: float | None) -> str:
    """What the legend's title says of eps: every pair of every set reaches it, or only that the sets were found at it."""
    if eps is None:
        return ""
    if all(s[i, j] >= eps for g in sets for i in g for j in g):
        return f" (similarity >= eps = {eps:g} for every pair)"
    return f" (found at eps = {eps:g}; some pairs are below it)"


def _mark_eps(colorbar, eps: float, vmin: float) -> None:
    """A line across the colorbar at ``eps`` and a tick labelled "eps 0.85" (ticks too close to it dropped)."""
    from matplotlib.ticker import MaxNLocator

    colorbar.ax.axhline(eps, color="#ff3b30", linewidth=2.0)
    near = 0.08 * (1.0 - vmin)
    ticks = [t for t in MaxNLocator(5).tick_values(vmin, 1.0) if vmin <= t <= 1.0 and abs(t - eps) > near]
    colorbar.set_ticks(sorted(ticks + [eps]))
    colorbar.set_ticklabels([f"eps {t:g}" if t == eps else f"{t:.2f}" for t in sorted(ticks + [eps])])


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, max(width, 16), break_long_words=False, break_on_hyphens=False))


def _layers(members: list[int]) -> str:
    """"3-8" for a contiguous run, else "1, 4, 7"."""
    g = sorted(members)
    return f"{g[0]}-{g[-1]}" if g == list(range(g[0], g[-1] + 1)) else ", ".join(map(str, g))


def _runs(members: list[int]) -> str:
    """Every run of consecutive layers shortened: "0-3, 9, 12-15"."""
    runs: list[list[int]] = []
    for layer in sorted(members):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


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
