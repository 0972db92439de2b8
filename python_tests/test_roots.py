"""Container roots (nn.Sequential / ModuleList) and modules holding hand-wrapped SharedLoRALinear layers."""
import json

import pytest
import torch
import torch.nn as nn
from peft import PeftModel

import sharelora_kernels as sk
from sharelora_kernels.model import adapter_tensors
from tiny_models import randomize_adapters


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 8))


def test_sequential_root_runs_what_it_ran_with_the_store_on_its_first_layer(tmp_path):
    base = mlp()
    model = sk.apply(mlp(), sk.ShareLoRAConfig(method="lora", r=2, target_modules=["0", "2", "4"]))
    assert len(model) == 5 and "sharelora_adapters" not in model._modules
    assert isinstance(model[0].sharelora_adapters["default"], sk.layer.AdapterStore)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        randomize_adapters(model)
        want = model(x)
        assert not torch.allclose(want, base(x))
    assert sk.trainable_parameters(model) == 2 * (8 + 12) + 2 * (12 + 12) + 2 * (12 + 8)
    sk.save(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(sk.load(mlp(), tmp_path)(x), want, rtol=0, atol=0)


def test_module_list_root_keeps_its_length():
    layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    sk.apply(layers, sk.ShareLoRAConfig(method="share_a", r=2, target_modules=r"\d"))
    assert len(layers) == 3 and all(isinstance(m, sk.SharedLoRALinear) for m in layers)
    assert layers[0].lora_paths[0].A is layers[2].lora_paths[0].A


class HandWrapped(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = sk.SharedLoRALinear(nn.Linear(8, 6), r=2, alpha=4)
        self.blocks = nn.ModuleList([sk.SharedLoRALinear(nn.Linear(6, 6), r=3, alpha=3, dropout=0.0) for _ in range(2)])

    def forward(self, x):
        x = self.proj(x)
        for b in self.blocks:
            x = torch.relu(b(x))
        return x


def test_hand_wrapped_layers_save_load_breakdown_and_export(tmp_path):
    model = HandWrapped()
    randomize_adapters(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = model(x)
    b = sk.parameter_breakdown(model)
    assert b["part:lora"] == sk.trainable_parameters(model) == 2 * (8 + 6) + 2 * 3 * (6 + 6)
    assert set(adapter_tensors(model)) == {"proj.adapters.A", "proj.adapters.B", "blocks.0.adapters.A",
                                           "blocks.0.adapters.B", "blocks.1.adapters.A", "blocks.1.adapters.B"}
    sk.save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "sharelora_config.json").exists()  # no config: the plan is the layers
    fresh = HandWrapped()  # same base weights, other adapters
    randomize_adapters(fresh, seed=5)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), want)
        torch.testing.assert_close(sk.load(fresh, tmp_path / "ckpt")(x), want, rtol=0, atol=0)
    other = HandWrapped()
    other.blocks[1] = sk.SharedLoRALinear(nn.Linear(6, 6), r=4)
    with pytest.raises(ValueError, match="rank of path 0 .plain, lora. of module blocks.1: checkpoint has 3, model has 4"):
        sk.load(other, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="hand-wrapped SharedLoRALinear layers .no config.: wrap the same modules"):
        sk.load(nn.Sequential(nn.Linear(8, 6)), tmp_path / "ckpt")
    sk.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"proj": 2} and cfg["r"] == 3  # the most common rank is global
    plain = HandWrapped()
    base = nn.Module()
    base.proj = nn.Linear(8, 6)
    base.blocks = nn.ModuleList([nn.Linear(6, 6) for _ in range(2)])
    base.load_state_dict({k: v for k, v in plain.state_dict().items() if "adapters" not in k})
    base.forward = HandWrapped.forward.__get__(base)
    loaded = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        assert ((loaded(x) - want).abs().max() / want.abs().max()) < 1e-6


def test_a_standalone_layer_saves_and_loads_itself(tmp_path):
    layer = sk.SharedLoRALinear(nn.Linear(5, 7), r=2)
    randomize_adapters(layer)
    sk.save(layer, tmp_path)
    torch.manual_seed(3)
    other = sk.SharedLoRALinear(nn.Linear(5, 7), r=2)
    other.load_state_dict({k: v for k, v in layer.state_dict().items() if "adapters" not in k}, strict=False)
    x = torch.randn(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(sk.load(other, tmp_path)(x), layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="root module itself is a SharedLoRALinear: wrap it in a module"):
        sk.export_peft(layer, tmp_path / "peft")
