"""Named adapters through sharelora_kernels.apply: a second adapter, set / disable / delete / unload,
save and load by name, and a Transformers save_pretrained that keeps the adapters."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

import sharelora_kernels as sk
from sharelora_kernels.model import adapter_names, adapter_tensors, shared_layers
from tiny_models import TARGETS, logits, randomize_adapters, tiny_family, tiny_model, token_batch

SECOND = sk.ShareLoRAConfig(method="bishare", target_modules=["q_proj", "o_proj"], local_r=1, intra_r=2, inter_r=2)


def two_adapters():
    """(base, a LLaMA with adapter "default" (share_a) and "other" (bishare, other targets), both random
    and "default" active, its logits with "default", its logits with "other")."""
    base = tiny_model(layers=2)
    ids = token_batch()
    model = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(method="share_a", r=3, target_modules=TARGETS))
    randomize_adapters(model)
    first = logits(model, ids)
    sk.apply(model, SECOND, adapter_name="other")
    sk.set_adapter(model, "other")
    randomize_adapters(model, seed=3)  # only the active adapter trains
    other = logits(model, ids)
    sk.set_adapter(model, "default")
    return base, model, first, other


def test_a_second_adapter_has_its_own_tensors_and_only_the_active_one_computes_and_trains():
    base, model, first, other = two_adapters()
    ids = token_batch()
    assert torch.equal(logits(model, ids), first)
    assert adapter_names(model) == ["default", "other"]
    assert not set(map(id, adapter_tensors(model, "default").values())) & set(map(id, adapter_tensors(model, "other").values()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"sharelora_adapters.default.{t.replace('.', '/')}" for t in model.sharelora_plans["default"].tensors}
    sk.set_adapter(model, "other")
    assert torch.equal(logits(model, ids), other)
    assert all(n.startswith("sharelora_adapters.other.") for n, p in model.named_parameters() if p.requires_grad)
    assert (other - first).abs().max() > 1e-2
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.active_adapters == ["other"] and list(layer.adapter_paths) == ["default", "other"]
    assert len(layer.active_path_modules()) == 3  # local, intra, inter
    with sk.disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(base, ids))
        assert layer.active_path_modules() == []
    assert torch.equal(logits(model, ids), other)
    sk.set_adapter(model, "default")
    assert torch.equal(logits(model, ids), first)


def test_disabling_a_merged_model_unmerges_it_and_computes_the_base():
    """As PEFT's LoRA: disable_adapters on a merged model unmerges it first (it stays unmerged)."""
    base, model, first, _ = two_adapters()
    ids = token_batch()
    sk.merge(model)
    with sk.disable_adapters(model):
        assert torch.allclose(logits(model, ids), logits(base, ids), atol=1e-5)
    assert not any(layer.merged for layer in shared_layers(model))
    assert torch.allclose(logits(model, ids), first, atol=1e-5)


def test_a_merge_while_adapters_are_disabled_is_refused_before_it_changes_anything():
    """Merged there, the disabled model would compute the adapter (PEFT undoes such a merge at its
    next forward): refused, nothing merged, the block still computes the base."""
    base, model, first, _ = two_adapters()
    ids = token_batch()
    with sk.disable_adapters(model):
        with pytest.raises(ValueError, match=r"adapters are disabled \(disable_adapters\): a merge now"):
            sk.merge(model)
        assert not any(layer.merged for layer in shared_layers(model))
        assert torch.allclose(logits(model, ids), logits(base, ids), atol=1e-5)
    assert torch.allclose(logits(model, ids), first, atol=1e-5)


def test_modules_to_save_train_only_while_their_adapter_is_active():
    """A classifier's head (a module to save of "default", trained in place) is frozen while another
    adapter is active, trains again with "default", and stays frozen once "default" is deleted."""
    model = sk.apply(tiny_family("llama", head="seq_cls", num_labels=3, pad_token_id=0),
                     sk.ShareLoRAConfig(method="share_a", r=2))
    sk.apply(model, sk.ShareLoRAConfig(target_modules=["q_proj"], modules_to_save=[]), adapter_name="two")

    def trained():
        return {n.rpartition(".")[0] for n, p in model.named_parameters() if p.requires_grad}

    assert model.sharelora_plan.modules_to_save == ["score"] and trained() == {"sharelora_adapters.default", "score"}
    with pytest.raises(ValueError, match=r"adapter 'default' owns modules to save \(\['score'\]\): pass modules_to_save"):
        sk.apply(model, sk.ShareLoRAConfig(target_modules=["q_proj"], modules_to_save=["score"]), adapter_name="three")
    sk.set_adapter(model, "two")
    assert trained() == {"sharelora_adapters.two"}
    sk.set_adapter(model, "default")
    assert trained() == {"sharelora_adapters.default", "score"}
    with pytest.warns(UserWarning, match="'two' is active now"):
        sk.delete_adapter(model, "default")
    assert trained() == {"sharelora_adapters.two"}


def test_safe_merge_checks_every_module_before_changing_any():
    base, model, first, _ = two_adapters()
    ids = token_batch()
    layers = shared_layers(model)
    with torch.no_grad():
        adapter_tensors(model)["model.layers.1.mlp.down_proj.B"].fill_(float("nan"))  # the last module merged
    with pytest.raises(ValueError, match=r"non-finite values into the base weight of module 'model.layers.1.mlp."
                                         r"down_proj'; nothing was merged"):
        sk.unload(model, merge=True, safe_merge=True)
    assert shared_layers(model) == layers and not any(layer.merged for layer in layers)
    with sk.disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(base, ids))


def test_paths_version_changes_with_what_a_layer_computes():
    _, model, _, _ = two_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    seen = [layer._paths_version]
    for step in (lambda: sk.set_adapter(model, "other"), lambda: layer.enable_adapters(False),
                 lambda: layer.enable_adapters(True), lambda: sk.merge(model), lambda: sk.unmerge(model),
                 lambda: sk.delete_adapter(model, "other")):
        step()
        assert layer._paths_version != seen[-1]
        seen.append(layer._paths_version)
    assert seen[2] != seen[1] and seen[3] == seen[1]  # disabled, then enabled again: "other" active as before
    assert seen[5] == seen[1]  # merged, then unmerged
    assert seen[6] not in seen[:6]  # an adapter deleted: a state never seen (another path list)


def test_a_layers_adapter_containers_are_read_only():
    """Its call plans are built from them: an edit made in place (a path list, a dropout) would be
    seen by some calls and not others, so it is refused, and add_adapter / delete_adapter change them."""
    _, model, _, _ = two_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    paths = layer.adapter_paths["default"]
    ids = token_batch()
    before = model(ids).logits
    for edit in (lambda: paths.append(paths[0]), lambda: paths.pop(0), lambda: paths.__delitem__(0),
                 lambda: paths.__setitem__(0, paths[0]), lambda: paths.extend([]),
                 lambda: layer.adapter_paths.__setitem__("x", paths), lambda: layer.adapter_paths.pop("other")):
        with pytest.raises(TypeError, match="read-only here: change them through the layer"):
            edit()
    with pytest.raises(TypeError, match="does not support item assignment"):
        layer.adapter_dropout["default"] = 0.9
    assert len(paths) == 1 and list(layer.adapter_paths) == ["default", "other"] and layer.dropout == 0.0
    assert torch.equal(model(ids).logits, before)
    copy.deepcopy(model)  # copies and pickles rebuild them without an edit
    pickle.loads(pickle.dumps(layer))


def test_a_paths_tensor_is_not_replaced_through_the_path():
    """path.B = t stored t on the path, which path.B then read while the layer kept computing with the
    store's tensor (and a Parameter gave torch's bare KeyError): refused, naming the store's tensor;
    an in-place change through the path reaches the layer."""
    _, model, _, _ = two_adapters()
    path = model.model.layers[0].self_attn.q_proj.adapter_paths["default"][0]
    ids = token_batch()
    before = model(ids).logits
    for value in (torch.zeros_like(path.B), nn.Parameter(torch.zeros_like(path.B))):
        with pytest.raises(TypeError, match=r"path.B is the adapter tensor .* of the model's store"):
            path.B = value
    assert path.B is path.as_path().tensors[1] and torch.equal(model(ids).logits, before)
    with torch.no_grad():
        path.B.zero_()
    assert not torch.equal(model(ids).logits, before)


def test_switching_back_reuses_each_layers_call_plan(monkeypatch):
    """A DPO-style step (the policy, then the reference under disable_adapter) and two adapters in
    turn build each layer's plans once: switching back finds the plan of that state, whose outputs
    stay exact."""
    from sharelora_kernels.layer import SharedLoRALinear

    _, model, first, other = two_adapters()
    ids = token_batch()
    builds = []
    build = SharedLoRALinear._build_plan
    monkeypatch.setattr(SharedLoRALinear, "_build_plan", lambda self, x, env: builds.append(1) or build(self, x, env))
    layers = [m for m in model.modules() if isinstance(m, SharedLoRALinear)]

    def cycle():
        sk.set_adapter(model, "default")
        got = [logits(model, ids)]
        with sk.disable_adapters(model):
            base = logits(model, ids)
        sk.set_adapter(model, "other")
        got.append(logits(model, ids))
        return got, base

    cycle()
    assert 0 < len(builds) <= 3 * len(layers)
    first_cycle = len(builds)
    (got_first, got_other), base = cycle()
    assert len(builds) == first_cycle  # the second cycle built nothing
    assert torch.equal(got_first, first) and torch.equal(got_other, other)
    with sk.disable_adapters(model):
        assert torch.equal(logits(model, ids), base)


def test_save_and_load_by_name_and_merge_and_unload(tmp_path):
    base, model, first, other = two_adapters()
    ids = token_batch()
    fresh = tiny_model(layers=2)
    sk.save(model, tmp_path / "a")
    sk.save(model, tmp_path / "b", adapter_name="other")
    sk.load(fresh, tmp_path / "a")
    sk.load(fresh, tmp_path / "b", adapter_name="other")
    assert adapter_names(fresh) == ["default", "other"] and torch.equal(logits(fresh, ids), first)
    sk.set_adapter(fresh, "other")
    assert torch.equal(logits(fresh, ids), other)
    plain = sk.merge_and_unload(fresh)
    assert not any(isinstance(m, sk.SharedLoRALinear) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("sharelora" in n for n in plain.state_dict())
    assert torch.allclose(logits(plain, ids), other, atol=1e-5)
    assert torch.equal(logits(sk.unload(model), ids), logits(base, ids))


def test_a_refused_merge_and_unload_unwraps_nothing():
    """Inside disable_adapters merge_and_unload is refused; it had already put back the modules it
    met before the first layer of the active adapter (layer 0's q_proj, holding only "other")."""
    model = tiny_model(layers=2)
    sk.apply(model, sk.ShareLoRAConfig(method="lora", r=2, target_modules=["v_proj"]))
    sk.apply(model, sk.ShareLoRAConfig(method="lora", r=2, target_modules=["q_proj"]), adapter_name="other")
    randomize_adapters(model)
    sk.set_adapter(model, "other")
    randomize_adapters(model, seed=3)
    ids = token_batch()
    other = logits(model, ids)
    sk.set_adapter(model, "default")
    with sk.disable_adapters(model):
        with pytest.raises(ValueError, match="adapters are disabled"):
            sk.merge_and_unload(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, sk.SharedLoRALinear)
    sk.set_adapter(model, "other")
    assert torch.equal(logits(model, ids), other)
    for kwargs in (dict(adapter_names=["other"]), dict(safe_merge=True)):  # a merge's options, without a merge
        with pytest.raises(ValueError, match="adapter_names and safe_merge choose what a merge folds in"):
            sk.unload(model, **kwargs)
    assert adapter_names(model) == ["default", "other"] and torch.equal(logits(model, ids), other)


def test_save_pretrained_of_an_applied_model_restores_every_adapter(tmp_path, monkeypatch):
    _, model, first, other = two_adapters()
    ids = token_batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "other" / "adapter.safetensors").is_file()
    restored = AutoModelForCausalLM.from_pretrained(tmp_path)  # the base: the adapter tensors are skipped
    assert not any("sharelora" in k for k in restored.state_dict())
    sk.load(restored, tmp_path)
    sk.load(restored, tmp_path / "other", adapter_name="other")
    assert torch.equal(logits(restored, ids), first)
    sk.set_adapter(restored, "other")
    assert torch.equal(logits(restored, ids), other)
    clone = pickle.loads(pickle.dumps(restored))
    assert clone.save_pretrained.model is clone and torch.equal(logits(clone, ids), other)
    monkeypatch.setattr(sk.model, "ADAPTER_WRITERS", [])  # no writer (checkpoint not imported): one line says what to call
    with pytest.warns(UserWarning, match=r"not its adapters \['default', 'other'\].*call sharelora_kernels.save\(model"):
        clone.save_pretrained(tmp_path / "again")


def test_bad_names_and_refusals_leave_the_model_as_it_was():
    _, model, _, _ = two_adapters()
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; its adapters are \['default', 'other'\]"):
        sk.set_adapter(model, "nope")
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; its adapters are"):
        sk.delete_adapter(model, "nope")
    with pytest.raises(ValueError, match="already has ShareLoRA adapters, one named 'other'"):
        sk.apply(model, SECOND, adapter_name="other")
    with pytest.raises(ValueError, match="adapter name must be a non-empty string without '.'"):
        sk.apply(model, SECOND, adapter_name="a.b")
    with pytest.raises(ValueError, match=r"modules_to_save \['lm_head'\] train in full in place, and only the first "
                                         r"adapter of a model may have them \(this one has adapters \['default', 'other'\]\)"):
        sk.apply(model, sk.ShareLoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter_name="x")
    assert adapter_names(model) == ["default", "other"] and "x" not in model.sharelora_adapters
    sk.set_adapter(model, ["default", "other"])
    with pytest.raises(ValueError, match="export_peft writes the active adapter, and this model has 2 active"):
        sk.export_peft(model, "unused")
    with pytest.raises(ValueError, match=r"2 active adapters .*this call reads one: name it with adapter_name= "
                                         r"where the function takes it, or make one active first"):
        sk.parameter_breakdown(model)
    sk.set_adapter(model, "default")
    sk.merge(model)
    with pytest.raises(ValueError, match="merged"):
        sk.delete_adapter(model, "default")
    sk.unmerge(model)
    with pytest.warns(UserWarning, match="'other' is active now"):
        sk.delete_adapter(model, "default")
    assert model.sharelora_active == ["other"] and list(model.sharelora_adapters) == ["other"]
    sk.delete_adapter(model, "other")  # the last one, as PEFT allows: the layers compute their base
    assert adapter_names(model) == [] and model.model.layers[0].self_attn.q_proj.active_path_modules() == []
    sk.apply(model, SECOND, adapter_name="again")  # a new first adapter on the layers still wrapped
    assert model.sharelora_active == ["again"] and len(model.model.layers[0].self_attn.q_proj.active_path_modules()) == 3


def test_a_state_dict_of_the_earlier_store_layout_loads_into_each_adapter():
    """Keys saved when each adapter had its store on the model (``sharelora_adapters.<tensor>`` for
    "default", ``sharelora_adapters_<name>.<tensor>``: a Trainer checkpoint of that time) load
    strictly into the adapters they belong to; unload takes the key hook out with the stores."""
    base, model, first, other = two_adapters()
    state = model.state_dict()
    earlier = {k.replace("sharelora_adapters.default.", "sharelora_adapters.")
                .replace("sharelora_adapters.other.", "sharelora_adapters_other."): v for k, v in state.items()}
    named = [k for k in earlier if k.startswith("sharelora_adapters_other.")]
    assert len(named) == len(model.sharelora_adapters["other"]._parameters)
    fresh = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(method="share_a", r=3, target_modules=TARGETS))
    sk.apply(fresh, SECOND, adapter_name="other")
    fresh.load_state_dict(earlier)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(logits(fresh, token_batch()), first)
    sk.set_adapter(fresh, "other")
    assert torch.equal(logits(fresh, token_batch()), other)
    sk.unload(fresh)
    assert "sharelora_adapters" not in fresh._modules and not fresh._load_state_dict_pre_hooks


@pytest.mark.parametrize("name", ["keys", "train", "training", "a/b", "/tmp/x", "a\\b", "sharelora_adapters"])
def test_an_adapter_name_the_stores_module_or_a_folder_cannot_take_is_refused(name):
    """(sharelora_adapters: the PEFT method saved its modules to save under keys read back as the stores')"""
    model = sk.apply(tiny_model(layers=1), sk.ShareLoRAConfig(r=2))
    message = ("no '/' or" if "/" in name or "\\" in name else
               "'sharelora_adapters' cannot name an adapter: it names the module holding the adapter stores"
               if name == "sharelora_adapters" else
               f"'{name}' cannot name an adapter: it is an attribute of the module holding the adapter stores")
    with pytest.raises(ValueError, match=message):
        sk.apply(model, sk.ShareLoRAConfig(r=2), adapter_name=name)
    assert adapter_names(model) == ["default"]


def test_a_name_given_twice_is_refused_and_a_string_is_one_name():
    """set_adapter(["other", "other"]) would compute "other" twice (and merge it twice); unload and
    merge_and_unload take one name as a string, as set_adapter does, not its letters."""
    base, model, first, other = two_adapters()
    ids = token_batch()
    with pytest.raises(ValueError, match=r"adapter 'other' is named twice in \['other', 'other'\]"):
        sk.set_adapter(model, ["other", "other"])
    with pytest.raises(ValueError, match="named twice"):
        shared_layers(model)[0].set_adapter(["default", "default"])
    for bad in (None, 3, ["other", None], {"other": 1}):
        with pytest.raises(ValueError, match="adapter names are a name or a list of names, got"):
            sk.set_adapter(model, bad)
    assert torch.equal(logits(model, ids), first)  # nothing changed
    with pytest.raises(ValueError, match="named twice"):
        sk.merge_and_unload(model, ["other", "other"])
    merged = sk.merge_and_unload(copy.deepcopy(model), "other")  # one name: the inactive "other" folded in
    torch.testing.assert_close(logits(merged, ids), other, rtol=1e-4, atol=1e-4)


def test_controls_of_a_model_without_adapters_are_refused():
    """merge, unmerge, unload, merge_and_unload and disable_adapters on a model without ShareLoRA
    adapters raise, as save and set_adapter do, instead of returning as if done."""
    model = tiny_model(layers=2)
    for control in (sk.merge, sk.unmerge, sk.unload, sk.merge_and_unload):
        with pytest.raises(ValueError, match="this model has no ShareLoRA adapters"):
            control(model)
    with pytest.raises(ValueError, match="this model has no ShareLoRA adapters"):
        with sk.disable_adapters(model):
            pass
    with pytest.raises(ValueError, match="merge must be true or false, got 'yes'"):
        sk.unload(two_adapters()[1], merge="yes")
