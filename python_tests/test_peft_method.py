"""Shared adapters as a PEFT method: get_peft_model, training, save_pretrained / from_pretrained,
PEFT's adapter controls, registration, and bad input, with PEFT itself (CPU, tiny models)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")

from peft import AutoPeftModelForCausalLM, LoraConfig, PeftConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402

import sharelora_kernels as sk  # noqa: E402
from sharelora_kernels.model import adapter_names  # noqa: E402
from tiny_models import METHOD_CONFIGS, TARGETS, logits, randomize_adapters, tiny_family, tiny_model, token_batch  # noqa: E402


def train_steps(model, ids, steps=3, lr=0.3, **kw):
    """SGD steps on the model's trainable tensors (train mode), then eval mode."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(ids, **kw)
        (out.loss if out.loss is not None else out.logits.pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def saved_keys(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def plan_of(peft_model, name="default"):
    return peft_model.base_model.model.sharelora_plans[name]


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_every_method_trains_saves_and_loads_with_equal_logits(name, tmp_path):
    base = tiny_model(layers=4)
    ids = token_batch()
    config = sk.ShareLoRAPeftConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **METHOD_CONFIGS[name])
    model = train_steps(get_peft_model(copy.deepcopy(base), config), ids, labels=ids)
    trained = logits(model, ids)
    assert (trained - logits(base, ids)).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)
    assert sorted(keys) == sorted(f"base_model.model.sharelora_adapters.{t.replace('.', '/')}"
                                  for t in plan_of(model).tensors)  # each shared tensor once
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SHARELORA"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, ids), trained)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode, as PEFT


def nf4_llama(folder):
    """The tiny LLaMA (4 layers) loaded in bitsandbytes nf4, float32 compute, train mode (bitsandbytes'
    CPU eval kernel repacks the weight and computes slightly differently, see test_quantized.py)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model(layers=4).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu").train()


@pytest.mark.parametrize("family", ["gpt2", "bert_seq_cls", "nf4_llama"])
def test_every_method_round_trips_on_conv1d_a_classifier_and_a_4bit_base(family, tmp_path):
    """GPT-2 (Conv1D), a BERT classifier (its head a module to save) and a 4-bit LLaMA: each method
    trains 3 steps, saves each shared tensor once and loads with equal logits."""
    if family == "nf4_llama":
        pytest.importorskip("bitsandbytes")
        base, task = nf4_llama(tmp_path / "base"), "CAUSAL_LM"
    elif family == "gpt2":
        base, task = tiny_family("gpt2", layers=4), "CAUSAL_LM"
    else:
        base, task = tiny_family("bert", head="seq_cls", layers=4, num_labels=3), "SEQ_CLS"
    ids = token_batch()
    labels = ids if task == "CAUSAL_LM" else torch.tensor([0, 2])
    mode = (lambda m: m.train()) if family == "nf4_llama" else (lambda m: m.eval())
    before = logits(mode(base), ids)
    for name, fields in METHOD_CONFIGS.items():
        model = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(task_type=task, **fields))
        trained = logits(mode(train_steps(model, ids, labels=labels)), ids)
        assert (trained - before).abs().max() > 1e-5, name  # it trained
        model.save_pretrained(tmp_path / name)
        heads = 2 if task == "SEQ_CLS" else 0  # the classifier's weight and bias
        assert len(saved_keys(tmp_path / name)) == len(plan_of(model).tensors) + heads, name
        loaded = mode(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name))
        assert torch.equal(logits(loaded, ids), trained), name


def test_a_config_edited_after_get_peft_model_is_refused_at_save(tmp_path):
    """PEFT saves its live config: r edited after get_peft_model was written beside rank-4 tensors, a
    folder from_pretrained then refused. save_pretrained names the change; set back, it saves and loads."""
    base = tiny_model(layers=2)
    config = sk.ShareLoRAPeftConfig(method="lora", r=4, target_modules=["q_proj"])
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(model)
    config.r = 2
    with pytest.raises(ValueError, match=r"config of adapter 'default' was changed after apply \(r: 4 -> 2\)"):
        model.save_pretrained(tmp_path)
    config.r = 4
    model.save_pretrained(tmp_path)
    ids = token_batch()
    assert torch.equal(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), ids), logits(model, ids))


def test_trainable_count_disable_merge_unload_and_resume(tmp_path):
    base = tiny_model(layers=2)
    ids = token_batch()
    config = sk.ShareLoRAPeftConfig(method="share_ab", r=4, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == plan_of(model).parameter_count() == sk.trainable_parameters(model)
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    train_steps(model, ids, labels=ids)
    trained = logits(model, ids)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(base, ids))
    assert torch.equal(logits(model, ids), trained)
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters() == (trainable, total)
    torch.manual_seed(0)
    train_steps(model, ids, steps=2, labels=ids)
    torch.manual_seed(0)
    train_steps(resumed, ids, steps=2, labels=ids)
    assert torch.equal(logits(resumed, ids), logits(model, ids))  # bit-exact continuation
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is type(base) and type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.allclose(logits(merged, ids), logits(model, ids), atol=1e-5)
    plain = model.unload()
    assert not any("sharelora" in k for k in plain.state_dict())
    assert torch.equal(logits(plain, ids), logits(base, ids))


def test_disable_adapter_on_a_merged_model_gives_the_base():
    """As PEFT's LoRA: disable_adapter unmerges a merged model first (it stays unmerged)."""
    base = tiny_model(layers=2)
    ids = token_batch()
    model = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(method="share_a", r=3, target_modules=TARGETS))
    randomize_adapters(model)
    trained = logits(model, ids)
    model.merge_adapter()
    with model.disable_adapter():
        assert torch.allclose(logits(model, ids), logits(base, ids), atol=1e-5)
    assert torch.allclose(logits(model, ids), trained, atol=1e-5)


def test_safe_merge_and_unload_checks_every_module_before_changing_any():
    bert = tiny_family("bert", head="seq_cls", num_labels=3)
    model = get_peft_model(copy.deepcopy(bert), sk.ShareLoRAPeftConfig(method="lora", r=2, task_type="SEQ_CLS"))
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.model.sharelora_adapters["default"]["bert.encoder.layer.1.output.dense.B"].fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite values into the base weight of module 'bert.encoder.layer.1."
                                         "output.dense'; nothing was merged"):
        model.merge_and_unload(safe_merge=True)
    after = model.state_dict()  # the modules to save's wrapper and every wrapped layer still there, unmerged
    assert after.keys() == before.keys() and all(torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True)
                                                 for k, v in before.items())


def test_named_adapters_each_with_its_own_tensors(tmp_path):
    base = tiny_model(layers=2)
    ids = token_batch()
    model = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(method="share_a", r=3, target_modules=TARGETS))
    model.add_adapter("other", sk.ShareLoRAPeftConfig(method="bishare", target_modules=["q_proj", "o_proj"],
                                                     local_r=1, intra_r=2, inter_r=2))
    assert model.active_adapter == "default" and adapter_names(model.base_model.model) == ["default", "other"]
    assert all(".sharelora_adapters.default." in n for n, p in model.named_parameters() if p.requires_grad)
    train_steps(model, ids, labels=ids)
    first = logits(model, ids)
    model.set_adapter("other")
    assert model.active_adapters == ["other"]
    assert all(".sharelora_adapters.other." in n for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(logits(model, ids), logits(base, ids))  # fresh: B = 0
    train_steps(model, ids, labels=ids)
    other = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert len(saved_keys(tmp_path / "other")) == len(plan_of(model, "other").tensors)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(logits(loaded, ids), first)
    for control in (sk.set_adapter, sk.delete_adapter):  # PEFT keeps its own record: its methods, not ours
        with pytest.raises(ValueError, match=f"this is a PeftModel: call its own {control.__name__}"):
            control(loaded, "other")
        with pytest.raises(ValueError, match=f"belong to the PeftModel around it: call that PeftModel's own "
                                             f"{control.__name__}"):
            control(loaded.base_model.model, "other")
    for control in (sk.unload, sk.merge_and_unload):  # they unwrapped the layers PEFT still lists
        for model_ in (loaded, loaded.base_model.model):
            with pytest.raises(ValueError, match=f"call (its|that PeftModel's) own {control.__name__}"):
                control(model_)
    assert loaded.active_adapters == ["default"] and torch.equal(logits(loaded, ids), first)
    loaded.set_adapter("other")
    assert torch.equal(logits(loaded, ids), other)
    with pytest.warns(UserWarning, match="'default' is active now"):
        loaded.delete_adapter("other")
    assert loaded.active_adapters == ["default"] and torch.equal(logits(loaded, ids), first)
    assert not hasattr(loaded.base_model.model, "sharelora_adapters_other")


def test_low_cpu_mem_usage_makes_only_the_adapter_on_meta_and_loads_it(tmp_path):
    """PEFT's low_cpu_mem_usage: get_peft_model makes the adapter's tensors on the meta device (the
    base keeps its own); from_pretrained and load_adapter fill them from the folder, equal logits."""
    base = tiny_model(layers=2)
    ids = token_batch()
    config = lambda r: sk.ShareLoRAPeftConfig(method="share_a", r=r, target_modules=TARGETS)  # noqa: E731
    model = get_peft_model(copy.deepcopy(base), config(3))
    model.add_adapter("b", config(2))
    randomize_adapters(model)
    first = logits(model, ids)
    model.set_adapter("b")
    randomize_adapters(model, seed=3)
    second = logits(model, ids)
    model.save_pretrained(tmp_path)
    empty = get_peft_model(copy.deepcopy(base), config(3), low_cpu_mem_usage=True)
    meta = [n for n, p in empty.named_parameters() if p.device.type == "meta"]
    assert meta and all(".sharelora_adapters." in n for n in meta)
    pretrained = copy.deepcopy(base)
    for p in pretrained.parameters():
        p._is_hf_initialized = True  # as from_pretrained marks them
    loaded = PeftModel.from_pretrained(pretrained, tmp_path, low_cpu_mem_usage=True)
    loaded.load_adapter(tmp_path / "b", adapter_name="b", low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    wrapped = [m for m in loaded.modules() if isinstance(m, sk.SharedLoRALinear)]
    assert wrapped and not any(m._base[0].weight.is_meta for m in wrapped)  # what unload puts back
    assert torch.equal(logits(loaded, ids), first)
    loaded.set_adapter("b")
    assert torch.equal(logits(loaded, ids), second)


def test_peft_layer_status_sees_each_adapters_tensors():
    """PEFT's get_layer_status / get_model_status report the adapters' requires_grad and devices, as for
    its LoRA (each layer's entry lists the tensors its paths read); set_requires_grad reaches them."""
    model = get_peft_model(tiny_model(layers=2), sk.ShareLoRAPeftConfig(method="share_a", r=2, target_modules=TARGETS))
    model.add_adapter("other", sk.ShareLoRAPeftConfig(r=2, target_modules=["q_proj"]))
    status = model.get_layer_status()
    assert status and all(s.devices == {n: ["cpu"] for n in s.available_adapters} for s in status)
    q = next(s for s in status if s.name.endswith("layers.0.self_attn.q_proj"))
    assert q.requires_grad == {"default": True, "other": False}
    model.base_model.set_requires_grad("default", requires_grad=False)
    assert model.get_model_status().requires_grad == {"default": False, "other": False}
    assert not any(p.requires_grad for p in model.parameters())


def test_a_later_adapter_leaves_the_others_trainable_or_frozen_as_they_were(tmp_path):
    """As PEFT's LoRA: add_adapter / load_adapter never change whether the adapters already there
    train; load_adapter(is_trainable=True) makes the new one trainable."""
    base = tiny_model(layers=2)
    config = lambda r: sk.ShareLoRAPeftConfig(method="share_a", r=r, target_modules=TARGETS)  # noqa: E731
    model = get_peft_model(copy.deepcopy(base), config(3))
    model.add_adapter("b", config(2))
    model.save_pretrained(tmp_path)

    def trainable(m):
        return {n.split(".")[3] for n, p in m.named_parameters() if p.requires_grad}  # the adapter

    training = get_peft_model(copy.deepcopy(base), config(3))
    training.load_adapter(tmp_path / "b", adapter_name="b")
    assert trainable(training) == {"default"}
    inference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inference.add_adapter("c", config(2))
    assert trainable(inference) == set()
    inference.load_adapter(tmp_path / "b", adapter_name="b", is_trainable=True)
    assert trainable(inference) == {"b"} and inference.active_adapters == ["default"]


def test_a_classifier_head_is_a_module_to_save_per_adapter(tmp_path):
    ids = token_batch()
    bert = tiny_family("bert", head="seq_cls", num_labels=3)
    config = sk.ShareLoRAPeftConfig(method="similarity", r=2, share_sets=[[0, 1]], task_type="SEQ_CLS")
    model = get_peft_model(copy.deepcopy(bert), config)
    assert {"classifier", "score"} <= model.modules_to_save  # PEFT's task class adds its heads (0.22: "pre_classifier" too)
    model = train_steps(model, ids, labels=torch.tensor([0, 2]))
    model.save_pretrained(tmp_path)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved_keys(tmp_path))
    assert torch.equal(logits(PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path), ids), logits(model, ids))
    with model.disable_adapter():  # the original head too
        assert torch.equal(logits(model, ids), logits(bert, ids))


def test_peft_knows_the_method_from_its_folder_alone(tmp_path):
    base = tiny_model(layers=2)
    base.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           sk.ShareLoRAPeftConfig(method="share_a", r=2, target_modules=TARGETS, task_type="CAUSAL_LM"))
    ids = token_batch()
    train_steps(model, ids, labels=ids)
    model.save_pretrained(tmp_path / "adapter")
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert type(config) is sk.ShareLoRAPeftConfig and config.to_config().method == "share_a"
    assert config.base_model_name_or_path == str(tmp_path / "base")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(auto, ids), logits(model, ids))


def test_config_round_trip_and_out_of_range_fields():
    sk_config = sk.ShareLoRAConfig(method="bishare", shape_transform="kron", kron_dim=8, target_modules=["q_proj"])
    config = sk.ShareLoRAPeftConfig.from_config(sk_config, task_type="CAUSAL_LM")
    assert config.peft_type == "SHARELORA" and config.task_type == "CAUSAL_LM" and config.to_config() == sk_config
    for field, value, message in (("r", 0, "r must be >= 1"), ("dropout", 1.5, r"dropout must be in \[0, 1\)"),
                                  ("method", "dora", "method must be one of"),
                                  ("share_sets", [[0, 1]], "share_sets only applies to method='similarity'")):
        with pytest.raises(ValueError, match=message):
            sk.ShareLoRAPeftConfig(**{field: value})


def test_bad_input_names_the_problem_and_leaves_the_model_as_it_was(tmp_path):
    base = tiny_model(layers=2)
    model = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="target_modules entry 'nope' matches no module"):
        model.add_adapter("x", sk.ShareLoRAPeftConfig(target_modules=["nope"]))
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="this model holds PEFT adapters .* Convert a PEFT LoRA with sharelora_kernels"):
        get_peft_model(lora.base_model.model, sk.ShareLoRAPeftConfig(r=2, target_modules=["q_proj"]))
    assert lora.peft_config["default"].peft_type == "LORA"  # its config left as it was
    with pytest.raises(ValueError, match="modules_to_save entry 'model.nrom' matches no module of this model"):
        model.add_adapter("x", sk.ShareLoRAPeftConfig(target_modules=["q_proj"], modules_to_save=["model.nrom"]))
    assert list(model.peft_config) == ["default"] and adapter_names(model.base_model.model) == ["default"]
    with pytest.raises(ValueError, match="adapter 'nope' does not exist; this model's adapters are \\['default'\\]"):
        model.base_model.delete_adapter("nope")
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    wider = tiny_family("llama", layers=2, hidden_size=48, intermediate_size=48)  # other shapes, same names
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.sharelora_adapters\.model/layers/0/self_attn/"
                                         r"q_proj/A' has shape \(2, 32\) in the checkpoint, \(2, 48\) in the model"):
        PeftModel.from_pretrained(wider, tmp_path)
    assert not any(isinstance(m, sk.SharedLoRALinear) for m in wider.modules())
    after = wider.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in wider.parameters()) and not hasattr(wider, "peft_config")


def test_a_model_of_sk_apply_is_refused_and_export_peft_takes_a_peft_model(tmp_path):
    base = tiny_model(layers=2)
    ids = token_batch()
    applied = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(method="share_a", r=3, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"holds ShareLoRA adapters \['default'\] of sharelora_kernels.apply"):
        get_peft_model(applied, sk.ShareLoRAPeftConfig(method="share_b", r=2, target_modules=TARGETS), adapter_name="x")
    assert applied.sharelora_active == ["default"] and adapter_names(applied) == ["default"]
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in applied.modules())
    config = sk.ShareLoRAPeftConfig(method="share_a", r=3, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(model)
    sk.export_peft(model, tmp_path)
    exported = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.allclose(logits(exported, ids), logits(model, ids), atol=1e-5)
    classifier = get_peft_model(tiny_family("bert", head="seq_cls", num_labels=3),
                                sk.ShareLoRAPeftConfig(r=2, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"modules to save in PEFT's wrappers \(\['classifier'\]\), which export_peft"):
        sk.export_peft(classifier, tmp_path / "classifier")
    with pytest.raises(ValueError, match=r"modules to save in PEFT's wrappers \(\['classifier'\]\), which save does"):
        sk.save(classifier, tmp_path / "saved")  # its file would lack the trained head
    assert not (tmp_path / "saved").exists()


def test_import_is_lazy_and_registers_when_peft_is_imported():
    """One fresh process: PEFT is not imported by sharelora_kernels, knows the method once imported,
    and a PEFT without its method tables gives an ImportError naming its version."""
    code = """import sys, sharelora_kernels
assert 'peft' not in sys.modules
import peft.mapping as m
assert m.PEFT_TYPE_TO_CONFIG_MAPPING['SHARELORA'].__name__ == 'ShareLoRAPeftConfig'
del m.PEFT_TYPE_TO_PREFIX_MAPPING, sys.modules['sharelora_kernels.integrations.peft_method']
try:
    import sharelora_kernels.integrations.peft_method
except ImportError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"peft {peft.__version__} does not have" in out.stdout and "sharelora_kernels.apply" in out.stdout


def test_a_failed_load_into_an_adapter_that_trains_keeps_it(tmp_path):
    """A Trainer resuming from a checkpoint of another plan loads into the adapter that trains: the
    load is refused and that adapter, its layers and the frozen base stay as they were."""
    base = tiny_model(layers=2)
    ids = token_batch()
    get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(method="share_a", r=2, target_modules=TARGETS)
                   ).save_pretrained(tmp_path)
    model = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(method="share_a", r=3, target_modules=TARGETS))
    model.add_adapter("b", sk.ShareLoRAPeftConfig(method="lora", r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    before, trainable = logits(model, ids), {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"does not match this model: .*nothing was loaded and adapter 'default' keeps "
                                         r"its tensors"):
        model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert list(model.peft_config) == ["default", "b"] and adapter_names(model.base_model.model) == ["default", "b"]
    assert torch.equal(logits(model, ids), before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    wider = tiny_family("llama", layers=2, hidden_size=48, intermediate_size=48)  # other shapes, same names
    get_peft_model(wider, sk.ShareLoRAPeftConfig(method="share_a", r=2, target_modules=TARGETS)).save_pretrained(
        tmp_path / "wider")
    with pytest.raises(ValueError, match=r"nothing was loaded and adapter 'c' \(added for this load\) was taken out"):
        model.load_adapter(tmp_path / "wider", adapter_name="c")
    assert list(model.peft_config) == ["default", "b"] and torch.equal(logits(model, ids), before)
    # frozen and fresh, but added by the user, not by the load: kept (it was deleted)
    model.add_adapter("mine", sk.ShareLoRAPeftConfig(method="lora", r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="nothing was loaded and adapter 'mine' keeps its tensors"):
        model.load_adapter(tmp_path / "wider", adapter_name="mine")
    assert list(model.peft_config) == adapter_names(model.base_model.model) == ["default", "b", "mine"]
    frozen = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(method="share_a", r=3, target_modules=TARGETS,
                                                                         inference_mode=True))
    with pytest.raises(ValueError, match="nothing was loaded and adapter 'default' keeps its tensors"):
        frozen.load_adapter(tmp_path / "wider", adapter_name="default")  # its only adapter: the method was unloaded
    assert isinstance(frozen.base_model.model.model.layers[0].self_attn.q_proj, sk.SharedLoRALinear)


def test_set_adapter_refused_by_modules_to_save_changes_nothing():
    base = tiny_model(layers=2)
    ids = token_batch()
    config = sk.ShareLoRAPeftConfig(method="lora", r=2, target_modules=TARGETS, modules_to_save=["lm_head"])
    model = get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("x", config)
    model.set_requires_grad(["default", "x"])
    randomize_adapters(model)
    model.set_adapter("x")
    before, trainable = logits(model, ids), {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        model.base_model.set_adapter(["default", "x"])
    assert model.active_adapters == ["x"] and adapter_names(model.base_model.model) == ["default", "x"]
    assert sk.model.active_adapters(model.base_model.model) == ["x"]
    assert torch.equal(logits(model, ids), before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_autocast_adapter_dtype_false_keeps_the_base_dtype():
    base = tiny_model(layers=1).to(torch.bfloat16)
    config = sk.ShareLoRAPeftConfig(method="bishare", target_modules=TARGETS, local_r=1, intra_r=2, inter_r=2)
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=autocast)
        assert {p.dtype for p in model.base_model.model.sharelora_adapters.parameters()} == {dtype}
        model(token_batch()).logits.float().sum().backward()  # the call plans follow the cast tensors
        assert all(p.grad is not None and p.grad.dtype == dtype
                   for p in model.base_model.model.sharelora_adapters.parameters())


def test_peft_sees_the_method_by_name_and_refuses_what_is_lora_only(tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    base = tiny_model(layers=1)
    config = sk.ShareLoRAPeftConfig(method="share_a", r=2, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(base), config)
    assert model.peft_config["default"].peft_type == "SHARELORA"
    assert model.get_model_status().peft_types == {"default": "SHARELORA"}
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="SHARELORA"):
        hotswap_adapter(model, str(tmp_path), adapter_name="default")
    with pytest.raises(NotImplementedError, match="add_weighted_adapter combines LoRA adapters' .*export_peft"):
        model.add_weighted_adapter(["default"], [1.0], "combined")
