"""Parity with PEFT: method="lora" is PEFT LoRA, and every method exports to an equivalent PEFT LoRA."""
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import sharelora_kernels as sk
import sharelora_kernels.export
from tiny_models import METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_family, tiny_model, token_batch


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family, targets", [("llama", TARGETS), ("gpt2", ["c_attn", "c_fc", "mlp.c_proj"])])
def test_lora_equals_peft_lora_outputs_and_gradients(family, targets):
    """Also for GPT-2's Conv1D bases (PEFT's fan_in_fan_out)."""
    base = (tiny_model("llama") if family == "llama" else tiny_family(family)).double()
    ours = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(method="lora", r=4, alpha=12, target_modules=targets))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets, lora_dropout=0.0,
                                                                fan_in_fan_out=family == "gpt2"))
    randomize_adapters(ours)
    with torch.no_grad():  # same values in both
        for name in ours.sharelora_plan.modules:
            path = ours.get_submodule(name).lora_paths[0]
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(path.A)
            peft_layer.lora_B["default"].weight.copy_(path.B)
    ids = token_batch(seed=11)
    out, ref = ours(ids).logits, peft_model(ids).logits
    assert rel_err(out, ref) < 1e-12
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for name in ours.sharelora_plan.modules:
        path = ours.get_submodule(name).lora_paths[0]
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert rel_err(path.A.grad, peft_layer.lora_A["default"].weight.grad) < 1e-10
        assert rel_err(path.B.grad, peft_layer.lora_B["default"].weight.grad) < 1e-10


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_export_loads_in_peft_with_same_outputs_after_training(name, tmp_path):
    base = tiny_model("mistral")
    model = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(target_modules=TARGETS, alpha=6, **METHOD_CONFIGS[name]))
    randomize_adapters(model, std=0.1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        opt.zero_grad()
        model(token_batch(seed=20 + step), labels=token_batch(seed=20 + step)).loss.backward()
        opt.step()
    model.eval()
    sk.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(TARGETS)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = token_batch(seed=99)
    with torch.no_grad():
        out, ref, plain = model(ids).logits, loaded(ids).logits, base(ids).logits
    assert rel_err(out, plain) > 1e-3  # the adapters do something
    assert rel_err(ref, out) <= 1e-5


@pytest.mark.parametrize("serving", [None, "vllm"])
def test_export_inside_disable_adapters_writes_the_adapter(serving, tmp_path):
    """Disabled adapters still exist: the export is the same as outside the block."""
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_gate"]))
    randomize_adapters(model)
    sk.export_peft(model, tmp_path / "enabled", serving=serving)
    with sk.disable_adapters(model):
        sk.export_peft(model, tmp_path / "disabled", serving=serving)
    assert (tmp_path / "enabled" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "disabled" / "adapter_model.safetensors").read_bytes()


def test_export_of_several_active_adapters_says_how_to_pick_one(tmp_path):
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(r=2, target_modules=TARGETS), adapter_name="a")
    sk.apply(model, sk.ShareLoRAConfig(r=2, target_modules=TARGETS), adapter_name="b")
    sk.set_adapter(model, ["a", "b"])
    with pytest.raises(ValueError, match=r"export_peft writes the active adapter, and this model has 2 active "
                                         r"\(\['a', 'b'\]; .*sharelora_kernels.set_adapter\(model, name\)"):
        sk.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    sk.set_adapter(model, "b")
    sk.export_peft(model, tmp_path / "out")


@pytest.mark.parametrize("engine", ["vllm", "tgi"])
def test_serving_export_pads_ranks_and_keeps_outputs(engine, tmp_path):
    base = tiny_model("llama")
    model = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(target_modules=TARGETS, alpha=6, **METHOD_CONFIGS["bishare_gate"]))
    randomize_adapters(model, std=0.1)
    plain, served = tmp_path / "plain", tmp_path / "served"
    sk.export_peft(model, plain)
    sk.export_peft(model, served, serving=engine)
    cfg = json.loads((served / "adapter_config.json").read_text())
    assert set(cfg) <= set(sk.export.SERVING_CONFIG_KEYS)
    assert "rank_pattern" not in cfg and "alpha_pattern" not in cfg
    assert cfg["r"] in sk.export.SERVING_RANKS and cfg["r"] == 8 and cfg["lora_alpha"] == cfg["r"]
    assert cfg["bias"] == "none" and cfg["modules_to_save"] is None and not cfg["use_rslora"]
    assert set(cfg["target_modules"]) <= set(sk.export.SERVED_MODULES)
    ids = token_batch(seed=5)
    with torch.no_grad():
        want = PeftModel.from_pretrained(copy.deepcopy(base), plain).eval()(ids).logits
        got = PeftModel.from_pretrained(copy.deepcopy(base), served).eval()(ids).logits
    assert rel_err(got, want) <= 1e-6


def test_serving_export_refuses_what_no_engine_serves(tmp_path):
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(method="lora", r=300, target_modules=TARGETS))
    with pytest.raises(ValueError, match="rank 300 exceeds"):
        sk.export_peft(model, tmp_path, serving="vllm")
    net = tiny_model()
    net.model.layers[0].mlp.add_module("adapter_proj", torch.nn.Linear(32, 32))
    model = sk.apply(net, sk.ShareLoRAConfig(method="lora", r=2, target_modules=["q_proj", "adapter_proj"]))
    with pytest.raises(ValueError, match="not on module 'adapter_proj'"):
        sk.export_peft(model, tmp_path, serving="tgi")
    with pytest.raises(ValueError, match="serving must be"):
        sk.export_peft(model, tmp_path, serving="triton-server")


def test_export_records_the_task_so_auto_peft_loads_it(tmp_path):
    """task_type CAUSAL_LM and the base's path: AutoPeftModelForCausalLM rebuilds base + adapter alone."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    tiny_model("llama", layers=2).save_pretrained(tmp_path / "base")
    model = sk.apply(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                     sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_slice"])).eval()
    randomize_adapters(model, std=0.1)
    sk.export_peft(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = token_batch(seed=5)
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) <= 1e-5


def test_export_of_a_compiled_model_is_the_models_and_its_two_files_change_as_one(tmp_path, monkeypatch):
    base = tiny_model(layers=2)
    model = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(method="share_a", r=3, target_modules=TARGETS))
    randomize_adapters(model)
    sk.export_peft(torch.compile(model), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not any("_orig_mod" in t for t in config["target_modules"])
    ids = token_batch()
    with torch.no_grad():
        exported = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = json.dumps  # a second export interrupted before its config is made leaves the first whole

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sk.export.json, "dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sk.export_peft(sk.apply(tiny_model(layers=2), sk.ShareLoRAConfig(r=5, target_modules=TARGETS)), tmp_path)
    monkeypatch.setattr(sk.export.json, "dumps", real)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
