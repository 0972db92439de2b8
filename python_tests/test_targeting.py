"""targeting.py: PEFT's matching rules, each rule's error, default targets per family, module types and layers."""
import copy

import pytest
import torch
import torch.nn as nn

import sharelora_kernels as sk
from sharelora_kernels.targeting import (DEFAULT_TARGET_MODULES, find_modules_to_save, find_target_modules,
                                         layer_position, module_type, type_labels)
from tiny_models import FAMILIES, randomize_adapters, tiny_family, tiny_model, token_batch

HEADS = {"t5": "seq2seq", "bert": "seq_cls", "roberta": "seq_cls"}


def targets(model, **kw):
    return [m.name for m in find_target_modules(model, sk.ShareLoRAConfig(**kw))[0]]


def run(model, ids):
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_its_default_targets(family):
    """target_modules=None: the family's default table entry; fresh adapters change nothing, trained ones do."""
    assert family in DEFAULT_TARGET_MODULES
    base = tiny_family(family, HEADS.get(family, "causal_lm"))
    model = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(method="lora", r=2))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, sk.SharedLoRALinear)}
    assert wrapped and wrapped <= {e.rsplit(".", 1)[-1] for e in DEFAULT_TARGET_MODULES[family]}
    ids = token_batch(2, 6)
    with torch.no_grad():
        expected = run(base, ids)
        torch.testing.assert_close(run(model, ids), expected, rtol=0, atol=0)
        randomize_adapters(model)
        assert not torch.allclose(run(model, ids), expected, atol=1e-4)


LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, vocab_size=64)
MORE_FAMILIES = {  # tiny configs of the families with defaults beyond FAMILIES
    "opt": dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=64, vocab_size=64),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, vocab_size=64, bos_token_id=1,
                 eos_token_id=2),
    "qwen2_moe": {**LLAMA_LIKE, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "num_experts": 4},
    "qwen3_moe": {**LLAMA_LIKE, "moe_intermediate_size": 16, "num_experts": 4, "head_dim": 8},
    "olmoe": {**LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2},
    "mixtral": {**LLAMA_LIKE, "num_local_experts": 4},
    "gemma3_text": {**LLAMA_LIKE, "head_dim": 8}, "cohere": LLAMA_LIKE, "starcoder2": LLAMA_LIKE,
}


@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_more_families_take_their_default_targets(family):
    """Every default entry is a linear module of the family (target_modules=None raised for these); a
    mixture of experts defaults to attention, its experts being fused 3-D parameters."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(family,
                                                                                            **MORE_FAMILIES[family]))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in sk.apply(model, sk.ShareLoRAConfig(r=2)).named_modules()
               if isinstance(m, sk.SharedLoRALinear)}
    assert wrapped == set(DEFAULT_TARGET_MODULES[family])


def test_fused_expert_parameters_a_target_names_are_told():
    """Routed experts stored as fused 3-D parameters are no linear modules: a target naming them
    warns that they stay frozen (it adapted the shared expert alone, silently), or names them in the
    error when nothing else matches."""
    import transformers

    make = lambda family: transformers.AutoModelForCausalLM.from_config(  # noqa: E731
        transformers.AutoConfig.for_model(family, **MORE_FAMILIES[family]))
    with pytest.warns(UserWarning, match=r"2 fused expert parameter\(s\) of this model .*'model.layers.0.mlp.experts."
                                         r"down_proj'.* get no adapter and stay frozen"):
        model = sk.apply(make("qwen2_moe"), sk.ShareLoRAConfig(r=2, target_modules=["down_proj"]))
    assert isinstance(model.model.layers[0].mlp.shared_expert.down_proj, sk.SharedLoRALinear)
    with pytest.raises(ValueError, match=r"entry 'down_proj' matches no module of this model, only fused expert "
                                         r"parameters \('model.layers.0.mlp.experts.down_proj', \.\.\.\)"):
        sk.apply(make("olmoe"), sk.ShareLoRAConfig(r=2, target_modules=["down_proj"]))
    with pytest.warns(UserWarning, match="4 fused expert parameter"):
        sk.apply(make("olmoe"), sk.ShareLoRAConfig(r=2, target_modules="all-linear"))


def test_model_type_without_defaults_asks_for_target_modules():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="default targets of the model's model_type, and there are none for None.*"
                                         "pass target_modules"):
        sk.apply(net, sk.ShareLoRAConfig())


def test_list_entries_match_full_names_or_dotted_suffixes():
    bert = tiny_family("bert", "base")
    assert targets(bert, target_modules=["attention.output.dense"]) == [
        "encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]
    assert targets(bert, target_modules=["encoder.layer.1.output.dense"]) == ["encoder.layer.1.output.dense"]
    assert targets(bert, target_modules=["output.dense"]) == [  # "output.dense" ends both kinds
        "encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense",
        "encoder.layer.1.attention.output.dense", "encoder.layer.1.output.dense"]


def test_a_misspelled_list_entry_is_named():
    with pytest.raises(ValueError, match="target_modules entry 'k_projj' matches no module"):
        sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=["q_proj", "k_projj"]))
    with pytest.raises(ValueError, match="target_modules entry 'uery' matches no module"):  # no substring matching
        sk.apply(tiny_family("bert", "base"), sk.ShareLoRAConfig(target_modules=["uery"]))



def test_a_rank_or_alpha_pattern_key_matching_no_target_is_named():
    for name in ("rank_pattern", "alpha_pattern"):
        model = tiny_model()
        with pytest.raises(ValueError, match=f"{name} key 'q_prj' matches no target module"):
            sk.apply(model, sk.ShareLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], **{name: {"q_prj": 8}}))
        assert not hasattr(model, "sharelora_plans")
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      rank_pattern={"layers.1.self_attn.q_proj": 6, "v_proj": 2}))
    layers = model.model.layers
    rank = lambda layer, name: getattr(layers[layer].self_attn, name).lora_paths[0].B.shape[1]  # noqa: E731
    assert (rank(1, "q_proj"), rank(0, "q_proj"), rank(0, "v_proj")) == (6, 4, 2)


def test_a_string_is_a_regex_full_matched_against_the_full_name():
    model = tiny_model(layers=4)
    assert targets(model, target_modules=r".*\.[02]\.self_attn\.(q|v)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    with pytest.raises(ValueError, match="no target module found"):  # full match: "q_proj" alone matches no full name
        sk.apply(model, sk.ShareLoRAConfig(target_modules="q_proj"))


def test_all_linear_leaves_out_the_output_head_and_the_task_head():
    llama = tiny_model(layers=2)
    names = targets(llama, target_modules="all-linear")
    assert len(names) == 2 * 7 and "lm_head" not in names
    bert = tiny_family("bert", "seq_cls")
    names = targets(bert, target_modules="all-linear")
    assert "bert.pooler.dense" in names and "classifier" not in names and len(names) == 2 * 6 + 1
    gpt2 = tiny_family("gpt2")
    assert len(targets(gpt2, target_modules="all-linear")) == 2 * 4  # the Conv1Ds; lm_head is the output head


def test_exclude_modules_list_and_regex():
    model = tiny_model(layers=2)
    assert targets(model, target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"]) == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert targets(model, target_modules="all-linear", exclude_modules=r".*mlp\..*|.*\.1\..*") == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    with pytest.raises(ValueError, match="exclude_modules entry 'v_projj' matches no module"):
        targets(model, target_modules=["q_proj"], exclude_modules=["v_projj"])
    with pytest.raises(ValueError, match="exclude_modules entry '.*nothing' matches no module"):
        targets(model, target_modules=["q_proj"], exclude_modules=".*nothing")


def test_layers_to_transform_and_layers_pattern():
    model = tiny_model(layers=4)
    assert targets(model, target_modules=["q_proj"], layers_to_transform=[1, 3]) == [
        "model.layers.1.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    assert targets(model, target_modules=["q_proj"], layers_to_transform=2, layers_pattern="layers") == [
        "model.layers.2.self_attn.q_proj"]
    with pytest.raises(ValueError, match="layers_to_transform names layer 7, where no target module lies"):
        targets(model, target_modules=["q_proj"], layers_to_transform=[0, 7])
    with pytest.raises(ValueError, match="layer 0, where no target module lies .layers_pattern 'blocks'"):
        targets(model, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks")
    # a module named in full is adapted whatever layers_to_transform says, as PEFT adapts it (it was dropped)
    assert targets(model, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_layer_position_and_module_type_rules():
    assert layer_position("model.layers.3.mlp.up_proj") == (3, "model.layers")
    # layers_pattern as PEFT reads it: from a component on, possibly across several (an encoder-decoder's stacks)
    q = "decoder.block.1.layer.0.SelfAttention.q"
    assert layer_position(q, "decoder.block") == layer_position(q, r"decoder\.block") == (1, "decoder.block")
    assert layer_position("encoder.block.1.layer.0.SelfAttention.q", "decoder.block") == (None, None)
    assert layer_position(q, ["nothing", "block"]) == (1, "decoder.block")
    assert layer_position("model.layers.3.mlp", "layer") == (None, None)  # a whole component, not a prefix
    assert layer_position("model.layers.3.mlp.experts.5.w1") == (3, "model.layers")  # the first integer
    assert layer_position("vision.blocks.1.layers.4.q", layers_pattern="layers") == (4, "vision.blocks.1.layers")
    assert layer_position("bert.pooler.dense") == (None, None)
    assert layer_position("2") == (2, "")  # a child of a container root
    assert module_type("bert.encoder.layer.11.attention.output.dense") == "bert.encoder.layer.*.attention.output.dense"
    assert module_type("bert.pooler.dense") == "bert.pooler.dense" and module_type("2") == "*"
    labels = type_labels(["e.layer.*.attention.output.dense", "e.layer.*.output.dense", "e.layer.*.intermediate.dense",
                          "pooler.dense", "e.layer.*.attention.self.query"])
    assert labels == {"e.layer.*.attention.output.dense": "attention.output.dense", "e.layer.*.output.dense": "*.output.dense",
                      "e.layer.*.intermediate.dense": "intermediate.dense", "pooler.dense": "pooler.dense",
                      "e.layer.*.attention.self.query": "query"}



class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


class _BlocksAndRootFc(nn.Module):
    """Blocks that each hold ``fc``, and a final ``fc`` at the root: the type ``fc`` is a suffix of
    ``layers.*.fc``, so no suffix of it is unique."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.fc(x)


def test_a_root_module_named_like_a_per_layer_module_is_its_own_type(tmp_path):
    assert type_labels(["layers.*.fc", "fc"]) == {"layers.*.fc": "*.fc", "fc": "fc"}
    x = torch.randn(3, 8, dtype=torch.float64)
    for method, count in (("lora", 2 * (16 + 16) + 16 + 8), ("share_a", 16 + 2 * 16 + 16 + 8)):
        torch.manual_seed(0)
        model = sk.apply(_BlocksAndRootFc().double(), sk.ShareLoRAConfig(target_modules=["fc"], method=method, r=2))
        randomize_adapters(model)
        assert sk.trainable_parameters(model) == count  # the root fc shares nothing with the blocks' fc
        sk.save(model, tmp_path / method)
        torch.manual_seed(0)  # the same base weights, the adapters from the file
        loaded = sk.load(_BlocksAndRootFc().double(), tmp_path / method)
        assert torch.equal(loaded(x), model(x))


def test_bert_similarity_keeps_three_dense_types_and_the_pooler_apart():
    """BERT's attention-output, intermediate and output dense layers are three module types, each
    with its own share slots; the pooler (no layer) has a slot of its own, shared with no layer."""
    base = tiny_family("bert", "base", layers=4)
    config = sk.ShareLoRAConfig(method="similarity", r=2, share_sets=[[0, 1], [2, 3]], target_modules=["dense"])
    model = sk.apply(copy.deepcopy(base), config)
    types = {m.info.module_type for m in model.sharelora_plan.modules.values()}
    assert types == {"attention.output.dense", "intermediate.dense", "*.output.dense", "pooler.dense"}
    layer = lambda i: model.encoder.layer[i]
    for get in (lambda l: l.attention.output.dense, lambda l: l.intermediate.dense, lambda l: l.output.dense):
        assert get(layer(0)).lora_paths[0].A is get(layer(1)).lora_paths[0].A
        assert get(layer(1)).lora_paths[0].A is not get(layer(2)).lora_paths[0].A
    pooler = model.pooler.dense.lora_paths[0]
    assert model.sharelora_plan.modules["pooler.dense"].info.layer is None
    assert all(pooler.A is not l.lora_paths[0].A for l in sk.model.shared_layers(model) if l is not model.pooler.dense)
    assert sk.parameter_breakdown(model)["type:pooler.dense"] == 2 * (32 + 32)
    ids = token_batch(2, 6)
    with torch.no_grad():
        randomize_adapters(model)
        assert not torch.allclose(model(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state)


def test_share_ab_and_bishare_on_bert_plan_per_type():
    """share_ab shares per module type (the three dense kinds differ in shape); Bi-Share's intra adapter of
    a layer never reaches the pooler, which gets its own."""
    model = sk.apply(tiny_family("bert", "base"), sk.ShareLoRAConfig(method="share_ab", r=2, target_modules=["dense"]))
    assert len(model.sharelora_plan.tensors) == 2 * 4
    model = sk.apply(tiny_family("bert", "base"), sk.ShareLoRAConfig(method="bishare", local_r=1, intra_r=2, inter_r=2,
                                                                     target_modules=["dense"]))
    intra = {p.tensors["A"] for name, m in model.sharelora_plan.modules.items() for p in m.paths if p.part == "intra"
             if name != "pooler.dense"}
    pooler_intra = [p.tensors["A"] for p in model.sharelora_plan.modules["pooler.dense"].paths if p.part == "intra"]
    assert intra == {"layer0.intra.A", "layer1.intra.A"} and pooler_intra == ["pooler.dense.intra.A"]


def test_shape_disagreement_names_both_modules_in_full():
    net = nn.Module()
    net.blocks = nn.ModuleList([nn.Module(), nn.Module()])
    net.blocks[0].proj, net.blocks[1].proj = nn.Linear(8, 4), nn.Linear(6, 4)
    with pytest.raises(ValueError, match="modules 'blocks.0.proj' and 'blocks.1.proj' share tensor 'proj.A' but disagree"):
        sk.apply(net, sk.ShareLoRAConfig(method="share_a", r=2, target_modules=["proj"]))


def test_t5_similarity_is_refused_with_a_true_message_and_lora_works():
    t5 = tiny_family("t5", "seq2seq")
    with pytest.raises(ValueError, match="different stacks of layers \\(\\['decoder.block', 'encoder.block'\\]\\)"):
        sk.apply(copy.deepcopy(t5), sk.ShareLoRAConfig(method="similarity", share_sets=[[0, 1]]))
    model = sk.apply(copy.deepcopy(t5), sk.ShareLoRAConfig(method="lora", r=2))
    assert any(n.endswith("EncDecAttention.q") for n in model.sharelora_plan.modules)


def test_modules_to_save_default_heads_and_errors():
    assert find_modules_to_save(tiny_family("bert", "seq_cls"), sk.ShareLoRAConfig()) == ["classifier"]
    assert find_modules_to_save(tiny_family("llama", "seq_cls"), sk.ShareLoRAConfig()) == ["score"]
    assert find_modules_to_save(tiny_family("bert", "token_cls"), sk.ShareLoRAConfig()) == ["classifier"]
    assert find_modules_to_save(tiny_family("bert", "qa"), sk.ShareLoRAConfig()) == ["qa_outputs"]
    distilbert = tiny_family("distilbert", "seq_cls", dim=32, hidden_dim=48, n_layers=1, n_heads=4,
                             max_position_embeddings=64)  # its pre_classifier is new too: PEFT trains it (it stayed frozen)
    assert find_modules_to_save(distilbert, sk.ShareLoRAConfig()) == ["pre_classifier", "classifier"]
    assert find_modules_to_save(tiny_family("bert", "seq_cls"), sk.ShareLoRAConfig(modules_to_save=[])) == []
    assert find_modules_to_save(tiny_model(), sk.ShareLoRAConfig()) == []
    with pytest.raises(ValueError, match="modules_to_save entry 'clasifier' matches no module"):
        find_modules_to_save(tiny_family("bert", "seq_cls"), sk.ShareLoRAConfig(modules_to_save=["clasifier"]))
    tied = tiny_model()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="modules_to_save entry 'lm_head' shares a parameter with "
                                         "'model.embed_tokens.weight'"):
        sk.apply(tied, sk.ShareLoRAConfig(modules_to_save=["lm_head"]))
