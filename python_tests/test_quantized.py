"""Quantized bases (QLoRA): a tiny LLaMA in bitsandbytes nf4 / fp4 / double-quant 4-bit and int8, on the CPU.

Every comparison runs the models in train mode: bitsandbytes repacks a 4-bit weight for its CPU
inference kernel on an eval-mode forward without grad (and that kernel needs out_features % 32 == 0,
which the tiny k/v projections are not), so train mode is where the dequantized weight is the
weight the base computes with.
"""
from __future__ import annotations

import copy
import warnings
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

bnb = pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import sharelora_kernels as sk  # noqa: E402
from sharelora_kernels.base import describe_base, dequantized_weight  # noqa: E402
from sharelora_kernels.layer import SharedLoRALinear  # noqa: E402
from sharelora_kernels import ops, reference  # noqa: E402
from sharelora_kernels.model import adapter_tensors  # noqa: E402
from tiny_models import (METHOD_CONFIGS, TARGETS, enable_checkpointing, randomize_adapters, tiny_family,  # noqa: E402
                         tiny_model, token_batch)

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns about an optional package

QUANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4_double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
TOL = 1e-4  # one float32 layer against the float64 reference on its dequantized weight
MODEL_TOL = 5e-3  # a float32 model (4 layers of attention) against its float64 twin (worst seen: 2e-3);
# a wrong wiring or chain rule errs by O(1)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A saved tiny LLaMA (4 layers) in float32 and in bfloat16."""
    root = tmp_path_factory.mktemp("tiny")
    for dtype in (torch.float32, torch.bfloat16):
        tiny_model().to(dtype).save_pretrained(root / str(dtype).split(".")[-1])
    return root


_CACHE: dict = {}


def quantized(float_dir, quant: str, dtype=torch.float32):
    """A fresh copy of the tiny LLaMA loaded through Transformers' bitsandbytes integration, train mode."""
    key = (quant, dtype)
    if key not in _CACHE:
        compute = {"bnb_4bit_compute_dtype": dtype} if quant != "int8" else {}
        config = BitsAndBytesConfig(**QUANTS[quant], **compute)
        _CACHE[key] = AutoModelForCausalLM.from_pretrained(float_dir / str(dtype).split(".")[-1], dtype=dtype,
                                                           quantization_config=config, device_map="cpu")
    return copy.deepcopy(_CACHE[key]).train()


def quantized_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def float64_twin(model_q):
    """The tiny LLaMA in float64 with every quantized linear's weight set to its dequantized weight."""
    twin = tiny_model().double().train()
    for name, module in quantized_modules(model_q).items():
        twin.get_submodule(name).weight.data = dequantized_weight(module, describe_base(module), torch.float64)
    return twin


def outputs_and_grads(model, ids):
    """Logits, and the gradients of a random projection of them for the input embeddings and every adapter."""
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(logits.dtype)
    grads = torch.autograd.grad((logits * weights).sum(), [embeds, *adapter_tensors(model).values()])
    return logits.detach(), grads


def check_against_float64(model_q, config):
    """Logits, d(input embeddings) and every adapter gradient of the quantized model vs its dense
    float64 twin: every method's sharing (gradients summed over layers) on quantized layers."""
    twin = sk.apply(float64_twin(model_q), config)
    sk.apply(model_q, config)
    randomize_adapters(model_q, std=0.3)
    with torch.no_grad():
        for name, t in adapter_tensors(twin).items():
            t.copy_(adapter_tensors(model_q)[name])
    out, grads = outputs_and_grads(model_q, token_batch())
    ref, grads_ref = outputs_and_grads(twin, token_batch())
    assert rel_err(out, ref) < MODEL_TOL
    for name, g, g_ref in zip(["input embeddings", *adapter_tensors(model_q)], grads, grads_ref):
        assert g.dtype == torch.float32 and rel_err(g, g_ref) < MODEL_TOL, name


def layer_against_float64(layer, m=7, seed=0, leading=None):
    """One quantized SharedLoRALinear in float32 vs float64 math on its dequantized weight: output,
    dx and every adapter gradient; x is (m, K), or (*leading, K)."""
    torch.manual_seed(seed)
    x = torch.randn(*(leading or (m,)), layer.in_features, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    tensors = [t for p in layer.paths() for t in p.tensors]
    grads = torch.autograd.grad(y, [x, *tensors], dy)
    d = lambda t: t.detach().double().requires_grad_()
    x64 = d(x)
    paths64 = [p._replace(tensors=tuple(d(t) for t in p.tensors)) for p in layer.paths()]
    bias = None if layer.bias is None else layer.bias.double()
    y64 = reference.lora_linear(x64, dequantized_weight(layer.base_layer, layer.layout, torch.float64), bias, paths64)
    grads64 = torch.autograd.grad(y64, [x64, *(t for p in paths64 for t in p.tensors)], dy.double())
    assert rel_err(y, y64) < TOL
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert rel_err(g, g64) < TOL, f"gradient {i}"


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("quant", list(QUANTS))
def test_fresh_adapters_leave_outputs_exactly_equal(float_dir, quant):
    base = quantized(float_dir, quant)
    model = sk.apply(quantized(float_dir, quant), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_kron"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SharedLoRALinear) and layer.layout.kind == ("bnb_8bit" if quant == "int8" else "bnb_4bit")
    assert all(t.dtype == torch.float32 for t in adapter_tensors(model).values())  # not the uint8 / int8 storage
    ids = token_batch()
    assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize("quant", list(QUANTS))
def test_each_quant_kind_layer_in_float32_matches_float64_reference(float_dir, quant):
    """Every path kind on each 4-bit / 8-bit base, at the real (float32) precision."""
    model = sk.apply(quantized(float_dir, quant), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_gate"]))
    randomize_adapters(model, std=0.3)
    layer_against_float64(model.model.layers[2].self_attn.k_proj)  # gate paths on a GQA (16-wide) output
    model = sk.apply(quantized(float_dir, quant), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_kron"]))
    randomize_adapters(model, std=0.3)
    layer_against_float64(model.model.layers[1].mlp.down_proj)  # plain + Kronecker paths, K = 48


def standalone_quantized(quant: str, bias: bool, k: int = 64, n: int = 96):
    """A bitsandbytes nf4 or int8 layer of a random nn.Linear, quantized on the CPU."""
    dense = torch.nn.Linear(k, n, bias=bias)
    if quant == "nf4":
        q = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(k, n, bias=bias, has_fp16_weights=False)
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("after_eval", [False, True])
def test_biased_base_batched_input_and_training_after_an_eval_pass(quant, bias, after_eval):
    """Biased bases (Qwen2's q/k/v), a (batch, seq, K) x that requires grad, and training after an
    eval-mode no-grad forward, on which bitsandbytes' CPU backend repacks a 4-bit weight into a
    layout with no working backward: bitsandbytes returns views here that autograd forbids adding
    into in place, and the layer must train on the standard layout. Outputs, dx and every adapter
    gradient against float64 on the dequantized weight."""
    torch.manual_seed(1)
    layer = SharedLoRALinear(standalone_quantized(quant, bias), r=5, alpha=10.0)
    torch.nn.init.normal_(layer.lora_paths[0].B)
    if after_eval:
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(3, layer.in_features))
        if quant == "nf4":  # bitsandbytes' CPU repacking (lossy to undo) stays off on a wrapped base
            assert not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    layer_against_float64(layer.train(), leading=(2, 5))


def test_eval_and_training_passes_in_turn_keep_the_call_plans(monkeypatch):
    """Evaluation between training steps: bitsandbytes repacks a 4-bit weight on the CPU for its
    eval-mode kernel and the layer restores the standard layout for training, both replacing the
    weight's storage. The plans watch the base module, not its weight: after one cycle none is
    rebuilt, and the training pass stays exact. A changed compute dtype rebuilds the plan."""
    torch.manual_seed(1)
    layer = SharedLoRALinear(standalone_quantized("nf4", True), r=5, alpha=10.0)
    torch.nn.init.normal_(layer.lora_paths[0].B)
    builds = []
    build = SharedLoRALinear._build_plan
    monkeypatch.setattr(SharedLoRALinear, "_build_plan", lambda self, x, env: builds.append(env) or build(self, x, env))

    def cycle():
        layer.train()
        layer(torch.randn(3, layer.in_features, requires_grad=True)).sum().backward()
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(3, layer.in_features))

    cycle()
    first = len(builds)
    cycle()
    cycle()
    assert len(builds) == first
    layer_against_float64(layer.train(), leading=(2, 5))
    assert len(builds) == first
    layer.base_layer.compute_dtype = torch.bfloat16
    with torch.no_grad():
        y = layer(torch.randn(3, layer.in_features))
    assert len(builds) == first + 1 and y.dtype == torch.float32


@pytest.mark.parametrize("quant", list(QUANTS))
def test_quant_kinds_model_matches_float64_reference(float_dir, quant):
    check_against_float64(quantized(float_dir, quant),
                          sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_slice"]))


@pytest.mark.parametrize("name", [n for n in METHOD_CONFIGS if n != "bishare_slice"])
def test_every_method_on_nf4_matches_float64_reference(float_dir, name):
    check_against_float64(quantized(float_dir, "nf4"), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))


@pytest.mark.parametrize("name", ["share_ab", "bishare_gate"])
def test_methods_on_int8_match_float64_reference(float_dir, name):
    check_against_float64(quantized(float_dir, "int8"), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))


def test_no_gradient_and_no_full_precision_copy_of_the_quantized_weight(float_dir):
    """Nothing the layer keeps or saves for backward is a float (N, K) weight; the base stays frozen."""
    model = sk.apply(quantized(float_dir, "nf4"), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["lora"]))
    randomize_adapters(model)
    layer = model.model.layers[0].mlp.up_proj  # (48, 32)
    dense_shapes = {(48, 32), (32, 48)}
    saved = []
    x = torch.randn(3, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert saved and not any(t.is_floating_point() and tuple(t.shape) in dense_shapes for t in saved)
    kept = list(layer.state_dict().values()) + [p for p in layer.parameters()]
    assert not any(t.is_floating_point() and tuple(t.shape) in dense_shapes for t in kept)
    assert layer.weight.grad is None and not layer.weight.requires_grad and x.grad is not None


def test_accounting_unchanged(float_dir):
    config = sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["similarity"])
    model_q = sk.apply(quantized(float_dir, "nf4"), config)
    model_f = sk.apply(tiny_model(), config)
    assert sk.trainable_parameters(model_q) == sk.trainable_parameters(model_f) > 0
    assert sk.parameter_breakdown(model_q) == sk.parameter_breakdown(model_f)


def test_standalone_layer_and_input_groups(float_dir):
    """A hand-wrapped Linear4bit; group_inputs=True on a quantized model runs each member alone, same logits."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(32, 24)
    q = bnb.nn.Linear4bit(32, 24, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    layer = SharedLoRALinear(q.to("cpu"), r=4, alpha=8.0).train()
    assert layer.bias is q.bias and not q.bias.requires_grad
    torch.nn.init.normal_(layer.lora_paths[0].B)
    x = torch.randn(5, 32)
    a, b = layer.lora_paths[0].A, layer.lora_paths[0].B
    expected = torch.nn.functional.linear(x.double(), dequantized_weight(q, layer.layout).double(), q.bias.double())
    expected += 2.0 * (x.double() @ a.double().t()) @ b.double().t()
    assert rel_err(layer(x), expected) < TOL
    config = sk.ShareLoRAConfig(target_modules=TARGETS + ["gate_proj"], **METHOD_CONFIGS["share_a"])
    grouped = sk.apply(quantized(float_dir, "nf4"), config, group_inputs=True)
    alone = sk.apply(quantized(float_dir, "nf4"), config)
    randomize_adapters(grouped)
    randomize_adapters(alone)
    ids = token_batch()
    assert torch.equal(grouped(ids).logits, alone(ids).logits)


@pytest.mark.parametrize("backend", ["compose", "triton"])
def test_adapter_changed_in_place_before_backward_raises(float_dir, backend, monkeypatch):
    """Gate and Kronecker paths on a 4-bit base (the planned low-rank op, whose backward reads the
    adapters through its plan): an adapter changed in place between forward and backward raises
    autograd's error (backward would read other values than the forward's)."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SHARELORA_BACKEND", backend)
    for name in ("bishare_gate", "bishare_kron"):
        model = sk.apply(quantized(float_dir, "nf4"), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))
        randomize_adapters(model)
        loss = model(token_batch()).logits.pow(2).mean()
        with torch.no_grad():
            for p in adapter_tensors(model).values():
                p.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_input_groups_run_4bit_members_alone_whatever_their_storage_dtype(float_dir):
    """A 4-bit weight stored in x's dtype (bnb_4bit_quant_storage=float32, as FSDP-QLoRA stores bf16)
    is still no dense weight to share: with dropout in training the members run alone, as without groups."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_quant_storage=torch.float32)
    load = lambda: AutoModelForCausalLM.from_pretrained(float_dir / "float32", dtype=torch.float32,  # noqa: E731
                                                        quantization_config=config, device_map="cpu").train()
    sk_config = sk.ShareLoRAConfig(target_modules=TARGETS + ["gate_proj"], dropout=0.1, **METHOD_CONFIGS["share_a"])
    grouped, alone = sk.apply(load(), sk_config, group_inputs=True), sk.apply(load(), sk_config)
    assert grouped.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    randomize_adapters(grouped)
    randomize_adapters(alone)
    ids = token_batch()
    torch.manual_seed(3)
    got = grouped(ids, labels=ids)
    got.loss.backward()
    torch.manual_seed(3)
    assert torch.equal(got.logits, alone(ids).logits)


@pytest.mark.skipif(not sk.ops.HAS_TRITON, reason="triton not importable")
def test_triton_backend_on_a_quantized_model(float_dir, monkeypatch):
    """SHARELORA_BACKEND=triton (the kernels through the interpreter here, as on CUDA): logits and
    every adapter gradient equal the torch path's, dropout off; so do the forwards without grad
    (gate paths: not the dense program's) on both paths."""
    from sharelora_kernels.ops import lowrank_only_triton

    model = sk.apply(quantized(float_dir, "nf4"), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_gate"]))
    randomize_adapters(model, std=0.3)
    ids = token_batch()

    def run():
        logits = model(ids).logits
        with torch.no_grad():
            alone = model(ids).logits
        return logits.detach(), alone, torch.autograd.grad(logits.pow(2).mean(), list(adapter_tensors(model).values()))

    monkeypatch.setenv("SHARELORA_BACKEND", "torch")
    ref, ref_alone, ref_grads = run()
    calls = []
    forward = lowrank_only_triton._forward
    monkeypatch.setattr(lowrank_only_triton, "_forward", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    out, alone, grads = run()
    assert len(calls) == 2 * 4 * len(TARGETS)  # with and without grad
    assert rel_err(out, ref) < TOL and rel_err(alone, ref) < TOL and rel_err(ref_alone, ref) < TOL
    for g, g_ref in zip(grads, ref_grads):  # float32 sums in another order, through four layers
        assert rel_err(g, g_ref) < 1e-3


@pytest.mark.parametrize("wrong", [False, True])
def test_auto_verifies_and_times_the_low_rank_kernels_of_a_quantized_base(wrong, monkeypatch, tmp_path):
    """auto on a 4-bit base (the interpreter stands in for a GPU): the low-rank kernels are compared
    with the torch path and timed once per signature (named w=uint8, never a dense layer's), run when
    right and faster, ruled out with one warning when their results differ; the layer stays right."""
    from sharelora_kernels.ops import dispatch, lowrank_only_triton

    monkeypatch.setenv("SHARELORA_BACKEND", "auto")
    monkeypatch.setenv("SHARELORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch, "TIME_INTERPRETED_KERNELS", True)
    forward, calls = lowrank_only_triton._forward, []  # the kernels' forward, of every call

    def kernels(y, *a):
        calls.append(1)
        out = forward(y, *a)
        if wrong:
            y.mul_(1.1)
        return out

    monkeypatch.setattr(lowrank_only_triton, "_forward", kernels)
    previous = dispatch.set_timer(lambda name, run, device: {"triton": 1.0, "compose": 2.0}[name])
    try:
        dispatch.clear()
        torch.manual_seed(2)
        layer = SharedLoRALinear(standalone_quantized("nf4", True), r=5, alpha=10.0)
        torch.nn.init.normal_(layer.lora_paths[0].B)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer_against_float64(layer, m=6)
            layer_against_float64(layer, m=7, seed=1)  # the same signature: no second verification
        (row,) = ops.dispatch_table()
        assert row["weight_dtype"] == "uint8" and row["mode"] == "fwd+bwd"
        differ = [w for w in caught if "differ from compose" in str(w.message)]
        if wrong:
            assert row["choice"] == "compose" and set(row["rejected"]) == {"triton"} and len(differ) == 1
        else:
            assert row["choice"] == "triton" and not differ and row["verified_error"]["triton"] < 1e-5
            calls.clear()
            layer_against_float64(layer, m=5, seed=2)
            assert calls  # the planned call runs the kernels
    finally:
        dispatch.set_timer(previous)
        dispatch.clear()


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_training_steps_lower_the_loss(float_dir, quant):
    model = sk.apply(quantized(float_dir, quant), sk.ShareLoRAConfig(target_modules=TARGETS, dropout=0.1,
                                                                      **METHOD_CONFIGS["similarity"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(batch=4, seq=8, seed=3)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("reentrant", [False, True])
def test_kbit_preparation_and_gradient_checkpointing(float_dir, reentrant):
    """peft.prepare_model_for_kbit_training (input grads on, norms in fp32), then checkpointing on or off:
    the same gradients."""
    from peft import prepare_model_for_kbit_training

    config = sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["share_b"])
    ids = token_batch()
    grads = []
    for checkpointing in (False, True):
        model = prepare_model_for_kbit_training(quantized(float_dir, "nf4"), use_gradient_checkpointing=False)
        if checkpointing:
            enable_checkpointing(model, reentrant)
        sk.apply(model, config)
        randomize_adapters(model)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in adapter_tensors(model).values()])
    for g, g_ref in zip(*grads):
        assert rel_err(g, g_ref) < 1e-6


def test_bf16_compute_after_kbit_preparation_runs_with_and_without_autocast(float_dir):
    """bf16 base, 4-bit with bf16 compute; after preparation the norms are fp32, so x reaches the 4-bit
    layers in fp32: outside autocast the model runs as it does without adapters and with PEFT's
    (bitsandbytes casts x to its compute dtype), and it trains under autocast."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(quantized(float_dir, "nf4", torch.bfloat16), use_gradient_checkpointing=False)
    assert model.model.norm.weight.dtype == torch.float32
    sk.apply(model, sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_slice"]))
    ids = token_batch(batch=4, seq=8, seed=3)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in adapter_tensors(model).values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_compile_fullgraph(float_dir):
    torch.manual_seed(1)
    q = bnb.nn.Linear4bit(32, 24, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer = SharedLoRALinear(q, r=3, alpha=6.0).train()
    torch.nn.init.normal_(layer.lora_paths[0].B)
    params = [layer.lora_paths[0].A, layer.lora_paths[0].B]
    x = torch.randn(2, 5, 32, requires_grad=True)
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.sum(), [x, *params])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), [x, *params])
    assert torch.allclose(out, eager, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-5)


# ---------------------------------------------------------------------------------- checkpoints, PEFT, merge
def test_save_load_round_trip(float_dir, tmp_path):
    config = sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_gate"])
    model = sk.apply(quantized(float_dir, "nf4_double"), config)
    randomize_adapters(model)
    sk.save(model, tmp_path)
    loaded = sk.load(quantized(float_dir, "nf4_double"), tmp_path)
    ids = token_batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("quant", ["nf4_double", "int8"])
def test_save_pretrained_writes_a_base_from_pretrained_reads_back(float_dir, quant, tmp_path):
    """The quantized base under its unwrapped names (q_proj.weight), the adapters beside it: the
    folder loads back through from_pretrained and load, same logits; the model keeps its layers."""
    model = sk.apply(quantized(float_dir, quant), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["share_a"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SharedLoRALinear)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" in f.keys()
        assert not any(".base_layer." in k for k in f.keys())
    loaded = sk.load(AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu"), tmp_path).train()
    ids = token_batch()  # train mode (no dropout): bitsandbytes' CPU eval kernel needs wider layers
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_export_loads_in_peft_on_the_same_quantized_base(float_dir, quant, tmp_path):
    from peft import PeftModel

    model = sk.apply(quantized(float_dir, quant), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_kron"]))
    randomize_adapters(model, std=0.1)
    sk.export_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(quantized(float_dir, quant), tmp_path).train()
    assert "bnb" in type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__
    ids = token_batch(seed=9)
    assert rel_err(peft_model(ids).logits, model(ids).logits) < 1e-5


def test_from_peft_qlora_model(float_dir):
    """A PEFT QLoRA model converts to our layers on the same 4-bit base: same logits."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(quantized(float_dir, "nf4"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(peft_model, std=0.1)
    ids = token_batch(seed=4)
    expected = peft_model(ids).logits
    model = sk.from_peft(peft_model)
    assert isinstance(model.model.layers[1].mlp.down_proj, SharedLoRALinear)
    assert rel_err(model(ids).logits, expected) < 1e-5


def requantized(module, weight):
    """What quantizing ``weight`` with ``module``'s own settings and dequantizing gives, computed with
    bitsandbytes' functional API (independently of base.add_to_weight_)."""
    if isinstance(module, bnb.nn.Linear4bit):
        qs = module.weight.quant_state
        packed, state = bnb.functional.quantize_4bit(weight.to(qs.dtype), blocksize=qs.blocksize,
                                                     compress_statistics=qs.nested, quant_type=qs.quant_type)
        return bnb.functional.dequantize_4bit(packed, state).float()
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.half())
    return cb.float() * scb.unsqueeze(1).mul(1.0 / 127.0)


@pytest.mark.parametrize("quant", ["nf4_double", "int8"])
def test_merge_requantizes_with_the_base_settings(float_dir, quant, monkeypatch):
    """merge = dequantize, add the update, quantize again with the same settings (PEFT's rule); forward
    then runs the base alone. unmerge does the same with the update subtracted (the README measures
    what the rounding costs)."""
    model = sk.apply(quantized(float_dir, quant), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_kron"]))
    randomize_adapters(model, std=0.05)
    layer = model.model.layers[1].self_attn.v_proj
    before = dequantized_weight(layer.base_layer, layer.layout)
    expected = requantized(layer.base_layer, before + layer.delta_weight())
    ids = token_batch()
    unmerged_logits = model(ids).logits.detach()
    with pytest.warns(UserWarning, match="requantizes its weight"):
        sk.merge(model)
    assert layer.merged and torch.equal(dequantized_weight(layer.base_layer, layer.layout), expected)
    assert type(layer.base_layer.weight).__name__ in ("Params4bit", "Int8Params") and not layer.base_layer.weight.requires_grad
    with monkeypatch.context() as m:
        m.setattr(sk.ops, "lowrank_add", lambda *a: pytest.fail("a merged layer ran the low-rank op"))
        merged_logits = model(ids).logits.detach()
    assert torch.isfinite(merged_logits).all() and not torch.equal(merged_logits, unmerged_logits)
    with pytest.warns(UserWarning, match="requantizes its weight"):
        sk.unmerge(model)
    assert not layer.merged
    assert torch.equal(dequantized_weight(layer.base_layer, layer.layout),
                       requantized(layer.base_layer, expected - layer.delta_weight()))


# ---------------------------------------------------------------------------------- bad input
def test_input_of_another_dtype_computes_in_the_base_compute_dtype():
    """x in float32 on a bf16-compute 4-bit base outside autocast (a model prepared for k-bit training
    keeps its norms in fp32): bitsandbytes casts x to bf16 and returns float32; the paths read x, A and
    B rounded to bf16 and add in float32. Output and every gradient against a float64 reference of
    exactly that; autocast and a bf16 x still run."""
    torch.manual_seed(2)
    q = bnb.nn.Linear4bit(32, 24, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    layer = SharedLoRALinear(q, r=2, alpha=4).train()
    torch.nn.init.normal_(layer.lora_paths[0].B, std=0.5)
    a, b = layer.lora_paths[0].A, layer.lora_paths[0].B
    x = torch.randn(3, 32, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    dy = torch.randn_like(y)
    y.backward(dy)

    def r64(t):
        return t.detach().bfloat16().double().requires_grad_()
    x64, a64, b64 = r64(x), r64(a), r64(b)
    w64 = dequantized_weight(q, layer.layout, torch.bfloat16).double()
    y64 = x64 @ w64.t() + q.bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()
    y64.backward(dy.double())
    assert rel_err(y, y64) < 2e-2
    for got, want in ((a.grad, a64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) < 2e-2
    assert rel_err(x.grad, x64.grad) < 3e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(layer(x)).all()
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_unsupported_bitsandbytes_modules_are_refused():
    with pytest.raises(ValueError, match="not quantized yet"):
        SharedLoRALinear(bnb.nn.Linear4bit(32, 24))
    trained = bnb.nn.Linear8bitLt(32, 24, has_fp16_weights=True).to("cpu")
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        SharedLoRALinear(trained)

    class Custom(bnb.nn.Linear4bit):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="Custom, which subclasses nn.Linear but overrides its forward"):
        SharedLoRALinear(Custom(32, 24, quant_type="nf4").to("cpu"))


def test_missing_bitsandbytes_is_named(float_dir, monkeypatch):
    model = quantized(float_dir, "nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match=r"'model.layers.0.self_attn.q_proj' is a bitsandbytes quantized layer.*"
                                          r"sharelora_kernels\[qlora\]"):
        sk.apply(model, sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["lora"]))
    assert not isinstance(model.model.layers[0].self_attn.q_proj, SharedLoRALinear)  # nothing changed


def test_nothing_imports_bitsandbytes_for_a_float_model(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import sharelora_kernels as sk
from tiny_models import METHOD_CONFIGS, TARGETS, tiny_model, token_batch
model = sk.apply(tiny_model(layers=1), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_kron"]))
model(token_batch()).logits.sum().backward()
sk.merge(model)
sk.save(model, {str(tmp_path)!r})
assert "bitsandbytes" not in sys.modules, "bitsandbytes was imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]



def wide_nf4(float_dir):
    """A fresh nf4 tiny LLaMA (2 layers) loaded through Transformers, hidden 64 and MLP 128 wide: sizes
    bitsandbytes' CPU backend repacks for its inference kernel on an eval pass. Train mode."""
    folder = float_dir / "wide_mlp"
    if not folder.exists():
        tiny_family("llama", layers=2, hidden_size=64, intermediate_size=128).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**QUANTS["nf4"]),
                                                device_map="cpu").train()


def test_an_eval_pass_leaves_the_4bit_weight_training_uses(float_dir):
    """bitsandbytes' CPU backend would repack a 4-bit weight for its inference kernel on an eval pass,
    and undoing that (for training, merge, save) does not give the weight back: a wrapped base is
    never repacked, so training after an evaluation computes on the same weight (MLP 128 wide)."""
    model = wide_nf4(float_dir)
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    sk.apply(model, sk.ShareLoRAConfig(method="lora", r=4, target_modules=every_linear))  # every 4-bit module wrapped
    layers = [m for m in model.modules() if isinstance(m, SharedLoRALinear)]
    assert not [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and not any(m is q.base_layer for q in layers)]
    weights = [dequantized_weight(m.base_layer, m.layout).clone() for m in layers]
    ids = token_batch(2, 8, seed=4)
    before = model(ids, labels=ids).loss
    model.eval()
    with torch.no_grad():
        model(ids)
    assert torch.equal(model.train()(ids, labels=ids).loss, before)
    assert all(torch.equal(dequantized_weight(m.base_layer, m.layout), w) for m, w in zip(layers, weights))



def _eval_pass(model, ids):
    model.eval()
    with torch.no_grad():
        model(ids)
    return model.train()


def _repacked_as_an_eval_pass_leaves_it(model, ids):
    """The model after an eval pass on a CPU with AVX512-BF16, where bitsandbytes repacks each 4-bit
    weight for its inference kernel: an eval pass, then bitsandbytes' own conversion (a private
    function of bitsandbytes 0.50) of every weight the pass left (on other CPUs it leaves them all)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = _eval_pass(model, ids)
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and not getattr(state, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, state)
    return model


def test_an_eval_pass_leaves_the_gradients_through_4bit_modules_that_are_no_targets(float_dir):
    """o_proj and gate_proj are no targets here (they stay bitsandbytes' Linear4bit), yet the gradient
    of every adapter before them flows through them: an eval pass must not repack them either (the
    repacked layout has no backward), so a training step after it gives the same gradients."""
    model = wide_nf4(float_dir)
    sk.apply(model, sk.ShareLoRAConfig(method="lora", r=4, target_modules=TARGETS))
    assert [n for n in quantized_modules(model) if "o_proj" in n or "gate_proj" in n]  # some 4-bit non-targets
    randomize_adapters(model, std=0.1)
    params = list(adapter_tensors(model).values())
    ids = token_batch(2, 8, seed=4)
    before = torch.autograd.grad(model(ids, labels=ids).loss, params)
    after = torch.autograd.grad(_eval_pass(model, ids)(ids, labels=ids).loss, params)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_a_4bit_model_evaluated_before_the_adapters_is_refused(float_dir):
    """An eval pass before the adapters repacks the 4-bit weights on the CPU, and converting them back
    changes them: apply, the PEFT method and a hand-wrapped layer refuse such a base, naming a module,
    and leave the model as it was."""
    from peft import get_peft_model

    ids = token_batch(2, 8, seed=4)
    model = _repacked_as_an_eval_pass_leaves_it(wide_nf4(float_dir), ids)
    before = [type(m) for m in model.modules()]
    message = r"'model.layers.0.self_attn.q_proj' is a 4-bit layer whose weight bitsandbytes repacked .* load the model"
    with pytest.raises(ValueError, match=message):
        sk.apply(model, sk.ShareLoRAConfig(method="lora", r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, sk.ShareLoRAPeftConfig(r=4, target_modules=TARGETS))
    assert [type(m) for m in model.modules()] == before and not hasattr(model, "sharelora_plans")
    with pytest.raises(ValueError, match="the base is a 4-bit layer whose weight bitsandbytes repacked"):
        SharedLoRALinear(model.model.layers[0].self_attn.q_proj, r=4)


def test_a_quantized_module_to_save_is_refused_before_the_model_changes(float_dir):
    model = quantized(float_dir, "nf4")
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"modules_to_save entry 'model.layers.0.self_attn.o_proj' is quantized "
                                         r"\(weight is torch.uint8\) and cannot train in full"):
        sk.apply(model, sk.ShareLoRAConfig(r=2, target_modules=TARGETS,
                                           modules_to_save=["model.layers.0.self_attn.o_proj"]))
    assert [type(m) for m in model.modules()] == before and not hasattr(model, "sharelora_plans")
    sk.apply(model, sk.ShareLoRAConfig(r=2, target_modules=TARGETS))  # the model is still usable
