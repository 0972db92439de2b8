"""from_peft, modules_to_save, task types for AutoPeftModelFor<Task>, and PEFT-wrapped models refused."""
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file

import sharelora_kernels as sk
from tiny_models import TARGETS, randomize_adapters, tiny_family, tiny_model, token_batch


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def trained_peft(base, **lora):
    """A PeftModel with random non-zero LoRA weights (and heads) for ``base``."""
    model = get_peft_model(base, LoraConfig(**lora))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model.eval()


CASES = {
    "plain": (lambda: tiny_model(), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rank_pattern": (lambda: tiny_model(), dict(r=4, lora_alpha=8, target_modules=TARGETS,
                                                rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6},
                                                alpha_pattern={"down_proj": 3})),
    # keys PEFT applies to nothing (dropped, as PEFT ignores them); modules to save by PEFT's plain suffix
    # rule ("norm" picks input_layernorm, post_attention_layernorm and model.norm)
    "unused_pattern_keys": (lambda: tiny_model(), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       rank_pattern={"o_proj": 8}, alpha_pattern={"down_proj": 3})),
    "modules_to_save_suffix": (lambda: tiny_model(), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          modules_to_save=["norm"])),
    "rslora": (lambda: tiny_model(), dict(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True, lora_dropout=0.1)),
    "conv1d": (lambda: tiny_family("gpt2"), dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "seq_cls": (lambda: tiny_family("bert", "seq_cls", num_labels=3),
                dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("source", ["peft_model", "directory"])
def test_from_peft_gives_the_same_logits_gradients_and_export(case, source, tmp_path):
    make, lora = CASES[case]
    peft_model = trained_peft(make(), **lora)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = token_batch(seed=4)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    plain = make()
    if source == "peft_model":
        ours = sk.from_peft(copy.deepcopy(peft_model))
    else:
        ours = sk.from_peft(make(), tmp_path / "peft")
    assert not any(type(m).__module__.startswith("peft.") for m in ours.modules())
    with torch.no_grad():
        got = ours(input_ids=ids).logits
        assert rel_err(got, want) < 1e-6 and rel_err(got, plain(input_ids=ids).logits) > 1e-3
    # one training step: same gradients on every LoRA tensor (dropout off in eval mode)
    peft_model.zero_grad()
    peft_model(input_ids=ids).logits.pow(2).mean().backward()
    ours(input_ids=ids).logits.pow(2).mean().backward()
    peft_params = dict(peft_model.named_parameters())
    for name in ours.sharelora_plan.modules:
        path = ours.get_submodule(name).lora_paths[0]
        for role, peft_role in (("A", "lora_A"), ("B", "lora_B")):
            ref = peft_params[f"base_model.model.{name}.{peft_role}.default.weight"].grad
            assert rel_err(getattr(path, role).grad, ref) < 1e-5
    # export: the tensors PEFT itself saved
    sk.export_peft(ours, tmp_path / "ours")
    theirs, mine = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(mine)
    for key in theirs:
        assert torch.equal(theirs[key], mine[key]), key
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    reloaded = PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(reloaded(input_ids=ids).logits, want) < 1e-6
    assert cfg["use_rslora"] == bool(lora.get("use_rslora")) and cfg["fan_in_fan_out"] == (case == "conv1d")


def test_from_peft_refuses_other_adapter_types_and_dora(tmp_path):
    vera = get_peft_model(tiny_model(), VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="converts LoRA adapters, not VERA adapters"):
        sk.from_peft(vera)
    dora = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA .use_dora=True."):
        sk.from_peft(dora)
    assert any(type(m).__module__.startswith("peft.") for m in dora.modules())  # refused before anything changed
    from peft.tuners.lora.config import KasaConfig

    kasa = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], kasa_config=KasaConfig()))
    with pytest.raises(ValueError, match="uses KaSA .kasa_config="):
        sk.from_peft(kasa)
    kasa.peft_config["default"].kasa_config = None  # a config that no longer says it: the layers still do
    with pytest.raises(ValueError, match="computes a LoRA variant .KasaLinearVariant.*only plain LoRA converts"):
        sk.from_peft(kasa)
    with pytest.raises(ValueError, match="not a PeftModel: pass the PEFT adapter directory"):
        sk.from_peft(tiny_model())
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        sk.from_peft(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match=r"into a model without ShareLoRA adapters; this one has \['default'\]"):
        sk.from_peft(sk.apply(tiny_model(), sk.ShareLoRAConfig(r=2)), tmp_path)


def test_from_peft_refuses_lora_on_embeddings_and_a_folder_without_lora(tmp_path):
    from safetensors.torch import save_file

    peft_model = trained_peft(tiny_model(layers=2), r=2, target_modules=["q_proj", "embed_tokens"])
    peft_model.save_pretrained(tmp_path / "emb")
    with pytest.raises(ValueError, match="'model.embed_tokens' has LoRA on an embedding"):
        sk.from_peft(peft_model)
    assert any(type(m).__module__.startswith("peft.") for m in peft_model.modules())  # refused before anything changed
    with pytest.raises(ValueError, match="'model.embed_tokens' has LoRA on an embedding"):
        sk.from_peft(tiny_model(layers=2), tmp_path / "emb")
    save_file({}, tmp_path / "emb" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors holds no LoRA weights"):
        sk.from_peft(tiny_model(layers=2), tmp_path / "emb")


def test_from_peft_unmerges_a_merged_lora_and_refuses_several_active_or_another_merged():
    ids = token_batch(seed=4)
    merged = trained_peft(tiny_model(layers=2), r=3, lora_alpha=5, target_modules=TARGETS)
    with torch.no_grad():
        want = merged(input_ids=ids).logits
    merged.merge_adapter()
    with torch.no_grad():
        assert rel_err(sk.from_peft(merged)(input_ids=ids).logits, want) < 1e-5  # the update counted once
    two = trained_peft(tiny_model(layers=2), r=3, target_modules=TARGETS)
    two.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    two.base_model.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match=r"2 active adapters \['default', 'b'\], and from_peft converts one"):
        sk.from_peft(two)
    two.set_adapter("default")
    two.merge_adapter(["b"])
    with pytest.raises(ValueError, match=r"adapter\(s\) \['b'\] of this PeftModel are merged"):
        sk.from_peft(two)
    assert any(type(m).__module__.startswith("peft.") for m in two.modules())  # refused before anything changed


def test_apply_refuses_models_holding_peft_adapters():
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="holds PEFT adapters .the model is a PeftModel.*from_peft"):
        sk.apply(peft_model, sk.ShareLoRAConfig(target_modules=["k_proj"]))
    inner = peft_model.get_base_model()  # PEFT tuner layers inside a plain Transformers model
    with pytest.raises(ValueError, match="module 'model.layers.0.self_attn.q_proj' is a Linear, from peft"):
        sk.apply(inner, sk.ShareLoRAConfig(target_modules=["k_proj"]))
    assert not any(isinstance(m, sk.SharedLoRALinear) for m in inner.modules())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sequence_classifier_head_trains_saves_loads_and_exports(family, tmp_path):
    """modules_to_save defaults to the head: it trains in full, save/load restore it, merge leaves it,
    and AutoPeftModelForSequenceClassification loads the export with the same logits."""
    from peft import AutoPeftModelForSequenceClassification

    base_dir = tmp_path / "base"
    tiny_family(family, "seq_cls", num_labels=3, pad_token_id=0).save_pretrained(base_dir)
    from transformers import AutoModelForSequenceClassification

    model = sk.apply(AutoModelForSequenceClassification.from_pretrained(base_dir),
                     sk.ShareLoRAConfig(method="share_ab", r=2, target_modules=["query", "value"] if family == "bert"
                                        else ["q_proj", "v_proj"]))
    head = "classifier" if family == "bert" else "score"
    assert model.sharelora_plan.modules_to_save == [head]
    assert all(p.requires_grad for p in model.get_submodule(head).parameters())
    assert sk.parameter_breakdown(model)[f"saved:{head}"] == sum(p.numel() for p in model.get_submodule(head).parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before = model.get_submodule(head).weight.detach().clone()
    model.train()
    ids = token_batch(4, 6, seed=7)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
        opt.step()
    model.eval()
    assert not torch.equal(model.get_submodule(head).weight, before)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    sk.save(model, tmp_path / "adapter")
    loaded = sk.load(AutoModelForSequenceClassification.from_pretrained(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)
    sk.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == [head]
    auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_err(auto(input_ids=ids).logits, want) < 1e-5
        sk.merge(model)
        assert rel_err(model(input_ids=ids).logits, want) < 1e-5


@pytest.mark.parametrize("head, auto_name, task", [
    ("causal_lm", "AutoPeftModelForCausalLM", "CAUSAL_LM"),
    ("seq2seq", "AutoPeftModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("token_cls", "AutoPeftModelForTokenClassification", "TOKEN_CLS"),
    ("qa", "AutoPeftModelForQuestionAnswering", "QUESTION_ANS"),
    ("base", "AutoPeftModelForFeatureExtraction", "FEATURE_EXTRACTION"),
])
def test_export_task_type_lets_auto_peft_load_each_task(head, auto_name, task, tmp_path):
    import peft
    import transformers

    family = {"causal_lm": "llama", "seq2seq": "t5"}.get(head, "bert")
    tiny_family(family, head).save_pretrained(tmp_path / "base")
    auto_class = {"causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM", "base": "AutoModel",
                  "token_cls": "AutoModelForTokenClassification", "qa": "AutoModelForQuestionAnswering"}[head]
    model = sk.apply(getattr(transformers, auto_class).from_pretrained(tmp_path / "base"),
                     sk.ShareLoRAConfig(method="lora", r=2)).eval()
    randomize_adapters(model, std=0.1)
    sk.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == task
    loaded = getattr(peft, auto_name).from_pretrained(tmp_path / "peft").eval()
    ids = token_batch(2, 6, seed=9)
    kwargs = {"decoder_input_ids": ids} if family == "t5" else {}
    with torch.no_grad():
        out, ref = loaded(input_ids=ids, **kwargs), model(input_ids=ids, **kwargs)
    for key in ("logits", "start_logits", "last_hidden_state"):
        if key in ref:
            assert rel_err(out[key], ref[key]) < 1e-5


def _saved_peft(tmp_path, base, **config):
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, **config))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1)
    peft.save_pretrained(tmp_path)
    return peft.eval()


@pytest.mark.parametrize("damage", ["other base", "B rank", "saved shape", "saved unknown", "NaN", "config JSON",
                                    "config alpha", "weights truncated"])
def test_from_peft_refuses_a_folder_that_does_not_fit_before_the_model_changes(damage, tmp_path):
    from safetensors.torch import save_file

    base = tiny_model(layers=2)
    source = tiny_family("llama", layers=2, hidden_size=48, intermediate_size=48) if damage == "other base" else base
    _saved_peft(tmp_path, source, target_modules=["q_proj", "down_proj"], modules_to_save=["model.norm"])
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors = load_file(weights)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    edits = {"B rank": {f"{q}.lora_B.weight": torch.randn(32, 3)},
             "saved shape": {"base_model.model.model.norm.weight": torch.ones(16)},
             "saved unknown": {"base_model.model.model.norm.bogus": torch.ones(32)},
             "NaN": {f"{q}.lora_A.weight": torch.full((2, 32), float("nan"))}}
    if damage in edits:
        save_file({**tensors, **edits[damage]}, weights)
    elif damage == "config JSON":
        config.write_text("{not json")
    elif damage == "config alpha":
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "lora_alpha"}))
    elif damage == "weights truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    message = {"other base": r"lora_A has shape \(2, 48\), this model's module needs \(2, 32\)",
               "B rank": r"q_proj': lora_B has shape \(32, 3\), this model's module needs \(32, 2\)",
               "saved shape": r"'model.norm.weight' has shape \(16,\), this model's \(32,\)",
               "saved unknown": r"'model.norm.bogus', which no module to save of this model holds",
               "NaN": r"q_proj': lora_A is not finite floating point",
               "config JSON": r"adapter_config.json is not a PEFT config: not valid JSON",
               "config alpha": r"adapter_config.json: 'lora_alpha' is missing or not a number",
               "weights truncated": r"cannot read .*adapter_model.safetensors: a damaged or truncated file"}[damage]
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        sk.from_peft(model, tmp_path)
    assert not sk.model.adapter_names(model) and not any(isinstance(m, sk.SharedLoRALinear) for m in model.modules())
    assert model.state_dict().keys() == before.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_from_peft_reads_a_folder_with_the_base_weights_peft_saved_beside_a_targeted_head(tmp_path):
    """PEFT saves lm_head.base_layer.weight beside a LoRA on lm_head (save_embedding_layers): loaded
    into the head's base as PEFT loads it."""
    base = tiny_model(layers=2)
    peft = _saved_peft(tmp_path, base, target_modules=["q_proj", "lm_head"])
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(sk.from_peft(copy.deepcopy(base), tmp_path)(ids).logits, peft(ids).logits)
