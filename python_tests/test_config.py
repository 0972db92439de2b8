import dataclasses

import pytest

from sharelora_kernels import ShareLoRAConfig


def test_json_round_trip_keeps_every_field():
    c = ShareLoRAConfig(method="bishare", shape_transform="gate", gate_dims=(64, 32), alpha=7.5, dropout=0.1,
                        target_modules=["q_proj", "up_proj"], use_rslora=True, exclude_modules=r".*\.3\..*",
                        layers_to_transform=[0, 2], layers_pattern="layers", modules_to_save=["score"])
    back = ShareLoRAConfig.from_json(c.to_json())
    assert back == c
    assert back.gate_dims == (64, 32)
    lora = ShareLoRAConfig(r=4, target_modules="all-linear", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0},
                           modules_to_save=[])
    assert ShareLoRAConfig.from_json(lora.to_json()) == lora


def test_config_json_from_before_the_targeting_fields_still_reads():
    """A sharelora_config.json written before exclude_modules & co. existed gets their defaults."""
    old = {"method": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj"], "use_rslora": False,
           "share_sets": [], "expand_rank": False, "local_r": 2, "intra_r": 4, "inter_r": 32, "shape_transform": "slice",
           "slice_policy": "center", "gate_rank": 1, "gate_dims": [1024, 1024], "kron_dim": 256, "init_a": "kaiming"}
    c = ShareLoRAConfig.from_dict(old)
    assert c.target_modules == ["q_proj"] and c.modules_to_save is None and c.exclude_modules is None
    assert c.rank_pattern == {} and c.layers_to_transform is None


def test_target_modules_defaults_to_none_and_all_linear_is_case_insensitive():
    assert ShareLoRAConfig().target_modules is None
    assert ShareLoRAConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"
    assert ShareLoRAConfig(target_modules=("q_proj", "v_proj")).target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("transform, ranks", [("slice", (2, 4, 32)), ("gate", (2, 8, 16)), ("kron", (2, 4, 16))])
def test_bishare_paper_default_ranks(transform, ranks):
    c = ShareLoRAConfig(method="bishare", shape_transform=transform)
    assert c.bishare_ranks() == ranks and c.local_r is None
    assert ShareLoRAConfig(method="bishare", shape_transform=transform, intra_r=1).bishare_ranks() == (2, 1, ranks[2])
    # the defaults follow the transform however it changes: assigned, replaced, or edited in a saved file
    other = ShareLoRAConfig(method="bishare", shape_transform="slice" if transform != "slice" else "kron")
    other.shape_transform = transform
    other.validate()
    assert other.bishare_ranks() == ranks
    assert dataclasses.replace(ShareLoRAConfig(method="bishare"), shape_transform=transform).bishare_ranks() == ranks
    saved = ShareLoRAConfig(method="bishare").to_dict()
    assert ShareLoRAConfig.from_dict({**saved, "shape_transform": transform}).bishare_ranks() == ranks


@pytest.mark.parametrize("field, value", [("shape_transform", "kron"), ("slice_policy", "top_left"), ("gate_rank", 3),
                                          ("local_r", 5), ("intra_r", 0), ("inter_r", 16)])
@pytest.mark.parametrize("method", ["lora", "similarity", "share_ab"])
def test_bishare_fields_are_refused_under_another_method(method, field, value):
    with pytest.raises(ValueError, match=f"{field} only applies to method='bishare', not '{method}'"):
        ShareLoRAConfig(method=method, **{field: value})
    # what earlier versions saved for every method (the slice ranks filled in) still reads
    ShareLoRAConfig(method=method, local_r=2, intra_r=4, inter_r=32)


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="dora"), "method"),
    (dict(r=0), "r"),
    (dict(r=2.5), "r"),
    (dict(method="bishare", local_r=-1), "local_r"),
    (dict(method="bishare", inter_r=-3), "inter_r"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="q_proj["), "target_modules 'q_proj\\[' is not a valid regular expression"),
    (dict(target_modules=""), "target_modules"),
    (dict(target_modules=["q_proj", ""]), "target_modules"),
    (dict(exclude_modules=[]), "exclude_modules"),
    (dict(exclude_modules="(unclosed"), "exclude_modules"),
    (dict(layers_to_transform=[0, -1]), "layers_to_transform"),
    (dict(layers_to_transform=[]), "layers_to_transform"),
    (dict(layers_to_transform=[1.5]), "layers_to_transform"),
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "layers_to_transform cannot be used with a regular"),
    (dict(layers_pattern="layers"), "layers_pattern only applies together with layers_to_transform"),
    (dict(modules_to_save="classifier"), "modules_to_save"),
    (dict(modules_to_save=["classifier", 3]), "modules_to_save"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be >= 1"),
    (dict(alpha_pattern={"q_proj": -1.0}), r"alpha_pattern\['q_proj'\] must be a positive"),
    (dict(rank_pattern=["q_proj"]), "rank_pattern"),
    (dict(rank_pattern={"q_proj(": 2}), r"rank_pattern key 'q_proj\(' is not a valid regular expression"),
    (dict(alpha_pattern={"q_proj[": 2.0}), r"alpha_pattern key 'q_proj\[' is not a valid regular expression"),
    (dict(layers_to_transform=[0], layers_pattern=["h", "layers("]), r"layers_pattern 'layers\(' is not a valid"),
    (dict(method="share_a", rank_pattern={"q_proj": 4}), "rank_pattern only applies to method='lora'"),
    (dict(alpha=float("inf")), "alpha"),
    (dict(alpha="16"), "alpha"),
    (dict(use_rslora="yes"), "use_rslora"),
    (dict(method="similarity", share_sets=[["a", "b"]]), "share_sets"),
    (dict(method="similarity", share_sets=[3, 4]), "share_sets"),
    (dict(shape_transform="rotate"), "shape_transform"),
    (dict(slice_policy="middle"), "slice_policy"),
    (dict(gate_rank=0), "gate_rank"),
    (dict(gate_dims=(8,)), "gate_dims"),
    (dict(kron_dim=0), "kron_dim"),
    (dict(method="similarity", share_sets=[[1, 2], [2, 3]]), "overlap"),
    (dict(method="similarity", share_sets=[[1, 1]]), "share_sets"),
    (dict(method="similarity", share_sets=[[-1, 2]]), "share_sets"),
    (dict(method="similarity", share_sets=[[0, 1], []]), r"share_sets\[1\] is empty"),
    (dict(method="lora", share_sets=[[1, 2]]), "share_sets"),
    (dict(method="lora", expand_rank=True), "expand_rank"),
    (dict(method="bishare", local_r=0, intra_r=0, inter_r=0), "local_r"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShareLoRAConfig(**kwargs)


def test_numpy_numbers_become_python_numbers():
    import numpy as np

    c = ShareLoRAConfig(r=np.int64(4), alpha=np.float32(8), dropout=np.float64(0.1), gate_dims=(np.int32(16), 8),
                        layers_to_transform=[np.int64(1)], rank_pattern={"q_proj": np.int64(2)},
                        alpha_pattern={"q_proj": np.float32(4)})
    assert (c.r, c.alpha, c.dropout, c.gate_dims, c.layers_to_transform) == (4, 8.0, 0.1, (16, 8), [1])
    assert type(c.r) is int and type(c.alpha) is float and type(c.gate_dims[0]) is int
    assert type(c.rank_pattern["q_proj"]) is int and type(c.alpha_pattern["q_proj"]) is float
    assert ShareLoRAConfig.from_json(c.to_json()) == c  # JSON takes it (numpy's numbers it does not)
    for layers, want in ((np.arange(2, 5), [2, 3, 4]), (np.int64(2), 2)):  # an array: numpy's broadcast error
        assert ShareLoRAConfig(layers_to_transform=layers).layers_to_transform == want


@pytest.mark.parametrize("method", ["similarity", "lora"])
def test_numpy_array_share_sets_are_refused_by_type(method):
    """A numpy array of sets is not a list of lists: the type error, not numpy's ambiguous truth value."""
    import numpy as np

    with pytest.raises(ValueError, match="share_sets must be a list of lists of layer indices"):
        ShareLoRAConfig(method=method, share_sets=np.array([[0, 1], [2, 3]]))


def test_fields_assigned_after_construction_are_normalized_by_validate():
    """validate (which apply re-runs) normalizes as the constructor does: sets sorted, numpy ints made ints."""
    import numpy as np

    c = ShareLoRAConfig(method="similarity")
    c.share_sets, c.gate_dims = [[3, 1], [np.int64(2), np.int32(0)]], [np.int64(8), 4]
    c.validate()
    assert c.share_sets == [[1, 3], [0, 2]] and type(c.share_sets[1][0]) is int and c.gate_dims == (8, 4)
    assert ShareLoRAConfig.from_json(c.to_json()) == c
    for field, value in (("share_sets", [[0, 1.5]]), ("share_sets", [[0, 1], [1, 2]]), ("gate_dims", 8)):
        c = ShareLoRAConfig(method="similarity")
        setattr(c, field, value)
        with pytest.raises(ValueError, match=field):
            c.validate()


def test_unknown_json_key_and_wrong_type_are_refused():
    with pytest.raises(ValueError, match="unknown config key"):
        ShareLoRAConfig.from_json('{"method": "lora", "rank": 8}')
    with pytest.raises(ValueError, match="r must be an integer"):
        ShareLoRAConfig.from_json('{"r": "8"}')
    with pytest.raises(ValueError, match="object"):
        ShareLoRAConfig.from_json('[1, 2]')


def test_share_set_out_of_range_is_named():
    c = ShareLoRAConfig(method="similarity", share_sets=[[2, 7]])
    with pytest.raises(ValueError, match="layer 7"):
        c.check_layers(4)
