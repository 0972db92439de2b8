"""Property tests of whole models: a drawn config applied to a tiny model of a drawn family keeps its
logits through every way out of the package.

Each draw (method, ranks, alpha, rsLoRA, targets, the Bi-Share transform and its settings, share
sets, input groups; LLaMA, Qwen2 (biased q/k/v) or GPT-2 (Conv1D)) is applied to a float64 model
with random adapters, whose gradients on the compose backend equal the torch path's; then these
give the adapted model's logits again: ``merge_and_unload`` (the adapters folded into the base),
``save`` then ``load`` into a fresh copy of the base (bit for bit), and ``export_peft`` then PEFT's
``PeftModel.from_pretrained`` (a plain LoRA of the summed rank, in float32 as PEFT's adapter files
hold it). The same draws as a PEFT method round-trip through ``save_pretrained`` /
``from_pretrained`` and merge.
"""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

peft = pytest.importorskip("peft")

import sharelora_kernels as sk  # noqa: E402
from sharelora_kernels import ops  # noqa: E402
from tiny_models import logits, randomize_adapters, tiny_family, token_batch  # noqa: E402

LAYERS = 2


@st.composite
def configs(draw) -> dict:
    """ShareLoRAConfig keyword arguments of any method, at ranks a 32-wide tiny model takes."""
    method = draw(st.sampled_from(["lora", "similarity", "share_a", "share_b", "share_ab", "bishare"]))
    config = dict(method=method, r=draw(st.integers(1, 4)), alpha=draw(st.sampled_from([1.0, 4.0, 8.0])),
                  use_rslora=draw(st.booleans()), target_modules=draw(st.sampled_from([None, "all-linear"])))
    if method == "similarity":
        config.update(share_sets=draw(st.sampled_from([[], [[0, 1]]])), expand_rank=draw(st.booleans()))
    if method == "bishare":
        transform = draw(st.sampled_from(["slice", "gate", "kron"]))
        config.update(shape_transform=transform, local_r=draw(st.integers(0, 2)), intra_r=draw(st.integers(1, 3)),
                      inter_r=draw(st.integers(1, 4)))
        if transform == "slice":
            config.update(slice_policy=draw(st.sampled_from(["top_left", "center", "bottom_right"])))
        elif transform == "gate":
            config.update(gate_rank=draw(st.integers(1, 2)), gate_dims=(8, 12))
        else:
            config.update(kron_dim=draw(st.sampled_from([4, 8])))
    return config


def gradients(model, ids, backend: str) -> list[torch.Tensor]:
    """Every trainable tensor's gradient of a loss on the logits, on ``backend``."""
    ops.set_backend(backend)
    model.zero_grad(set_to_none=True)
    model(ids).logits.pow(2).mean().backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), family=st.sampled_from(["llama", "qwen2", "gpt2"]), group_inputs=st.booleans())
def test_a_drawn_config_keeps_its_logits_through_merge_save_load_and_peft_export(config, family, group_inputs):
    base = tiny_family(family, layers=LAYERS).double()
    model = copy.deepcopy(base)
    sk.apply(model, sk.ShareLoRAConfig(**config), group_inputs=group_inputs and family != "gpt2")
    randomize_adapters(model)
    ids = token_batch(batch=2, seq=5)
    want = logits(model, ids)
    assert (want - logits(base, ids)).abs().max() > 1e-6  # the adapters change the output
    for got, ref in zip(gradients(model, ids, "compose"), gradients(model, ids, "torch")):
        assert ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() < 1e-10, "compose vs torch"
    ops.set_backend(None)

    def close(got, what, tol=1e-10):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < tol, f"{what}: relative error {err:.3g} ({config}, {family})"

    close(logits(sk.merge_and_unload(copy.deepcopy(model)), ids), "merge_and_unload")
    with tempfile.TemporaryDirectory() as tmp:
        sk.save(model, f"{tmp}/adapter")
        loaded = sk.load(copy.deepcopy(base), f"{tmp}/adapter")
        assert torch.equal(logits(loaded, ids), want), "save / load"
        sk.export_peft(model, f"{tmp}/peft")
        exported = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/peft")
        close(logits(exported, ids), "export_peft", tol=1e-5)  # float32 factors, through two layers


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), family=st.sampled_from(["llama", "qwen2", "gpt2"]))
def test_a_drawn_config_as_a_peft_method_round_trips_and_merges(config, family):
    """The same draws through PEFT: get_peft_model, save_pretrained / from_pretrained (bit for bit),
    merge_and_unload."""
    base = tiny_family(family, layers=LAYERS).double()
    model = peft.get_peft_model(copy.deepcopy(base), sk.ShareLoRAPeftConfig(task_type="CAUSAL_LM", **config))
    randomize_adapters(model)
    ids = token_batch(batch=2, seq=5)
    want = logits(model, ids)
    assert (want - logits(base, ids)).abs().max() > 1e-6
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        assert torch.equal(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp), ids), want)
    merged = logits(model.merge_and_unload(), ids)
    assert ((merged - want).abs().max() / want.abs().max()).item() < 1e-10, f"merge_and_unload ({config}, {family})"
