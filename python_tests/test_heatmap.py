"""The similarity heatmap's layout: title, heatmap, colorbar and legend never overlap, at the built-in
model's 10 layers and at 32 and 80; eps is marked on the colorbar; layers in no set are named."""
from __future__ import annotations

import itertools

import pytest
import torch

from sharelora_kernels.similarity.heatmap import heatmap_figure, similarity_heatmap

TITLE = ("a-rather-long-model-directory-name-of-a-fine-tuned-checkpoint (llama, {n} layers): layer similarity\n"
         "64 samples, residual stream entering each layer; share sets at eps=0.85 (complete)")


def similarity(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    S = 0.6 + 0.4 * torch.rand(n, n, generator=g, dtype=torch.float64)
    S = (S + S.T) / 2
    S.fill_diagonal_(1.0)
    return S


def boxes(fig) -> dict:
    """Window extents (pixels) of the parts that must not overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    heat, = [a for a in fig.axes if a.images]
    cbar, = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    legend, = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    return {"title": fig._suptitle.get_window_extent(renderer), "heatmap": heat.get_tightbbox(renderer),
            "colorbar": cbar.get_tightbbox(renderer), "legend": legend.get_window_extent(renderer)}


@pytest.mark.parametrize("n, sets", [
    (10, [[1, 2], [3, 4, 5], [7, 8]]),                                   # the built-in model's layer count
    (32, [[16, 17], [18, 19], [20, 21, 22], list(range(23, 28)), [28, 29, 30]]),  # the paper's LLaMA-7B sets
    (80, [list(range(i, i + 3)) for i in range(0, 60, 3)] + [[61, 70]]),  # many sets, a non-contiguous one
    (80, []),                                                              # nothing shared
])
def test_nothing_overlaps(n, sets):
    fig = heatmap_figure(similarity(n), sets, TITLE.format(n=n), eps=0.85)
    parts = boxes(fig)
    for (a, box_a), (b, box_b) in itertools.combinations(parts.items(), 2):
        overlap = box_a.intersection(box_a, box_b)
        assert overlap is None or overlap.width <= 0 or overlap.height <= 0, f"{a} overlaps {b} at {n} layers"
    for name, box in parts.items():  # and nothing is cut off
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, f"{name} leaves the figure at {n} layers"
        assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, f"{name} leaves the figure at {n} layers"


def test_eps_on_the_colorbar_and_layers_in_no_set_in_the_legend(tmp_path):
    fig = heatmap_figure(similarity(10), [[1, 2], [3, 5]], "my-model: similarity", eps=0.85)
    cbar, = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    fig.canvas.draw()
    assert "eps 0.85" in [t.get_text() for t in cbar.get_yticklabels()]
    assert any(abs(line.get_ydata()[0] - 0.85) < 1e-12 for line in cbar.lines)
    legend, = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert [" ".join(t.get_text().split()) for t in legend.get_texts()] == [
        "share set 1: layers 1-2", "share set 2: layers 3, 5", "in no set (own adapters): layers 0, 4, 6-9"]
    assert fig._suptitle.get_text() == "my-model: similarity"
    path = similarity_heatmap(similarity(10), [[1, 2]], tmp_path / "h.png", eps=0.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eps_below_every_similarity_still_shows():
    fig = heatmap_figure(similarity(6), [], None, eps=0.3)
    cbar, = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert cbar.get_ylim()[0] <= 0.3


def legend_title(fig) -> str:
    legend, = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    return legend.get_title().get_text()


def test_the_legend_says_every_pair_reaches_eps_only_where_it_does():
    S = torch.tensor([[1.0, 0.9, 0.9], [0.9, 1.0, 0.2], [0.9, 0.2, 1.0]])  # anchor set {0, 1, 2}: S[1, 2] < eps
    assert "for every pair" not in legend_title(heatmap_figure(S, [[0, 1, 2]], eps=0.85))
    assert "some pairs are below it" in legend_title(heatmap_figure(S, [[0, 1, 2]], eps=0.85))
    assert "similarity >= eps = 0.85 for every pair" in legend_title(heatmap_figure(S, [[0, 1]], eps=0.85))


@pytest.mark.parametrize("S, sets, eps, match", [
    (torch.ones(3, 4), [], 0.5, r"square \(L, L\) matrix, got shape \(3, 4\)"),
    (torch.ones(0, 0), [], 0.5, "S has no layers"),
    (torch.full((3, 3), float("nan")), [], 0.5, "NaN or Inf"),
    (torch.eye(3), [[1, 5]], 0.5, r"sets\[0\] \[1, 5\] holds layer 5, outside \[0, 3\)"),
    (torch.eye(3), [[-1, 1]], 0.5, "holds layer -1, outside"),
    (torch.eye(3), [[0, 1], [1, 2]], 0.5, r"sets\[1\] \[1, 2\] holds layer 1 and so does sets\[0\]"),
    (torch.eye(3), [[0, 1.0]], 0.5, "not a layer index"),
    (torch.eye(3), [], 2.0, r"eps must be a number in \[0, 1\]"),
])
def test_bad_input_is_named(S, sets, eps, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        similarity_heatmap(S, sets, tmp_path / "h.png", eps=eps)
    assert not (tmp_path / "h.png").exists()
