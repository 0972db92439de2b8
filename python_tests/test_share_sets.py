"""share_sets on hand-built similarity matrices and invariants on random ones."""
import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharelora_kernels.similarity import share_sets


def sim(L, pairs, base=0.5):
    """Symmetric (L, L) similarity with 1 on the diagonal, ``base`` elsewhere, and the given pair values."""
    s = np.full((L, L), base)
    np.fill_diagonal(s, 1.0)
    for (i, j), v in pairs.items():
        s[i, j] = s[j, i] = v
    return s


CHAIN = sim(4, {(0, 1): 0.9, (1, 2): 0.95, (0, 2): 0.7})
FAR = sim(4, {(0, 3): 0.95, (0, 1): 0.9, (2, 3): 0.88})


@pytest.mark.parametrize("S, method, contiguous, expected", [
    # a chain: complete keeps the best pair and refuses 0 (S(0,2) too low); anchor takes 0's neighbour
    (CHAIN, "complete", False, [[0], [1, 2], [3]]),
    (CHAIN, "anchor", False, [[0, 1], [2], [3]]),
    # a far pair: only the non-contiguous constructions may join 0 and 3
    (FAR, "complete", False, [[0, 3], [1], [2]]),
    (FAR, "complete", True, [[0, 1], [2, 3]]),
    (FAR, "anchor", False, [[0, 1, 3], [2]]),
    (FAR, "anchor", True, [[0, 1], [2, 3]]),
    # growth by a non-adjacent layer is refused when contiguous
    (sim(4, {(0, 1): 0.95, (0, 3): 0.92, (1, 3): 0.92}), "complete", False, [[0, 1, 3], [2]]),
    (sim(4, {(0, 1): 0.95, (0, 3): 0.92, (1, 3): 0.92}), "complete", True, [[0, 1], [2], [3]]),
    # growth at the lower end of a contiguous range
    (sim(4, {(1, 2): 0.95, (0, 1): 0.9, (0, 2): 0.9}), "complete", True, [[0, 1, 2], [3]]),
])
def test_hand_built(S, method, contiguous, expected):
    assert share_sets(S, 0.85, method=method, contiguous=contiguous) == expected


def test_ties_go_by_ascending_pair():
    # (0,1), (1,2), (2,3) tie: (0,1) opens first, (1,2) then fails on S(0,2), (2,3) opens the second set
    S = sim(4, {(0, 1): 0.9, (1, 2): 0.9, (2, 3): 0.9})
    assert share_sets(S, 0.85) == [[0, 1], [2, 3]]
    # (0,2) and (1,2) tie: (0,2) comes first, then 1 is refused on S(0,1)
    assert share_sets(sim(3, {(0, 2): 0.9, (1, 2): 0.9}), 0.85) == [[0, 2], [1]]
    # a strictly better pair wins over a tie-break
    assert share_sets(sim(3, {(0, 2): 0.9, (1, 2): 0.91}), 0.85) == [[0], [1, 2]]


def test_threshold_is_inclusive_and_bounds():
    S = sim(3, {(0, 1): 0.85})
    assert share_sets(S, 0.85) == [[0, 1], [2]]
    assert share_sets(S, 0.850001) == [[0], [1], [2]]
    assert share_sets(S, 0.0) == [[0, 1, 2]]
    assert share_sets(S, 1.0) == [[0], [1], [2]]
    assert share_sets(np.ones((1, 1)), 0.9) == [[0]]


def test_accepts_torch_and_lists():
    S = CHAIN
    assert share_sets(torch.tensor(S), 0.85) == share_sets(S.tolist(), 0.85) == share_sets(S, 0.85)


@pytest.mark.parametrize("eps", [np.float32(0.85), np.float64(0.85), np.array(0.85), torch.tensor(0.85),
                                 torch.tensor(0.85, dtype=torch.float64), Fraction(17, 20)],
                         ids=["np.float32", "np.float64", "0-d array", "0-d tensor", "0-d float64 tensor", "Fraction"])
def test_accepts_real_scalars(eps):
    assert share_sets(CHAIN, eps) == share_sets(CHAIN, 0.85) == [[0], [1, 2], [3]]
    assert share_sets(CHAIN, np.int64(1)) == share_sets(CHAIN, torch.tensor(1)) == share_sets(CHAIN, 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 1.5}, "eps must be a number in"),
    ({"eps": -0.1}, "eps must be a number in"),
    ({"eps": float("nan")}, "eps must be a number in"),
    ({"eps": np.float32("nan")}, "eps must be a number in"),
    ({"eps": torch.tensor(1.5)}, "eps must be a number in"),
    ({"eps": torch.tensor([0.5])}, "eps must be a number in"),  # not 0-d
    ({"eps": True}, "eps must be a number in"),
    ({"eps": torch.tensor(True)}, "eps must be a number in"),
    ({"eps": "0.5"}, "eps must be a number in"),
    ({"eps": 0.8, "method": "greedy"}, "method must be one of"),
    ({"eps": 0.8, "contiguous": "no"}, "contiguous must be true or false, got 'no'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        share_sets(CHAIN, **kwargs)


def test_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        share_sets(np.ones((3, 4)), 0.8)
    asym = CHAIN.copy()
    asym[0, 1] = 0.6
    with pytest.raises(ValueError, match=r"symmetric.*S\[0, 1\]"):
        share_sets(asym, 0.8)
    bad = CHAIN.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        share_sets(bad, 0.8)
    with pytest.raises(ValueError, match=r"S\[0, 0\] = 0.0: this looks like a distance D; pass S = 1 - D"):
        share_sets(1 - CHAIN, 0.8)
    with pytest.raises(ValueError, match=r"with S\[i, i\] = 1, but S\[0, 0\] = 2.0$"):
        share_sets(2 * CHAIN, 0.8)
    off = CHAIN.copy()
    off[0, 3] = off[3, 0] = -0.2
    with pytest.raises(ValueError, match=r"in \[0, 1\], but S\[0, 3\] = -0.2"):
        share_sets(off, 0.8)


@st.composite
def similarity_matrices(draw):
    L = draw(st.integers(1, 12))
    levels = draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))  # few levels: many ties
    values = draw(st.lists(st.sampled_from(levels), min_size=L * L, max_size=L * L))
    s = np.array(values, dtype=np.float64).reshape(L, L)
    s = np.triu(s, 1)
    s = s + s.T + np.eye(L)
    return s


@settings(max_examples=150, deadline=None)
@given(similarity_matrices(), st.floats(0.0, 1.0), st.sampled_from(["complete", "anchor"]), st.booleans())
def test_invariants(S, eps, method, contiguous):
    L = len(S)
    sets = share_sets(S, eps, method=method, contiguous=contiguous)
    # a partition of the layers, each set sorted, sets ordered by first layer
    assert sorted(i for g in sets for i in g) == list(range(L))
    assert all(g == sorted(g) for g in sets)
    assert [g[0] for g in sets] == sorted(g[0] for g in sets)
    assert share_sets(S, eps, method=method, contiguous=contiguous) == sets  # deterministic
    for g in sets:
        if method == "complete":
            assert all(S[i, j] >= eps for i in g for j in g)
        else:
            assert all(S[g[0], j] >= eps for j in g)
        if contiguous:
            assert g == list(range(g[0], g[-1] + 1))
    # two layers left alone would have been joined
    alone = [g[0] for g in sets if len(g) == 1]
    for i in alone:
        for j in alone:
            if i < j and (not contiguous or j == i + 1):
                assert S[i, j] < eps


def test_sweep_counts_on_llama7b_shapes():
    """The paper's figures: LoRA r=8 on LLaMA-7B shapes is 14,024,704; the paper's sets leave 22 slots."""
    from sharelora_kernels.config import ShareLoRAConfig
    from sharelora_kernels.plan import ModuleInfo
    from sharelora_kernels.similarity import sweep_thresholds

    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
              "up_proj": (4096, 11008), "down_proj": (11008, 4096)}
    modules = [ModuleInfo(f"model.layers.{l}.{t}", l, t, k, n) for l in range(32) for t, (k, n) in shapes.items()]
    paper = [[16, 17], [18, 19], [20, 21, 22], [23, 24, 25, 26, 27], [28, 29, 30]]
    S = np.full((32, 32), 0.5)
    for g in paper:
        S[np.ix_(g, g)] = 0.95
    np.fill_diagonal(S, 1.0)
    high, low = sweep_thresholds(S, [0.9, 0.4], ShareLoRAConfig(r=8), modules, 32)
    assert high.sets == paper and high.slots == dict.fromkeys(shapes, 22)
    assert high.lora_params == 14_024_704
    assert high.share_params == 14_024_704 * 22 // 32
    assert high.expanded_r == dict.fromkeys(shapes, 11)
    assert high.share_expanded_params == 14_024_704 * 22 * 11 // (32 * 8)
    assert high.share_expanded_params <= high.lora_params
    # at 0.4 every pair is eligible, but the 0.95 pairs go first and two sets never merge
    assert low.sets == [list(range(16)) + [31]] + paper
    assert low.slots == dict.fromkeys(shapes, 6) and low.expanded_r == dict.fromkeys(shapes, 42)


def test_sweep_and_label_report_the_ranks_the_plan_builds_per_module_type():
    """q_proj adapted in layers 0-3, v_proj in 0-1 only, one set {0..3}: each type has one slot, and
    expand_rank builds q_proj at floor(4 / 1 * 8) = 32 and v_proj at floor(2 / 1 * 8) = 16."""
    from sharelora_kernels.cli.fitting import label
    from sharelora_kernels.config import ShareLoRAConfig
    from sharelora_kernels.plan import ModuleInfo, build_plan
    from sharelora_kernels.similarity import sweep_thresholds

    modules = [ModuleInfo(f"model.layers.{l}.{t}", l, t, 8, 8) for t, ls in (("q_proj", range(4)), ("v_proj", range(2)))
               for l in ls]
    point, = sweep_thresholds(np.ones((4, 4)), [0.5], ShareLoRAConfig(r=8), modules, 4)
    assert point.sets == [[0, 1, 2, 3]]
    assert point.slots == {"q_proj": 1, "v_proj": 1} and point.expanded_r == {"q_proj": 32, "v_proj": 16}
    config = ShareLoRAConfig(method="similarity", r=8, share_sets=point.sets, expand_rank=True)
    plan = build_plan(config, modules, 4)
    assert {t: plan.tensors[f"{t}.layers0-3.A"].shape[0] for t in ("q_proj", "v_proj")} == point.expanded_r
    assert plan.parameter_count() == point.share_expanded_params
    assert label(config, modules, 4) == "ShareLoRA r=q_proj 32, v_proj 16 (expanded)"
    assert label(config, modules[:4], 4) == "ShareLoRA r=32 (expanded)"
    head = [ModuleInfo("lm_head", None, "lm_head", 8, 8)]  # no module in the numbered layers: r as configured
    assert label(dataclasses.replace(config, share_sets=[]), head, 4) == "ShareLoRA r=8"
    with pytest.raises(ValueError, match=r"share_sets\[0\] \[0, 1, 2, 3\] names no layer that holds a target module"):
        label(config, head, 4)
    assert label(config, modules[:4] + head, 4) == "ShareLoRA r=q_proj 32, lm_head 8 (expanded)"


def test_sweep_ignores_the_config_method_and_its_per_module_patterns():
    """A LoRA config with rank_pattern / alpha_pattern (method 'lora' only) sweeps as at config.r."""
    from sharelora_kernels.config import ShareLoRAConfig
    from sharelora_kernels.plan import ModuleInfo
    from sharelora_kernels.similarity import sweep_thresholds

    modules = [ModuleInfo(f"model.layers.{l}.q_proj", l, "q_proj", 8, 8) for l in range(3)]
    S = np.array([[1.0, 0.9, 0.2], [0.9, 1.0, 0.2], [0.2, 0.2, 1.0]])
    plain = sweep_thresholds(S, [0.5], ShareLoRAConfig(r=2), modules, 3)
    patterned = ShareLoRAConfig(r=2, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 8.0})
    assert sweep_thresholds(S, [0.5], patterned, modules, 3) == plain
    assert plain[0].lora_params == 3 * 2 * 16 and plain[0].share_params == 2 * 2 * 16
