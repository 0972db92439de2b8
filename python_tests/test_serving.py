"""Many adapters on one base: mixed-adapter batches (sk.mixed_batch and PEFT's adapter_names), every
method, dense and 4-bit bases, generate; the adapter bank (memory, load / delete one, a misfit refused)."""
import copy
import logging

import pytest
import torch

import sharelora_kernels as sk
from sharelora_kernels.model import adapter_names, adapter_store, adapter_tensors
from sharelora_kernels.serving import layer_tables
from tiny_models import METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_model, token_batch
from test_ops_multi_adapter import stacks_of

NAMES = list(METHOD_CONFIGS)


def with_adapters(base, configs: dict, seed: int = 0):
    """A copy of ``base`` with one random named adapter per config (the first active)."""
    model = copy.deepcopy(base)
    for i, (name, config) in enumerate(configs.items()):
        sk.apply(model, sk.ShareLoRAConfig(**config), adapter_name=name)
        sk.set_adapter(model, name)
        randomize_adapters(model, seed=seed + i)
    sk.set_adapter(model, next(iter(configs)))
    return model


@pytest.fixture(scope="module")
def bank():
    """A float64 tiny LLaMA (4 layers) and a copy holding one adapter of every method."""
    base = tiny_model(layers=4, dtype=torch.float64)
    return base, with_adapters(base, METHOD_CONFIGS)


def alone(model, base, name, ids, **generate):
    """Row(s) ``ids`` run with adapter ``name`` alone active ("__base__": the base model)."""
    with torch.no_grad():
        if name == "__base__":
            return base.generate(ids, **generate) if generate else base(ids).logits
        sk.set_adapter(model, name)
        return model.generate(ids, **generate) if generate else model(ids).logits


GREEDY = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)


def test_each_row_equals_its_adapter_alone_every_method_and_base_rows(bank):
    base, model = bank
    rows = NAMES + ["__base__"] + NAMES[::-1][:4]
    ids = token_batch(batch=len(rows), seq=5)
    with torch.no_grad(), sk.mixed_batch(model, rows):
        out = model(ids).logits
    for i, name in enumerate(rows):
        ref = alone(model, base, name, ids[i:i + 1])
        assert (out[i:i + 1] - ref).abs().max() <= 1e-12 * ref.abs().max(), name


def test_a_mixed_batch_is_its_threads_own(bank):
    """A mixed_batch block in one thread neither reaches another thread's calls (plain ones, or its
    own block with other adapters) nor survives blocks ending in another order."""
    import threading

    base, model = bank
    ids = token_batch(batch=2, seq=5)
    with torch.no_grad():
        plain = model(ids).logits
    entered, go, ended = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def serve():
        with torch.no_grad(), sk.mixed_batch(model, ["lora", "__base__"]):
            entered.set()
            go.wait(30)
            seen["thread"] = model(ids).logits
        ended.set()

    worker = threading.Thread(target=serve)
    worker.start()
    assert entered.wait(30)
    with torch.no_grad():
        seen["plain"] = model(ids).logits  # the other thread's block is open
        with sk.mixed_batch(model, ["share_ab", "lora"]):
            go.set()
            assert ended.wait(30)  # its block ends first
            seen["mine"] = model(ids).logits
        seen["after"] = model(ids).logits
    worker.join(30)
    assert torch.equal(seen["plain"], plain) and torch.equal(seen["after"], plain)
    for out, rows in ((seen["thread"], ["lora", "__base__"]), (seen["mine"], ["share_ab", "lora"])):
        for i, name in enumerate(rows):
            ref = alone(model, base, name, ids[i:i + 1])
            assert (out[i:i + 1] - ref).abs().max() <= 1e-12 * ref.abs().max(), name
    assert all(layer.mixed_batch is None for layer in sk.model.shared_layers(model))


def test_greedy_generate_and_beams_follow_each_rows_adapter(bank):
    base, model = bank
    rows = ["lora", "bishare_kron", "__base__", "similarity"]
    ids = token_batch(batch=len(rows), seq=4, seed=5)
    with sk.mixed_batch(model, rows):
        tokens = model.generate(ids, **GREEDY)
    with sk.mixed_batch(model, rows, expand=2):
        beams = model.generate(ids, num_beams=2, **GREEDY)
    for i, name in enumerate(rows):
        assert torch.equal(tokens[i], alone(model, base, name, ids[i:i + 1], **GREEDY)[0]), name
        assert torch.equal(beams[i], alone(model, base, name, ids[i:i + 1], num_beams=2, **GREEDY)[0]), name
    with sk.mixed_batch(model, rows):
        with pytest.raises(ValueError, match="gives 4 rows, the batch has 8"):
            model.generate(ids, num_beams=2, **GREEDY)


def test_encoder_decoder_beams_follow_each_rows_adapter():
    """T5: generate runs the encoder on the rows as given and the decoder on them repeated per beam;
    each row's beams are those of its adapter alone (PEFT's adapter_names does the same)."""
    from tiny_models import tiny_family

    base = tiny_family("t5", head="seq2seq").double()
    model = with_adapters(base, {"a": dict(method="lora", r=2), "b": dict(method="share_ab", r=3)})
    rows = ["a", "b", "__base__"]
    ids = token_batch(batch=3, seq=4) % 55 + 3
    with torch.no_grad(), sk.mixed_batch(model, rows, expand=2):
        beams = model.generate(ids, num_beams=2, **GREEDY)
    for i, name in enumerate(rows):
        assert torch.equal(beams[i], alone(model, base, name, ids[i:i + 1], num_beams=2, **GREEDY)[0]), name


def test_float32_rows_match_the_float64_reference():
    base64 = tiny_model(layers=4, dtype=torch.float64)
    configs = {n: METHOD_CONFIGS[n] for n in ("lora", "similarity", "bishare_kron", "bishare_gate")}
    model64 = with_adapters(base64, configs)
    model32 = copy.deepcopy(model64).float()
    rows = ["bishare_gate", "lora", "__base__", "similarity", "bishare_kron", "lora"]
    ids = token_batch(batch=len(rows), seq=6)
    with torch.no_grad(), sk.mixed_batch(model32, rows):
        out = model32(ids).logits
    for i, name in enumerate(rows):
        ref = alone(model64, base64, name, ids[i:i + 1])
        assert ((out[i:i + 1].double() - ref).abs().max() / ref.abs().max()).item() < 1e-5, name


def test_conv1d_base_with_bias():
    from tiny_models import tiny_family

    base = tiny_family("gpt2").double()  # Conv1D projections (fan_in_fan_out) with biases
    model = with_adapters(base, {"a": dict(method="share_b", r=2), "b": dict(method="lora", r=3)})
    rows = ["b", "__base__", "a"]
    ids = token_batch(batch=3, seq=4)
    with torch.no_grad(), sk.mixed_batch(model, rows):
        out = model(ids).logits
    for i, name in enumerate(rows):
        assert torch.allclose(out[i:i + 1], alone(model, base, name, ids[i:i + 1]), rtol=0, atol=1e-12), name


def test_tables_follow_adapters_added_and_deleted(bank):
    base, model = bank
    model = copy.deepcopy(model)
    ids = token_batch(batch=2, seq=3)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), sk.mixed_batch(model, ["lora", "share_a"]):
        model(ids)
        tables = layer_tables(layer, NAMES)
        sk.set_adapter(model, "share_a")  # what is active does not change the bank's tables
        model(ids)
        assert layer_tables(layer, NAMES) is tables
    sk.apply(model, sk.ShareLoRAConfig(method="lora", r=2), adapter_name="late")
    sk.set_adapter(model, "late")
    randomize_adapters(model, seed=9)
    sk.delete_adapter(model, "share_a")
    rows = ["late", "lora"]
    with torch.no_grad(), sk.mixed_batch(model, rows):
        out = model(ids).logits
    for i, name in enumerate(rows):
        assert torch.allclose(out[i:i + 1], alone(model, base, name, ids[i:i + 1]), rtol=0, atol=1e-12), name
    assert layer_tables(layer, adapter_names(model)) is not tables


def test_adapters_changed_in_place_are_seen_by_the_next_batch(bank):
    """A mixed batch reads its adapters as they are when it starts (the stacked operands are checked
    once per batch, not at every decode step): a change made in place is seen by the next batch."""
    base, _ = bank
    model = with_adapters(base, {"x": METHOD_CONFIGS["bishare_kron"], "y": METHOD_CONFIGS["bishare_kron"]})
    rows = ["x", "y", "x", "y"]  # two adapters of one structure run batched: their stacked operands are kept
    ids = token_batch(batch=4, seq=1)
    with torch.no_grad(), sk.mixed_batch(model, rows):
        first = model(ids).logits
        for p in adapter_store(model, "x").parameters():  # in place, as load() writes a checkpoint
            p.copy_(torch.randn_like(p) * 0.2)
        assert torch.equal(model(ids).logits, first)  # the batch that started before the change
    with torch.no_grad(), sk.mixed_batch(model, rows):
        second = model(ids).logits
    assert (second[0] - first[0]).abs().max() > 1e-3 and torch.equal(second[1], first[1])
    for i in (0, 1):
        assert torch.allclose(second[i:i + 1], alone(model, base, rows[i], ids[i:i + 1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("how", ["fused_adamw", "data"])
@pytest.mark.parametrize("method", ["lora", "bishare_gate"])
def test_changes_that_keep_version_counters_are_seen_by_the_next_batch(bank, how, method):
    """A fused optimizer step (the Trainer's default AdamW) and a write through .data change values
    without bumping a version counter: the next batch still serves the new values."""
    base, _ = bank
    model = with_adapters(base, {"a": METHOD_CONFIGS[method], "b": METHOD_CONFIGS[method]})
    rows, ids = ["a", "b", "a"], token_batch(batch=3, seq=2)
    rows_match_alone(model, base, rows, ids)  # builds the tables and the stacked copies
    params = list(adapter_store(model, "a").parameters())
    versions = [p._version for p in params]
    if how == "fused_adamw":
        for p in params:
            p.grad = torch.randn_like(p)
        torch.optim.AdamW(params, lr=0.1, fused=True).step()
    else:
        for p in params:
            p.data.add_(0.3)
    assert [p._version for p in params] == versions  # nothing a version check could see
    rows_match_alone(model, base, rows, ids)


def rows_match_alone(model, base, rows, ids, tol=1e-12):
    """Each row of a mixed batch of ``rows`` equals its adapter alone (relative to its largest logit)."""
    with torch.no_grad(), sk.mixed_batch(model, rows):
        out = model(ids).logits
    for i, name in enumerate(rows):
        ref = alone(model, base, name, ids[i:i + 1])
        assert (out[i:i + 1] - ref).abs().max() <= tol * ref.abs().max(), name


@pytest.mark.parametrize("how", ["assign", "data", "float_then_double"])
def test_adapter_tensors_replaced_not_in_place_are_seen_by_the_next_batch(bank, how):
    """load_state_dict(assign=True) puts new objects in the store; p.data = ... and a dtype round trip
    (new storage, possibly at the old address, same version) keep the objects: every one is served."""
    base, _ = bank
    model = with_adapters(base, {"a": METHOD_CONFIGS["lora"], "b": METHOD_CONFIGS["lora"]})
    rows, ids = ["a", "b"], token_batch(batch=2, seq=3)
    rows_match_alone(model, base, rows, ids)  # builds the tables and the stacked copies
    if how == "assign":
        state = {k: v + 0.3 if "sharelora" in k else v for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    elif how == "data":
        for p in adapter_store(model, "a").parameters():
            p.data = p.data + 0.3
    else:
        model.float()
        model.double()
    rows_match_alone(model, base, rows, ids)


def test_a_copy_or_pickle_of_a_served_model_serves_its_own_adapters(bank):
    """Copies and pickles do not take the mixed batches' tables or stacks: a copy whose adapters are
    then loaded in place (its tensors' versions counted from 0 again) serves the new values."""
    import pickle

    base, _ = bank
    model = with_adapters(base, {"a": METHOD_CONFIGS["lora"], "b": METHOD_CONFIGS["lora"]})
    rows, ids = ["a", "b"], token_batch(batch=2, seq=3)
    rows_match_alone(model, base, rows, ids)
    clone = copy.deepcopy(model)
    for served in (clone, pickle.loads(pickle.dumps(model))):
        with torch.no_grad():  # as many in-place writes as the original's tensors had (init, randomize_adapters)
            for p in [*adapter_store(served, "a").parameters(), *adapter_store(served, "b").parameters()]:
                p.add_(0.1)
                p.mul_(1.5)
        rows_match_alone(served, base, rows, ids)


def test_delete_adapter_frees_the_tensors_a_mixed_batch_served(bank):
    import gc
    import weakref

    base, _ = bank
    model = with_adapters(base, {"a": METHOD_CONFIGS["lora"], "b": METHOD_CONFIGS["similarity"]})
    with torch.no_grad(), sk.mixed_batch(model, ["a", "b"]):
        model(token_batch(batch=2, seq=1))
    refs = [weakref.ref(p) for p in adapter_store(model, "b").parameters()]
    sk.delete_adapter(model, "b")
    gc.collect()
    assert refs and not any(r() is not None for r in refs)


def test_an_adapter_deleted_inside_its_mixed_batch_is_refused_not_served_as_the_base(bank):
    base, _ = bank
    model = with_adapters(base, {"a": METHOD_CONFIGS["lora"], "b": METHOD_CONFIGS["share_a"],
                                 "c": METHOD_CONFIGS["lora"]})
    ids = token_batch(batch=2, seq=3)
    with torch.no_grad(), sk.mixed_batch(model, ["a", "b"]):
        model(ids)
        sk.delete_adapter(model, "c")  # no row uses it: the batch goes on
        model(ids)
        sk.delete_adapter(model, "b")
        with pytest.raises(RuntimeError, match=r"adapter 'b' \(rows \[1\]\) was deleted or replaced while a mixed "
                                               "batch serving it runs"):
            model(ids)
    rows_match_alone(model, base, ["a", "__base__"], ids)


def test_a_merge_or_unload_inside_a_mixed_batch_is_refused_before_it_changes_anything(bank):
    """Its rows add their own adapters to the base: merged into it, every row would compute it too."""
    base, _ = bank
    model = with_adapters(base, {"a": METHOD_CONFIGS["lora"], "b": METHOD_CONFIGS["bishare_slice"]})
    ids = token_batch(batch=3, seq=4)
    with torch.no_grad(), sk.mixed_batch(model, ["a", "b", "__base__"]):
        with pytest.raises(ValueError, match="a mixed-adapter batch is running on this layer"):
            sk.merge(model)
        assert not any(layer.merged for layer in sk.model.shared_layers(model))
        for unload in (sk.unload, sk.merge_and_unload):  # every row would get the base alone
            with pytest.raises(ValueError, match="a mixed-adapter batch is running on this model .* unload after it"):
                unload(model)
        assert sk.model.shared_layers(model)
    rows_match_alone(model, base, ["a", "b", "__base__"], ids)


def test_a_mixed_batch_refuses_an_input_that_wants_its_gradient(bank):
    """Computed without autograd: the gradient of an input that requires grad would be lost (silently
    wrong saliency); under no_grad, or with an input that needs none, it runs."""
    base, model = bank
    embeds = model.get_input_embeddings()(token_batch(batch=2, seq=3)).detach().requires_grad_()
    with sk.mixed_batch(model, ["lora", "__base__"]):
        with pytest.raises(RuntimeError, match="computes without autograd, and this layer's input requires grad"):
            model(inputs_embeds=embeds)
        with torch.no_grad():
            model(inputs_embeds=embeds)
        model(inputs_embeds=embeds.detach())


def test_disabled_adapters_give_every_row_the_base(bank):
    """As PEFT: adapters disabled, a mixed batch computes the base for every row."""
    base, model = bank
    ids = token_batch(batch=3, seq=4)
    with torch.no_grad(), sk.disable_adapters(model), sk.mixed_batch(model, ["lora", "__base__", "bishare_kron"]):
        out = model(ids).logits
    assert torch.allclose(out, base(ids).logits, rtol=0, atol=1e-12)


def test_an_empty_batch_gives_the_empty_output_of_the_layer_alone(bank):
    _, model = bank
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), sk.mixed_batch(model, []):
        for shape in ((0, 3, 32), (0, 32)):
            x = torch.randn(shape, dtype=torch.float64)
            out = layer(x)
            assert out.shape == (*shape[:-1], layer.out_features) and out.dtype == x.dtype


def test_hand_wrapped_layers_serve_their_adapters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(sk.SharedLoRALinear(torch.nn.Linear(16, 8), r=2),
                              sk.SharedLoRALinear(torch.nn.Linear(8, 8), r=3, adapter_name="other")).double().eval()
    randomize_adapters(net)
    rows, x = ["other", "default", "__base__"], torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad(), sk.mixed_batch(net, rows):
        out = net(x)
    for i, name in enumerate(rows):
        for layer in net:
            layer.set_adapter(name)
            layer.enable_adapters(name != "__base__")
        with torch.no_grad():
            assert torch.allclose(out[i], net(x[i:i + 1])[0], rtol=0, atol=1e-12), name
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['x'\]; .* adapters are \['default', 'other'\]"):
        with sk.mixed_batch(net, ["x"]):
            pass


def test_layers_sharing_tensors_share_their_stacked_copy(bank):
    """The CPU path stacks the adapters' tensors once per set of adapters; a tensor several layers read
    (a ShareLoRA set's A and B, Bi-Share's inter A_s) is stacked once for all of them, not per layer."""
    base, _ = bank
    model = with_adapters(base, {"s1": METHOD_CONFIGS["similarity"], "s2": METHOD_CONFIGS["similarity"],
                                 "k1": METHOD_CONFIGS["bishare_kron"], "k2": METHOD_CONFIGS["bishare_kron"]})
    with torch.no_grad(), sk.mixed_batch(model, ["s1", "s2", "k1", "k2"]):
        model(token_batch(batch=4, seq=1))
        batches = batches_of(model)

    layers = model.model.layers
    q = [stacks_of(batches, layer_tables(layers[i].self_attn.q_proj, adapter_names(model))) for i in range(4)]
    by_group = [{key[0]: factors for key, factors in stack.items()} for stack in q]
    similarity, kron = (0, 1), (2, 3)
    # layers 1, 2, 3 share one A and B per module type (share_sets [[1, 2, 3]]); layer 0 has its own
    assert by_group[1][similarity][0][0] is by_group[2][similarity][0][0] is by_group[3][similarity][0][0]
    assert by_group[1][similarity][0][1] is by_group[3][similarity][0][1]
    assert by_group[0][similarity][0][0] is not by_group[1][similarity][0][0]
    # Bi-Share's inter A_s (the last Kronecker path) is one tensor for every layer
    assert len({id(g[kron][1][-1][0]) for g in by_group}) == 1


def batches_of(model) -> list:
    """The adapter batches of the mixed batch running on ``model`` (inside its block)."""
    return list(next(m for m in model.modules() if isinstance(m, sk.SharedLoRALinear)).mixed_batch._batches.values())


def stacked_bytes(model, batches) -> int:
    """Bytes of the CPU path's stacked copies ``batches`` hold for the model's layers, each storage once."""
    storages = {}
    for layer in model.modules():
        if isinstance(layer, sk.SharedLoRALinear) and layer._mixed_tables is not None:
            for dense, krons in stacks_of(batches, layer._mixed_tables.tables).values():
                for t in [*(dense or ()), *(t for kron in krons for t in kron)]:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("method", ["lora", "share_ab", "bishare_kron", "bishare_slice", "inter_slice"])
def test_the_stacked_copy_takes_what_the_docstring_says(method):
    """float32 copies: the bank's size for plain / ShareLoRA / Kronecker adapters (twice a bf16 bank);
    slice windows: one copy per distinct window a module reads alone, else concatenated per module
    (the adapters' unshared size)."""
    configs = dict(METHOD_CONFIGS, inter_slice=dict(method="bishare", shape_transform="slice", local_r=0,
                                                    intra_r=0, inter_r=5))
    base = tiny_model(layers=4)
    names = [f"{method}{i}" for i in range(3)]
    for dtype in (torch.float32, torch.bfloat16):
        model = with_adapters(base, {n: configs[method] for n in names}).to(dtype)
        with torch.no_grad(), sk.mixed_batch(model, names):
            model(token_batch(batch=3, seq=1))
            stacked = stacked_bytes(model, batches_of(model))
        bank = sum(sk.adapter_memory(model).values())
        layers = [m for m in model.modules() if isinstance(m, sk.SharedLoRALinear)]
        paths = [(layer, p) for layer in layers for n in names for p in layer.paths([n])]
        if method == "bishare_slice":  # every module's paths concatenated: the unshared size
            want = sum(p.rank * (layer.in_features + layer.out_features) for layer, p in paths) * 4
        elif method == "inter_slice":  # one copy per distinct window of the shared A and B
            a = {(id(p.tensors[0]), p.k_offset, layer.in_features): p.rank * layer.in_features for layer, p in paths}
            b = {(id(p.tensors[1]), p.n_offset, layer.out_features): p.rank * layer.out_features for layer, p in paths}
            want = (sum(a.values()) + sum(b.values())) * 4
        else:
            want = bank * (4 // dtype.itemsize)
        assert stacked == want, dtype


def test_a_model_converted_in_place_is_served_in_its_new_dtype(bank):
    """model.float() changes the adapter tensors in place (same objects): the next mixed batch stacks
    them again in the new dtype, shared stacks included."""
    base, _ = bank
    model = with_adapters(base, {"s1": METHOD_CONFIGS["similarity"], "s2": METHOD_CONFIGS["similarity"],
                                 "k1": METHOD_CONFIGS["bishare_kron"], "k2": METHOD_CONFIGS["bishare_kron"]})
    rows = ["s1", "s2", "k1", "k2"]
    ids = token_batch(batch=4, seq=2)
    with torch.no_grad(), sk.mixed_batch(model, rows):
        model(ids)
    model.float()
    with torch.no_grad(), sk.mixed_batch(model, rows):
        out = model(ids).logits
    assert out.dtype == torch.float32
    base32 = copy.deepcopy(base).float()
    for i, name in enumerate(rows):
        ref = alone(model, base32, name, ids[i:i + 1])
        assert (out[i:i + 1] - ref).abs().max() <= 1e-5 * ref.abs().max(), name


def test_bad_input_is_refused_before_any_work(bank):
    base, model = bank
    ids = token_batch(batch=2, seq=3)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; this model's adapters are \['lora'"):
        with sk.mixed_batch(model, ["lora", "nope"]):
            pass
    with pytest.raises(TypeError, match="list of adapter names"):
        with sk.mixed_batch(model, "lora"):
            pass
    with pytest.raises(ValueError, match="gives 3 rows, the batch has 2"):
        with torch.no_grad(), sk.mixed_batch(model, ["lora"] * 3):
            model(ids)
    with pytest.raises(ValueError, match="no ShareLoRA adapters"):
        with sk.mixed_batch(base, ["__base__"]):
            pass
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            with sk.mixed_batch(model, ["lora", "lora"]):
                pass
    finally:
        model.eval()
    with sk.mixed_batch(model, ["lora", "lora"]):  # switched to training inside: refused at the first layer
        model.train()
        try:
            with pytest.raises(RuntimeError, match="inference only"):
                model(ids)
        finally:
            model.eval()
    assert all(layer.mixed_batch is None for layer in model.modules() if isinstance(layer, sk.SharedLoRALinear))


def test_the_base_row_name_cannot_name_an_adapter(bank):
    """"__base__" names a row without adapter: apply, a hand-wrapped layer and PEFT refuse it as a name."""
    base, model = bank
    with pytest.raises(ValueError, match="'__base__' cannot name an adapter: it names a row without adapter"):
        sk.apply(model, sk.ShareLoRAConfig(method="lora", r=2), adapter_name="__base__")
    with pytest.raises(ValueError, match="'__base__' cannot name an adapter"):
        sk.SharedLoRALinear(torch.nn.Linear(4, 4), adapter_name="__base__")
    assert adapter_names(model) == NAMES
    pytest.importorskip("peft")
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(method="lora", r=2))
    with pytest.raises(ValueError, match="'__base__' cannot name an adapter"):
        peft_model.add_adapter("__base__", sk.ShareLoRAPeftConfig(method="lora", r=2))
    assert list(peft_model.peft_config) == ["default"]


# ------------------------------------------------------------------------------------------ PEFT
def test_peft_adapter_names_forward_generate_and_beams():
    pytest.importorskip("peft")
    from peft import get_peft_model

    base = tiny_model(layers=4, dtype=torch.float64)
    model = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(**METHOD_CONFIGS["similarity"]))
    model.add_adapter("kron", sk.ShareLoRAPeftConfig(**METHOD_CONFIGS["bishare_kron"]))
    for i, name in enumerate(("default", "kron")):
        model.set_adapter(name)
        randomize_adapters(model, seed=i)
    model.eval()
    rows = ["kron", "__base__", "default", "kron"]
    ids = token_batch(batch=4, seq=5)
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=rows).logits
        tokens = model.generate(input_ids=ids, adapter_names=rows, **GREEDY)
        beams = model.generate(input_ids=ids, adapter_names=rows, num_beams=2, **GREEDY)
        model.generation_config.num_beams = 2  # as a checkpoint's generation_config.json may set it
        assert torch.equal(model.generate(input_ids=ids, adapter_names=rows, **GREEDY), beams)
        assert torch.equal(model(input_ids=ids, adapter_names=rows).logits, out)  # a forward: rows as given
        model.generation_config.num_beams = 1
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    ref, gen, gen_b = (model(input_ids=ids[i:i + 1]).logits,
                                       model.generate(input_ids=ids[i:i + 1], **GREEDY),
                                       model.generate(input_ids=ids[i:i + 1], num_beams=2, **GREEDY))
            else:
                model.set_adapter(name)
                ref, gen, gen_b = (model(input_ids=ids[i:i + 1]).logits,
                                   model.generate(input_ids=ids[i:i + 1], **GREEDY),
                                   model.generate(input_ids=ids[i:i + 1], num_beams=2, **GREEDY))
        assert (out[i:i + 1] - ref).abs().max() <= 1e-12 * ref.abs().max(), name
        assert torch.equal(tokens[i], gen[0]) and torch.equal(beams[i], gen_b[0]), name
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['x'\]; this model's adapters are \['default', 'kron'\]"):
        model(input_ids=ids, adapter_names=["x"] * 4)
    with pytest.raises(ValueError, match="gives 3 rows, the batch has 4"):
        model(input_ids=ids, adapter_names=["kron"] * 3)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=rows)


def test_peft_mixed_batch_routes_each_adapters_classifier_head():
    pytest.importorskip("peft")
    from peft import get_peft_model
    from tiny_models import tiny_family

    bert = tiny_family("bert", head="seq_cls", num_labels=3).double()
    config = dict(method="similarity", r=2, share_sets=[[0, 1]], task_type="SEQ_CLS")
    model = get_peft_model(copy.deepcopy(bert), sk.ShareLoRAPeftConfig(**config))
    model.add_adapter("other", sk.ShareLoRAPeftConfig(**{**config, "method": "lora", "share_sets": []}))
    for i, name in enumerate(("default", "other")):
        model.set_adapter(name)
        randomize_adapters(model, seed=i)  # the adapter and its own copy of the classifier head
    model.eval()
    rows = ["other", "default", "__base__"]
    ids = token_batch(batch=3, seq=5)
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=rows).logits
        with sk.mixed_batch(model, rows):  # the same routing through the package's own entry point
            assert torch.equal(model(input_ids=ids).logits, out)
        for i, name in enumerate(rows):
            if name == "__base__":
                ref = bert(input_ids=ids[i:i + 1]).logits
            else:
                model.set_adapter(name)
                ref = model(input_ids=ids[i:i + 1]).logits
            assert torch.allclose(out[i:i + 1], ref, rtol=0, atol=1e-12), name


def test_peft_load_adapter_adds_one_to_the_bank_and_refuses_a_misfit(tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model

    base = tiny_model(layers=2, dtype=torch.float64)
    config = sk.ShareLoRAPeftConfig(method="share_a", r=3, target_modules=TARGETS)
    donor = get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(donor, seed=4)
    donor.save_pretrained(tmp_path / "fits")
    wide = tiny_model(layers=2, dtype=torch.float64)
    wide = type(wide)(type(wide.config)(**{**wide.config.to_dict(), "hidden_size": 64})).double()
    get_peft_model(wide, config).save_pretrained(tmp_path / "wide")
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_adapters(model, seed=5)
    model.eval()
    ids = token_batch(batch=2, seq=4)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="does not match this model"):
        model.load_adapter(tmp_path / "wide", adapter_name="wide")
    assert list(model.peft_config) == ["default"] and list(sk.adapter_memory(model.base_model.model)) == ["default"]
    model.load_adapter(tmp_path / "fits", adapter_name="fits")
    assert list(sk.adapter_memory(model.base_model.model)) == ["default", "fits"]
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=["default", "fits"]).logits
        assert torch.allclose(out[:1], before[:1], rtol=0, atol=1e-12)
        assert torch.allclose(out[1:], donor.eval()(input_ids=ids[1:]).logits, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ 4-bit base
def test_4bit_base_rows_equal_their_adapter_alone(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(0)  # bitsandbytes' CPU inference kernel wants every in_features a multiple of 64
    LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu").eval()
    configs = {n: dict(METHOD_CONFIGS[n], target_modules=TARGETS) for n in ("lora", "bishare_kron", "share_ab")}
    model = with_adapters(base, configs)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    rows = ["share_ab", "__base__", "lora", "bishare_kron"]
    ids = token_batch(batch=4, seq=5)
    with torch.no_grad(), sk.mixed_batch(model, rows):
        out = model(ids).logits
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name == "__base__":
                with sk.disable_adapters(model):
                    ref = model(ids[i:i + 1]).logits
            else:
                sk.set_adapter(model, name)
                ref = model(ids[i:i + 1]).logits
        assert ((out[i:i + 1] - ref).abs().max() / ref.abs().max()).item() < 1e-5, name


# ---------------------------------------------------------------------------------- adapter bank
def test_adapter_memory_counts_each_unique_tensor_once(bank):
    _, model = bank
    memory = sk.adapter_memory(model)
    assert list(memory) == NAMES
    for name in NAMES:
        tensors = adapter_tensors(model, name)
        assert memory[name] == sum(t.numel() * t.element_size() for t in tensors.values()), name
        plan = model.sharelora_plans[name]
        reads = sum(len(p.tensors) for m in plan.modules.values() for p in m.paths)
        assert reads > len(tensors) or name == "lora"  # shared tensors are read by several layers, stored once
    assert memory["share_ab"] < memory["share_a"] < memory["lora"]



def test_adapter_memory_of_hand_wrapped_layers():
    """Layers wrapped by hand hold their own adapters (mixed_batch serves them): counted by name."""
    from sharelora_kernels.layer import SharedLoRALinear

    first = SharedLoRALinear(torch.nn.Linear(16, 32), r=4)
    second = SharedLoRALinear(torch.nn.Linear(32, 8), r=2)
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    assert sk.adapter_memory(model) == {"default": 4 * (4 * 16 + 32 * 4 + 2 * 32 + 8 * 2)}
    with pytest.raises(ValueError, match="more than max_bytes=100"):
        sk.set_bank_limit(model, max_bytes=100)


def test_adapter_memory_of_a_model_on_meta_counts_every_tensor(bank):
    """Meta tensors (a model built there before its weights) all have data pointer 0: still each
    tensor counted, as on the CPU, so a bank limit holds."""
    _, model = bank
    meta = copy.deepcopy(model).to("meta")
    assert sk.adapter_memory(meta) == sk.adapter_memory(model)
    with pytest.raises(ValueError, match="more than max_bytes=1000"):
        sk.set_bank_limit(meta, max_bytes=1000)


def test_load_adds_one_adapter_without_touching_the_others_and_delete_frees_it(bank, tmp_path):
    base, model = bank
    model = copy.deepcopy(model)
    donor = with_adapters(base, {"kron2": METHOD_CONFIGS["bishare_kron"]}, seed=7)
    sk.save(donor, tmp_path / "kron2")
    ids = token_batch(batch=3, seq=4)
    rows = ["lora", "bishare_gate", "__base__"]
    with torch.no_grad(), sk.mixed_batch(model, rows):
        before = model(ids).logits
    before_memory = sk.adapter_memory(model)
    sk.load(model, tmp_path / "kron2", adapter_name="kron2")
    assert sk.adapter_memory(model) == {**before_memory, "kron2": sk.adapter_memory(donor)["kron2"]}
    with torch.no_grad(), sk.mixed_batch(model, rows + ["kron2"]):
        after = model(torch.cat([ids, ids[:1]])).logits
    assert torch.equal(after[:3], before)
    assert torch.allclose(after[3:], alone(donor, base, "kron2", ids[:1]), rtol=0, atol=1e-12)
    sk.delete_adapter(model, "kron2")
    assert sk.adapter_memory(model) == before_memory
    assert not any("kron2" in n for n, _ in model.named_parameters())


def test_a_full_bank_refuses_the_next_adapter_before_it_changes(bank, tmp_path):
    """set_bank_limit: an adapter past max_adapters or max_bytes is refused by apply and by load with
    BankFullError naming the limit and the adapter, before the model changes; deleting one makes room."""
    base, _ = bank
    model = with_adapters(base, {"a": METHOD_CONFIGS["lora"], "b": METHOD_CONFIGS["bishare_kron"]})
    donor = with_adapters(base, {"c": METHOD_CONFIGS["share_a"]}, seed=3)
    sk.save(donor, tmp_path / "c")
    c_bytes = sk.adapter_memory(donor)["c"]
    held = sum(sk.adapter_memory(model).values())
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged():
        assert adapter_names(model) == ["a", "b"] and model.state_dict().keys() == state.keys()

    sk.set_bank_limit(model, max_adapters=2)
    with pytest.raises(sk.BankFullError, match=r"no room for adapter 'c'.*\['a', 'b'\].*max_adapters=2"):
        sk.load(model, tmp_path / "c", adapter_name="c")
    with pytest.raises(sk.BankFullError, match="no room for adapter 'c2'.*max_adapters=2"):
        sk.apply(model, sk.ShareLoRAConfig(**METHOD_CONFIGS["share_a"]), adapter_name="c2")
    unchanged()
    sk.set_bank_limit(model, max_bytes=held + c_bytes - 1)  # max_adapters lifted, one byte short of room for c
    with pytest.raises(sk.BankFullError, match=rf"no room for adapter 'c' \({c_bytes} bytes\).*holds {held} bytes"
                                               rf".*max_bytes={held + c_bytes - 1}"):
        sk.load(model, tmp_path / "c", adapter_name="c")
    unchanged()
    sk.set_bank_limit(model, max_bytes=held + c_bytes)  # exactly room for c
    sk.load(model, tmp_path / "c", adapter_name="c")
    assert sum(sk.adapter_memory(model).values()) == held + c_bytes
    sk.set_bank_limit(model, max_adapters=3)
    with pytest.raises(sk.BankFullError, match="no room for adapter 'd'"):
        sk.apply(model, sk.ShareLoRAConfig(**METHOD_CONFIGS["lora"]), adapter_name="d")
    with pytest.warns(UserWarning, match="'a' was active"):
        sk.delete_adapter(model, "a")
    sk.apply(model, sk.ShareLoRAConfig(**METHOD_CONFIGS["lora"]), adapter_name="d")
    assert adapter_names(model) == ["b", "c", "d"]


def test_bank_limits_that_do_not_fit_are_refused(bank):
    _, model = bank
    model = copy.deepcopy(model)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_adapters must be a positive int"):
            sk.set_bank_limit(model, max_adapters=bad)
    with pytest.raises(ValueError, match=f"holds {len(NAMES)} adapters .* more than max_adapters=2"):
        sk.set_bank_limit(model, max_adapters=2)
    with pytest.raises(ValueError, match="more than max_bytes=10"):
        sk.set_bank_limit(model, max_bytes=10)
    assert getattr(model, "sharelora_bank_limit", (None, None)) == (None, None)


def test_peft_load_adapter_into_a_full_bank_is_refused(tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model

    base = tiny_model(layers=2, dtype=torch.float64)
    config = sk.ShareLoRAPeftConfig(method="share_a", r=3, target_modules=TARGETS)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "other")
    model = get_peft_model(copy.deepcopy(base), config)
    sk.set_bank_limit(model, max_adapters=1)  # a PeftModel: the limit goes to the model it wraps
    with pytest.raises(sk.BankFullError, match="no room for adapter 'other'.*max_adapters=1"):
        model.load_adapter(tmp_path / "other", adapter_name="other")
    assert list(model.peft_config) == ["default"] and list(sk.adapter_memory(model.base_model.model)) == ["default"]
    sk.set_bank_limit(model, max_adapters=2)
    model.load_adapter(tmp_path / "other", adapter_name="other")
    assert list(sk.adapter_memory(model.base_model.model)) == ["default", "other"]


def test_the_bank_counts_a_peft_models_copies_of_its_modules_to_save():
    """PEFT keeps one copy of each module to save per adapter: adapter_memory counts it with the
    adapter, and set_bank_limit(max_bytes=...) refuses an adapter whose copy does not fit."""
    pytest.importorskip("peft")
    from peft import get_peft_model

    base = tiny_model(layers=2)
    config = dict(method="lora", r=3, target_modules=TARGETS, modules_to_save=["lm_head"])
    model = get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(**config))
    model.add_adapter("two", sk.ShareLoRAPeftConfig(**config))
    head = base.lm_head.weight.numel() * base.lm_head.weight.element_size()
    lora = sum(p.numel() * p.element_size() for p in adapter_store(model.base_model.model, "two").parameters())
    assert sk.adapter_memory(model) == {"default": lora + head, "two": lora + head}
    held = 2 * (lora + head)
    sk.set_bank_limit(model, max_bytes=held + lora + head - 1)
    with pytest.raises(sk.BankFullError, match=rf"no room for adapter 'three' \({lora + head} bytes\)"):
        model.add_adapter("three", sk.ShareLoRAPeftConfig(**config))
    sk.set_bank_limit(model, max_bytes=held + lora + head)
    model.add_adapter("three", sk.ShareLoRAPeftConfig(**config))
    assert sum(sk.adapter_memory(model).values()) == held + lora + head


def test_an_adapter_of_another_base_is_refused_before_the_bank_changes(bank, tmp_path):
    _, model = bank
    model = copy.deepcopy(model)
    other = sk.apply(tiny_model(layers=3, dtype=torch.float64), sk.ShareLoRAConfig(method="lora", r=3))
    wide = tiny_model(layers=4, dtype=torch.float64)
    wide = sk.apply(type(wide)(type(wide.config)(**{**wide.config.to_dict(), "hidden_size": 64})).double(),
                    sk.ShareLoRAConfig(method="lora", r=3))
    sk.save(other, tmp_path / "layers")
    sk.save(wide, tmp_path / "wide")
    names, memory = adapter_names(model), sk.adapter_memory(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not match the model: number of layers"):
        sk.load(model, tmp_path / "layers", adapter_name="new")
    with pytest.raises(ValueError, match="does not match the model"):
        sk.load(model, tmp_path / "wide", adapter_name="new")
    assert adapter_names(model) == names and sk.adapter_memory(model) == memory
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- bench --serving
def test_bench_serving_smoke_run_writes_every_case(tmp_path, monkeypatch):
    import json

    pytest.importorskip("peft")
    from sharelora_kernels.benchmarks import main, serving

    monkeypatch.setitem(serving.PROFILES, "quick", (2, 0, 1, (1, 2)))  # the smallest run that has every column
    written = main(["--serving", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "serving.json").read_text())["serving"]
    assert set(written) == {"json", "markdown"} and (tmp_path / "serving.md").is_file()
    rows = {(r["method"], r["adapters"]): r for r in data["rows"]}
    assert set(rows) == {(m, n) for m in serving.METHODS for n in (1, 2)}
    lora, shared, kron = (rows[(m, 2)]["bytes_per_adapter"] for m in serving.METHODS)
    assert lora == rows[("lora", 2)]["peft_lora_bytes_per_adapter"] and kron < shared < lora
    assert all(r["decode_ours_tokens_per_s"] > 0 and r["prefill_vs_one_adapter"] > 0 for r in data["rows"])
