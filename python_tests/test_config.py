import pytest

from sharelora_kernels import ShareLoRAConfig


def test_json_round_trip_keeps_every_field():
    c = ShareLoRAConfig(method="bishare", shape_transform="gate", gate_dims=(64, 32), alpha=7.5, dropout=0.1,
                        target_modules=["q_proj", "up_proj"], use_rslora=True)
    back = ShareLoRAConfig.from_json(c.to_json())
    assert back == c
    assert back.gate_dims == (64, 32)


@pytest.mark.parametrize("transform, ranks", [("slice", (2, 4, 32)), ("gate", (2, 8, 16)), ("kron", (2, 4, 16))])
def test_bishare_paper_default_ranks(transform, ranks):
    c = ShareLoRAConfig(method="bishare", shape_transform=transform)
    assert (c.local_r, c.intra_r, c.inter_r) == ranks
    assert ShareLoRAConfig(method="bishare", shape_transform=transform, intra_r=1).intra_r == 1


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="dora"), "method"),
    (dict(r=0), "r"),
    (dict(r=2.5), "r"),
    (dict(method="bishare", local_r=-1), "local_r"),
    (dict(method="bishare", inter_r=-3), "inter_r"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="q_proj"), "target_modules"),
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
    (dict(method="lora", share_sets=[[1, 2]]), "share_sets"),
    (dict(method="lora", expand_rank=True), "expand_rank"),
    (dict(method="bishare", local_r=0, intra_r=0, inter_r=0), "local_r"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShareLoRAConfig(**kwargs)


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
