"""apply(): wrapping real Transformers models for every method; sharing is real sharing."""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import sharelora_kernels as sk
from sharelora_kernels.layer import AdapterStore
from sharelora_kernels.model import adapter_tensors
from sharelora_kernels.plan import build_plan
from sharelora_kernels.targeting import ModuleInfo, find_target_modules
from tiny_models import ARCHS, METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_model, token_batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_fresh_adapters_change_nothing_and_trained_ones_do(arch, name):
    base = tiny_model(arch)
    model = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))
    ids = token_batch()
    with torch.no_grad():
        expected = base(ids).logits
        assert torch.equal(model(ids).logits, expected)
        randomize_adapters(model)
        assert not torch.allclose(model(ids).logits, expected, atol=1e-3)
    assert all(p.requires_grad == n.startswith("sharelora_adapters.") for n, p in model.named_parameters())


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_shared_tensors_are_one_parameter_and_get_the_sum_of_gradients(name):
    """A shared tensor is one object; its gradient equals the sum of per-user gradients of unshared copies."""
    model = sk.apply(tiny_model("mistral").double(), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))
    randomize_adapters(model)
    params = adapter_tensors(model)
    users: dict[str, list] = {}
    for mname in model.sharelora_plan.modules:
        for path in model.get_submodule(mname).lora_paths:
            for role, tname in path.spec.tensors.items():
                users.setdefault(tname, []).append((path, role))
    shared = {t: u for t, u in users.items() if len(u) > 1}
    if name != "lora":
        assert shared, "this method must share at least one tensor"
    for tname, us in shared.items():
        assert len({getattr(p, r).data_ptr() for p, r in us}) == 1
        assert all(getattr(p, r) is params[tname] for p, r in us)
    ids = token_batch(seed=5)
    model(ids).logits.pow(2).mean().backward()
    shared_grads = {t: params[t].grad.clone() for t in shared}
    # Untie: give every path a private store holding its own copies of the same values.
    model.zero_grad()
    copies = {}
    for mname in model.sharelora_plan.modules:
        for path in model.get_submodule(mname).lora_paths:
            own = {t: nn.Parameter(params[t].detach().clone()) for t in path.spec.tensors.values()}
            path._store = (AdapterStore(own, {t: model.sharelora_plan.tensors[t] for t in own}),)
            for t, c in own.items():
                copies.setdefault(t, []).append(c)
    model(ids).logits.pow(2).mean().backward()
    for tname in shared:
        total = sum(c.grad for c in copies[tname])
        assert total.abs().max() > 0
        torch.testing.assert_close(shared_grads[tname], total, rtol=1e-10, atol=1e-12)


def test_state_dict_holds_each_tensor_once_and_save_pretrained_works(tmp_path):
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(method="share_ab", r=2, target_modules=TARGETS))
    adapter_keys = [k for k in model.state_dict() if k.startswith("sharelora_adapters.")]
    assert len(adapter_keys) == len(model.sharelora_plan.tensors) == 2 * len(TARGETS)
    model.save_pretrained(tmp_path)  # no tied tensors for transformers to refuse


def test_save_pretrained_refuses_merged_adapters_before_writing(tmp_path):
    """Merged weights plus the adapters beside them would load as the adapters applied twice."""
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(method="share_ab", r=2, target_modules=TARGETS))
    randomize_adapters(model)
    sk.merge(model)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['default'\] are merged into the weights of 20 module\(s\) "
                                         r"\(first: model\.layers\.0\.self_attn\.q_proj\).*unmerge"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    sk.unmerge(model)
    model.save_pretrained(tmp_path / "out")
    with torch.no_grad():  # the base as saved (unmerged within float32 rounding) with the adapters once
        torch.testing.assert_close(sk.load(tiny_model(), tmp_path / "out")(token_batch()).logits,
                                   model(token_batch()).logits)


def test_parameters_yields_each_shared_tensor_once():
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(method="share_ab", r=2, target_modules=TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len({id(p) for p in trainable}) == 2 * len(TARGETS)
    assert sk.trainable_parameters(model) == sum(p.numel() for p in adapter_tensors(model).values())


def test_adapter_parameters_lists_what_a_blocks_layers_read():
    """A block's parameters() holds none of its adapters (they live in the root's store):
    adapter_parameters(block) lists exactly the tensors its layers read, each once; freezing them
    freezes that block's adapters (and a tensor it shares with other blocks)."""
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(**METHOD_CONFIGS["similarity"], target_modules=TARGETS))
    sk.apply(model, sk.ShareLoRAConfig(method="lora", r=2, target_modules=["q_proj"]), adapter_name="other")
    blocks = model.model.layers
    read = lambda block, name: {id(t) for layer in block.modules()  # noqa: E731
                                if isinstance(layer, sk.SharedLoRALinear) and name in layer.adapter_paths
                                for t in layer.adapter_paths[name].parameters()}
    for block in blocks:
        got = sk.adapter_parameters(block)
        assert len(got) == len({id(t) for t in got}) == len(read(block, "default") | read(block, "other")) > 0
        assert {id(t) for t in sk.adapter_parameters(block, "other")} == read(block, "other")
    every = {id(t) for t in adapter_tensors(model).values()} | {id(t) for t in adapter_tensors(model, "other").values()}
    assert {id(t) for t in sk.adapter_parameters(model)} == every
    for t in sk.adapter_parameters(blocks[0], "default"):
        t.requires_grad_(False)
    assert not any(t.requires_grad for t in sk.adapter_parameters(blocks[0]))
    # layers 1-3 share; layer 0 has its own ("other" is inactive, so frozen)
    assert all(t.requires_grad for t in sk.adapter_parameters(blocks[1], "default"))
    with pytest.raises(ValueError, match="no ShareLoRA layer under this module has an adapter 'missing'"):
        sk.adapter_parameters(blocks[0], "missing")
    with pytest.raises(ValueError, match="this model has no ShareLoRA adapters"):
        sk.adapter_parameters(model.model.embed_tokens)


LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
PAPER_SETS = {
    "llama": [[16, 17], [18, 19], [20, 21, 22], [23, 24, 25, 26, 27], [28, 29, 30]],
    "llama2": [[17, 18], [19, 20], [21, 22, 23], [24, 25, 26, 27], [28, 29]],
}


@pytest.mark.parametrize("kwargs, expected", [
    (dict(method="lora", r=8), 14_024_704),
    (dict(method="similarity", r=9, share_sets=PAPER_SETS["llama"]), 10_847_232),
    (dict(method="similarity", r=9, share_sets=PAPER_SETS["llama2"]), 11_833_344),
])
def test_paper_parameter_counts_on_meta_llama_7b(kwargs, expected):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA7B))
    sk.apply(model, sk.ShareLoRAConfig(target_modules=TARGETS, **kwargs))
    assert sk.trainable_parameters(model) == expected
    assert sk.parameter_breakdown(model)["part:lora"] == expected


def test_meta_device_model_materialised_with_reset_parameters():
    """Built on meta (FSDP style), moved with to_empty(), base weights loaded, adapters re-initialised
    by reset_parameters(): B is zero again (outputs equal the base) and A has its kaiming init."""
    base = tiny_model(layers=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(base.config)
    sk.apply(model, sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_slice"]))
    model.to_empty(device="cpu")
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for name, buf in base.named_buffers():  # non-persistent ones (rotary inv_freq) too
            model.get_buffer(name).copy_(buf)
    for m in model.modules():
        if isinstance(m, AdapterStore):
            m.reset_parameters()
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, base(ids).logits, rtol=0, atol=0)
    for name, p in adapter_tensors(model).items():
        spec = model.sharelora_plan.tensors[name]
        assert torch.isfinite(p).all()
        assert (p == 0).all() if spec.init == "zeros" else 0 < p.std() < 1


def test_expand_rank_keeps_count_at_or_under_lora():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA7B))
    sk.apply(model, sk.ShareLoRAConfig(method="similarity", r=8, share_sets=PAPER_SETS["llama"], expand_rank=True,
                                       target_modules=TARGETS))
    assert sk.expanded_rank(32, PAPER_SETS["llama"], 8) == 11  # floor(32 / 22 * 8)
    assert sk.expanded_rank(32, PAPER_SETS["llama"], 8, layers=range(16, 19)) == 12  # {16,17},{18}: floor(3 / 2 * 8)
    assert sk.trainable_parameters(model) == 54784 * 11 * 22 <= 14_024_704


@pytest.mark.parametrize("targets, extra, sets", [
    (["q_proj", "lm_head"], {}, [[0, 1, 2, 3]]),  # lm_head: outside the layers, shares nothing, keeps r
    (["q_proj"], dict(layers_to_transform=[1, 2, 3]), [[0, 1, 2]]),  # layer 0 has no adapter: saves nothing
    (["q_proj", "v_proj"], dict(layers_to_transform=[0, 1, 3]), [[0, 1, 2, 3]]),
])
def test_expand_rank_counts_only_adapted_modules(targets, extra, sets):
    def count(**kw):
        return sk.trainable_parameters(sk.apply(tiny_model(layers=4), sk.ShareLoRAConfig(r=3, target_modules=targets,
                                                                                         **extra, **kw)))

    lora = count(method="lora")
    assert count(method="similarity", share_sets=sets) < count(method="similarity", share_sets=sets,
                                                               expand_rank=True) <= lora


@st.composite
def adapted_modules(draw):
    """(num_layers, modules, share sets): module types adapted in drawn layers, maybe a head outside them."""
    num_layers = draw(st.integers(1, 8))
    modules = []
    for t in range(draw(st.integers(1, 3))):
        k, n = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        for layer in draw(st.sets(st.integers(0, num_layers - 1), min_size=1)):
            modules.append(ModuleInfo(f"layers.{layer}.t{t}", layer, f"t{t}", k, n, "layers"))
    if draw(st.booleans()):
        modules.append(ModuleInfo("head", None, "head", draw(st.integers(1, 5)), draw(st.integers(1, 5))))
    order = draw(st.permutations(range(num_layers)))
    cuts = sorted(draw(st.sets(st.integers(1, num_layers), max_size=num_layers)) | {num_layers})
    adapted = {m.layer for m in modules}
    sets = [sorted(order[a:b]) for a, b in zip([0] + cuts, cuts) if b - a > 1 and adapted & set(order[a:b])]
    return num_layers, modules, sets


@settings(max_examples=200, deadline=None)
@given(case=adapted_modules(), r=st.integers(1, 9))
def test_expand_rank_never_exceeds_lora(case, r):
    num_layers, modules, sets = case
    lora = build_plan(sk.ShareLoRAConfig(r=r), modules, num_layers).parameter_count()
    plan = build_plan(sk.ShareLoRAConfig(method="similarity", r=r, share_sets=sets, expand_rank=True), modules,
                      num_layers)
    assert plan.parameter_count() <= lora
    assert all(m.rank == r for m in plan.modules.values() if m.info.layer is None)


@pytest.mark.parametrize("args, match", [
    ((2, [[0, 1, 2, 3]], 8), r"share_sets\[0\] \[0, 1, 2, 3\] holds layer 2, outside \[0, 2\)"),
    ((0, [], 8), "num_layers must be >= 1, got 0"),
    ((4, [], 0), "r must be >= 1, got 0"),
    ((10, [[1, 2]], 8.5), "r must be an integer, got 8.5"),  # gave 9.0
    ((10, [[1, 2]], True), "r must be an integer, got True"),
    ((True, [], 8), "num_layers must be an integer, got True"),
    ((10, [[1, 2]], 8, [True, 2]), r"layers must be distinct .* got \[True, 2\]"),  # True counted as layer 1
    ((10, [[1, 2]], 8, [1.5, 2]), r"layers must be distinct .* got \[1.5, 2\]"),
    ((4, [[0, 1]], 8, [1, 1]), r"layers must be distinct layer indices in \[0, 4\), at least one, got \[1, 1\]"),
    ((4, [[0, 1]], 8, [4]), r"layers must be distinct .* got \[4\]"),
    ((8, [[0, 1], [1, 2]], 8), r"share_sets\[1\] \[1, 2\] holds layer 1 and so does share_sets\[0\]"),
    ((8, [[3, 3]], 8), r"share_sets\[0\] \[3, 3\] holds layer 3 twice"),
])
def test_expanded_rank_names_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        sk.expanded_rank(*args)


def test_bishare_breakdown_by_part():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA7B))
    sk.apply(model, sk.ShareLoRAConfig(method="bishare", shape_transform="slice", target_modules=TARGETS))
    b = sk.parameter_breakdown(model)
    assert b["part:local"] == 54784 * 2 * 32
    assert b["part:intra"] == 4 * (11008 + 11008) * 32  # (r, K_max) + (N_max, r) per layer; down_proj has K=11008
    assert b["part:inter"] == 32 * (11008 + 11008)
    assert sk.trainable_parameters(model) == b["part:local"] + b["part:intra"] + b["part:inter"]


def test_generic_module_layer_index_from_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(6, 3)

    net = Net()
    infos, layers = find_target_modules(net, sk.ShareLoRAConfig(target_modules=["proj", "head"]))
    assert [(m.name, m.layer, m.module_type) for m in infos] == [("blocks.0.proj", 0, "proj"), ("blocks.1.proj", 1, "proj"),
                                                                 ("head", None, "head")]
    assert layers == 2
    sk.apply(net, sk.ShareLoRAConfig(method="share_a", r=2, target_modules=["proj"]))
    assert net.blocks[0].proj.lora_paths[0].A is net.blocks[1].proj.lora_paths[0].A


def test_linear_subclass_overriding_forward_is_refused_by_qualified_name():
    """A subclass that keeps nn.Linear's forward is a plain linear base; one that overrides it (a
    quantizer's) is refused by apply and by SharedLoRALinear alike, before anything changes."""
    class KeepsForward(nn.Linear):
        pass

    class QuantLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x.round())

    net = nn.Module()
    net.q_proj = KeepsForward(4, 4)
    sk.apply(net, sk.ShareLoRAConfig(target_modules=["q_proj"]))
    assert isinstance(net.q_proj, sk.SharedLoRALinear)
    net = nn.Module()
    net.q_proj = QuantLinear(4, 4)
    qualified = f"{__name__}.test_linear_subclass_overriding_forward_is_refused_by_qualified_name.<locals>.QuantLinear"
    with pytest.raises(TypeError, match=f"'q_proj' is a {qualified}, which subclasses nn.Linear but overrides its forward"):
        sk.apply(net, sk.ShareLoRAConfig(target_modules=["q_proj"]))
    assert type(net.q_proj) is QuantLinear and net.q_proj.weight.requires_grad
    with pytest.raises(TypeError, match="QuantLinear, which subclasses nn.Linear but overrides its forward"):
        sk.SharedLoRALinear(QuantLinear(4, 4), r=2)


def test_share_sets_naming_layers_without_targets_are_refused():
    """A share set must name layers that hold target modules (it may name others besides: sets are found
    over every layer); one holding a single adapted layer shares nothing, which a warning says."""
    model = tiny_model(layers=4)
    with pytest.raises(ValueError, match=r"share_sets\[1\] \[0, 3\] names no layer that holds a target module: "
                                         r"the target modules lie in layers \[1, 2\] \(layers_to_transform \[1, 2\]\)"):
        sk.apply(model, sk.ShareLoRAConfig(method="similarity", share_sets=[[1, 2], [0, 3]], layers_to_transform=[1, 2]))
    assert not any(isinstance(m, sk.SharedLoRALinear) for m in model.modules())
    with pytest.warns(UserWarning, match=r"share_sets\[0\] \[0, 1\] shares nothing: only its layer 1 holds target"):
        sk.apply(model, sk.ShareLoRAConfig(method="similarity", share_sets=[[0, 1]], layers_to_transform=[1, 2]))


def test_zero_width_base_is_refused():
    net = nn.Module()
    net.q_proj = nn.Linear(0, 4)
    with pytest.raises(ValueError, match="'q_proj' has in_features=0, out_features=4"):
        sk.apply(net, sk.ShareLoRAConfig(target_modules=["q_proj"]))
    assert type(net.q_proj) is nn.Linear
    with pytest.raises(ValueError, match="in_features=4, out_features=0"):
        sk.SharedLoRALinear(nn.Linear(4, 0), r=2)


def test_tied_lm_head_is_refused():
    model = tiny_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="lm_head.*tied to 'model.embed_tokens.weight'"):
        sk.apply(model, sk.ShareLoRAConfig(target_modules=["q_proj", "lm_head"]))


def test_no_target_and_double_apply_and_kron_misfit_errors():
    with pytest.raises(ValueError, match="no target module"):
        sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=r".*\.nope"))
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="already has ShareLoRA"):
        sk.apply(model, sk.ShareLoRAConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"kron_dim=12 does not divide in_features=32 of module 'model.layers.0.self_attn.q_proj'"):
        sk.apply(tiny_model(), sk.ShareLoRAConfig(method="bishare", shape_transform="kron", kron_dim=12, target_modules=TARGETS))
    with pytest.raises(ValueError, match="layer 9"):
        sk.apply(tiny_model(), sk.ShareLoRAConfig(method="similarity", share_sets=[[2, 9]], target_modules=TARGETS))



def test_arguments_of_the_wrong_type_are_named():
    with pytest.raises(TypeError, match="apply takes a torch.nn.Module and a ShareLoRAConfig, got a LlamaForCausalLM "
                                        "and a dict"):
        sk.apply(tiny_model(), {"r": 4})
    with pytest.raises(TypeError, match="got a str and a ShareLoRAConfig"):
        sk.apply("path/to/model", sk.ShareLoRAConfig())
    with pytest.raises(ValueError, match="group_inputs must be true or false, got 'yes'"):
        sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=TARGETS), group_inputs="yes")


def test_kronecker_ranks_above_kron_dim_are_warned_about():
    """A Kronecker path's rank is at most kron_dim: a larger intra_r / inter_r trains ranks that add nothing."""
    config = sk.ShareLoRAConfig(method="bishare", shape_transform="kron", kron_dim=8, target_modules=TARGETS)
    with pytest.warns(UserWarning, match=r"inter-layer Kronecker paths have rank inter_r=16 above kron_dim=8"):
        sk.apply(tiny_model(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.apply(tiny_model(), dataclasses.replace(config, inter_r=8))


def test_a_refused_apply_leaves_the_model_as_it_was():
    """A second apply (other targets), input groups on an unknown architecture, a config edited into
    an invalid one: each raises before any module is wrapped or frozen."""
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=["q_proj"]))
    before = adapter_tensors(model)
    with pytest.raises(ValueError, match="already has ShareLoRA"):
        sk.apply(model, sk.ShareLoRAConfig(target_modules=["o_proj"]))
    assert adapter_tensors(model) == before and type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    fresh = tiny_model()
    fresh.config.model_type = "phi3"
    with pytest.raises(ValueError, match="model types"):
        sk.apply(fresh, sk.ShareLoRAConfig(target_modules=TARGETS), group_inputs=True)
    config = sk.ShareLoRAConfig(target_modules=TARGETS)
    config.r = 0
    with pytest.raises(ValueError, match="r must be"):
        sk.apply(fresh, config)
    assert not any(isinstance(m, sk.SharedLoRALinear) for m in fresh.modules())
    assert all(p.requires_grad for p in fresh.parameters())


def test_new_layers_keep_the_mode_of_the_layers_they_replace():
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=TARGETS, dropout=0.5))  # tiny_model: eval
    assert not any(m.training for m in model.modules())
    randomize_adapters(model)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert all(m.training for m in sk.apply(tiny_model().train(), sk.ShareLoRAConfig(target_modules=TARGETS)).modules())


def stacked_model() -> nn.Module:
    """An encoder and a decoder stack with the same module names in each layer (like BART/T5)."""
    net = nn.Module()
    for stack in ("encoder", "decoder"):
        layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.q_proj = nn.Linear(8, 8)
            layers.append(layer)
        setattr(net, stack, nn.Module())
        getattr(net, stack).layers = layers
    return net


def test_plans_that_would_share_across_stacks_are_refused():
    with pytest.raises(ValueError, match="share set.*'encoder.layers.0.q_proj' and 'decoder.layers.0.q_proj' lie in "
                                         "different stacks of layers .*target the modules of one stack"):
        sk.apply(stacked_model(), sk.ShareLoRAConfig(method="similarity", r=2, target_modules=["q_proj"]))
    one_stack = sk.apply(stacked_model(), sk.ShareLoRAConfig(method="similarity", r=2, share_sets=[[0, 1]],
                                                             target_modules=r"encoder\.layers\.\d+\.q_proj"))
    assert len(sk.model.shared_layers(one_stack)) == 2 and len(one_stack.sharelora_plan.tensors) == 2
    with pytest.raises(ValueError, match="different stacks of layers.*intra_r=0"):
        sk.apply(stacked_model(), sk.ShareLoRAConfig(method="bishare", local_r=1, intra_r=2, inter_r=2,
                                                     target_modules=["q_proj"]))
    model = sk.apply(stacked_model(), sk.ShareLoRAConfig(method="bishare", local_r=1, intra_r=0, inter_r=2,
                                                         target_modules=["q_proj"]))
    assert len(sk.model.shared_layers(model)) == 4
    assert len(sk.model.shared_layers(sk.apply(stacked_model(), sk.ShareLoRAConfig(r=2, target_modules=["q_proj"])))) == 4


def test_half_precision_base_gets_float32_adapters_and_runs():
    model = sk.apply(tiny_model(dtype=torch.bfloat16), sk.ShareLoRAConfig(method="bishare", target_modules=TARGETS,
                                                                           gate_dims=(8, 8)))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    randomize_adapters(model)
    logits = model(token_batch()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_apply_group_inputs_groups_qkv_and_gate_up_with_same_outputs():
    base = tiny_model("llama", layers=2)
    config = sk.ShareLoRAConfig(target_modules=TARGETS + ["gate_proj"], **METHOD_CONFIGS["bishare_slice"])
    plain = sk.apply(copy.deepcopy(base), config)
    grouped = sk.apply(copy.deepcopy(base), config, group_inputs=True)
    randomize_adapters(plain)
    grouped.load_state_dict(plain.state_dict())
    attn = grouped.model.layers[0].self_attn
    assert attn.q_proj.input_group is attn.k_proj.input_group is attn.v_proj.input_group
    ids = token_batch()
    torch.testing.assert_close(grouped(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)


def test_a_pending_group_output_is_not_served_after_what_it_read_changed():
    """q_proj(x) computes k's output too (train mode, dropout: one shared mask); k_proj(x) takes it
    only while nothing it was computed from changed: adapters disabled, x or k's B written in place."""
    config = sk.ShareLoRAConfig(method="lora", r=4, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"])
    model = sk.apply(tiny_model("llama", layers=1), config, group_inputs=True)
    randomize_adapters(model)
    model.train()
    attn = model.model.layers[0].self_attn
    group, x = attn.q_proj.input_group, torch.randn(6, 32)
    base_k = lambda x: torch.nn.functional.linear(x, attn.k_proj.weight)  # noqa: E731  (no bias)
    attn.q_proj(x)
    pending = group._pending[1][2]
    assert attn.k_proj(x) is pending and 1 not in group._pending  # unchanged: the group's output, consumed
    attn.q_proj(x)
    with sk.disable_adapters(model):
        assert torch.equal(attn.k_proj(x), base_k(x))
    attn.q_proj(x)
    with torch.no_grad():
        x.zero_()
    assert attn.k_proj(x).abs().max() == 0
    x = torch.randn(6, 32)
    attn.q_proj(x)
    with torch.no_grad():
        attn.k_proj.lora_paths[0].B.zero_()
    assert torch.equal(attn.k_proj(x), base_k(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # q under autocast, k outside it: k's output was bf16
        attn.q_proj(x)
    assert attn.k_proj(x).dtype == torch.float32


@pytest.mark.parametrize("how", ["assign_load", "data", "base_data", "double"])
def test_a_pending_group_output_is_not_served_after_a_tensor_it_read_is_replaced(how):
    """Replacing a tensor (an assign-load, ``p.data = ...``, a dtype conversion) bumps no version: the
    pending output is told stale by the plan that computed it, and k runs on the current tensors."""
    config = sk.ShareLoRAConfig(method="lora", r=4, dropout=1e-7, target_modules=["q_proj", "k_proj", "v_proj"])
    model = sk.apply(tiny_model("llama", layers=1), config, group_inputs=True)
    randomize_adapters(model)
    model.train()
    attn = model.model.layers[0].self_attn
    x = torch.randn(6, 32)
    attn.q_proj(x)  # k's and v's outputs pending
    if how == "assign_load":
        model.load_state_dict({k: v * 3 if "sharelora" in k else v for k, v in model.state_dict().items()}, assign=True)
    elif how == "data":
        for p in model.sharelora_adapters.parameters():
            p.data = p.data * 3
    elif how == "base_data":
        attn.k_proj.weight.data = attn.k_proj.weight.data * 3
    else:  # the model converted: k's pending float32 output is gone, and x now has the wrong dtype
        model.double()
        with pytest.raises(ValueError, match="input dtype torch.float32 does not match the weight dtype torch.float64"):
            attn.k_proj(x)
        return
    got = attn.k_proj(x)
    sk.grouping.disable_input_groups(model)  # the same layer alone, on the current tensors
    assert torch.equal(got, attn.k_proj(x))


def test_grouped_model_deepcopies_and_pickles_independently():
    """Input groups live on the layers as plain attributes: a deep copy gets its own groups (reading
    its own weights), and the model pickles."""
    import pickle

    config = sk.ShareLoRAConfig(target_modules=TARGETS + ["gate_proj"], **METHOD_CONFIGS["bishare_slice"])
    model = sk.apply(tiny_model("llama", layers=2), config, group_inputs=True)
    randomize_adapters(model)
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
        clone = copy.deepcopy(model)
        attn = clone.model.layers[0].self_attn
        assert attn.q_proj.input_group is attn.k_proj.input_group is not model.model.layers[0].self_attn.q_proj.input_group
        assert attn.q_proj.input_group.members[0] is attn.q_proj
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3)
        assert torch.equal(clone(ids).logits, expected)
        restored = pickle.loads(pickle.dumps(clone))
        assert torch.equal(restored(ids).logits, expected)
