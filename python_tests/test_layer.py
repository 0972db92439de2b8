"""SharedLoRALinear on its own, and merge / unmerge on whole models."""

import pytest
import torch
import torch.nn as nn

import sharelora_kernels as sk
from sharelora_kernels import reference
from tiny_models import METHOD_CONFIGS, TARGETS, logits_and_grads, randomize_adapters, tiny_model, token_batch


def test_standalone_layer_matches_formula_with_any_leading_dims():
    base = nn.Linear(20, 11).double()
    layer = sk.SharedLoRALinear(base, r=5, alpha=10)
    nn.init.normal_(layer.lora_paths[0].B)
    a, b = layer.lora_paths[0].A, layer.lora_paths[0].B
    for shape in [(20,), (3, 20), (2, 4, 3, 20)]:
        x = torch.randn(*shape, dtype=torch.float64)
        expected = base(x) + 2.0 * (x @ a.T) @ b.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.A", "adapters.B"]


def test_rslora_scale():
    layer = sk.SharedLoRALinear(nn.Linear(8, 8), r=4, alpha=6, use_rslora=True)
    assert layer.lora_paths[0].spec.scale == pytest.approx(3.0)


def test_bad_inputs_are_named():
    layer = sk.SharedLoRALinear(nn.Linear(8, 6), r=2)
    with pytest.raises(ValueError, match="8"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="nn.Linear"):
        sk.SharedLoRALinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r must be"):
        sk.SharedLoRALinear(nn.Linear(8, 6), r=0)
    with pytest.raises(ValueError, match="dropout"):
        sk.SharedLoRALinear(nn.Linear(8, 6), dropout=1.5)
    for bad in (2.5, True):
        with pytest.raises(ValueError, match="r must be an integer"):
            sk.SharedLoRALinear(nn.Linear(8, 6), r=bad)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must be a positive number"):
            sk.SharedLoRALinear(nn.Linear(8, 6), alpha=bad)
    for bad in ("no", 1, None):
        with pytest.raises(ValueError, match="use_rslora must be true or false"):
            sk.SharedLoRALinear(nn.Linear(8, 6), use_rslora=bad)
    with pytest.raises(TypeError, match="paths\\[0\\] is a Linear; a layer's paths are LoRAPathModules"):
        sk.SharedLoRALinear(nn.Linear(8, 6), paths=[nn.Linear(8, 6)])


def test_numpy_numbers_are_taken_as_python_numbers():
    import numpy as np

    layer = sk.SharedLoRALinear(nn.Linear(8, 6), r=np.int64(4), alpha=np.float32(16), dropout=np.float32(0.25))
    spec = layer.lora_paths[0].spec
    assert (type(spec.rank), type(spec.scale), type(layer.dropout)) == (int, float, float)
    assert spec.scale == 4.0 and layer.adapters.A.shape == (4, 8) and layer.dropout == pytest.approx(0.25)


def test_a_0d_input_is_named():
    layer = sk.SharedLoRALinear(nn.Linear(8, 6), r=2)
    with pytest.raises(ValueError, match=r"input is a 0-d tensor, this layer expects \(\.\.\., 8\)"):
        layer(torch.tensor(1.0))


def test_standalone_layer_follows_its_base_mode_and_keeps_float32_adapters_on_half_bases():
    base = nn.Linear(8, 6).to(torch.bfloat16).eval()
    layer = sk.SharedLoRALinear(base, r=2, dropout=0.5)
    assert not layer.training and not any(m.training for m in layer.modules())
    assert {p.dtype for p in layer.adapters.parameters()} == {torch.float32}
    nn.init.normal_(layer.lora_paths[0].B)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert torch.equal(layer(x), layer(x))  # eval: no dropout


def test_dropout_only_in_training_and_only_on_adapter_input():
    layer = sk.SharedLoRALinear(nn.Linear(16, 16), r=4, dropout=0.5)
    nn.init.normal_(layer.lora_paths[0].B)
    x = torch.randn(64, 16)
    layer.eval()
    a = layer(x)
    assert torch.equal(a, layer(x))
    layer.train()
    b, c = layer(x), layer(x)
    assert not torch.allclose(b, c)
    layer.lora_paths[0].B.data.zero_()
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_merge_unmerge_round_trip(name):
    model = sk.apply(tiny_model("qwen2"), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))
    randomize_adapters(model, std=0.1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = token_batch()
    with torch.no_grad():
        out = model(ids).logits
        sk.merge(model)
        assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
        torch.testing.assert_close(model(ids).logits, out, rtol=1e-4, atol=1e-4)
        sk.unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "bishare_slice", "bishare_kron", "bishare_gate"])
def test_autocast_bf16_matches_float64_reference_within_bf16_tolerance(name):
    """Under CPU autocast every path runs in bf16 (fp32 accumulation); output and grads stay close."""
    model = sk.apply(tiny_model("llama"), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))
    randomize_adapters(model, std=0.3)
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(5, 3, layer.in_features, requires_grad=True)  # dx mixes bf16 and fp32 terms
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    paths = [p._replace(tensors=tuple(t.detach().double().requires_grad_() for t in p.tensors)) for p in layer.paths()]
    ref = reference.lora_linear(x64, layer.weight.double(), None, paths)
    assert (y.double() - ref).norm() / ref.norm() < 1e-2
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(y, [x] + [t for p in layer.paths() for t in p.tensors], dy.to(y.dtype))
    grads_ref = torch.autograd.grad(ref, [x64] + [t for p in paths for t in p.tensors], dy)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32 and (g.double() - g_ref).norm() / g_ref.norm() < 2e-2


@pytest.mark.parametrize("name", ["lora", "bishare_slice", "bishare_kron", "bishare_gate"])
def test_autocast_training_step_of_a_whole_model(name):
    """Model under autocast, loss.backward(): every layer's input needs a gradient (dx mixes the bf16
    base term and the fp32 low-rank one). Adapter grads are fp32 and point where the fp32 run's do
    (bf16 noise grows through 4 layers, so per-layer accuracy is checked above, not here)."""
    model = sk.apply(tiny_model("llama"), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[name]))
    randomize_adapters(model, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = token_batch()
    loss32 = model(input_ids=ids, labels=ids).loss
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss32, params)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert abs(loss.item() - loss32.item()) < 1e-2
    assert torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]), ref, dim=0) > 0.95


def test_compile_fullgraph_dynamic_no_recompile_across_sequence_lengths():
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_gate"]))
    randomize_adapters(model)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counting_backend)
    for seq in (5, 7, 9, 12):
        ids = token_batch(2, seq)
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert len(graphs) == 1


def test_inductor_compile_matches_eager_outputs_and_gradients():
    """The default backend (Inductor, generated C++ on the CPU) through the torch path's autograd
    Function and the Kronecker fold: float32 within reordering error."""
    model = sk.apply(tiny_model(layers=2), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_kron"]))
    randomize_adapters(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for seq in (5, 9):
        ids = token_batch(2, seq)
        (out, grads), (ref, ref_grads) = logits_and_grads(model, ids, compiled), logits_and_grads(model, ids)
        assert (out - ref).abs().max() / ref.abs().max() < 1e-5
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() / r.abs().max() < 1e-4


def test_a_path_spec_is_frozen_and_a_replaced_spec_reaches_forward_and_merge():
    import dataclasses

    layer = sk.SharedLoRALinear(nn.Linear(8, 6), r=2, alpha=4)
    nn.init.normal_(layer.adapters.B)
    x = torch.randn(3, 8)
    layer(x)  # the call plan is built
    module = layer.lora_paths[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.spec.scale = 10.0
    module.spec = dataclasses.replace(module.spec, scale=10.0)
    expected = nn.functional.linear(x, layer.weight + layer.delta_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert layer.delta_weight().abs().max() > 0


@pytest.mark.parametrize("backend", [None, "torch", "compose"])
def test_a_layer_on_the_meta_device_propagates_shapes(backend):
    with torch.device("meta"):
        layer = sk.SharedLoRALinear(nn.Linear(8, 6), r=2, dropout=0.1)
    sk.ops.set_backend(backend)
    x = torch.ones(2, 3, 8, device="meta", requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 6) and y.is_meta
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.adapters.B.grad.is_meta
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on elsewhere: meta has none
        assert layer(x).shape == (2, 3, 6)


@pytest.mark.parametrize("backend", ["torch", "compose", "triton"])
def test_torch_func_transforms_are_refused_by_name(backend):
    """torch.func transforms over a layer (unsupported) raise an error naming the package and the
    transform, also where a call plan was built before; functional_call alone runs."""
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    if backend == "triton":
        pytest.importorskip("triton")
    sk.ops.set_backend(backend)
    layer = sk.SharedLoRALinear(nn.Linear(8, 6), r=2).train()
    x = torch.randn(3, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    expected = nn.functional.linear(x, layer.weight, layer.bias) + layer.lora_paths[0].spec.scale * (x @ a.t()) @ b.t()
    torch.testing.assert_close(functional_call(layer, {"adapters.A": a, "adapters.B": b}, (x,)), expected)
    layer(x).sum().backward()  # a plan that later calls would reuse
    cases = [("vmap", lambda: vmap(layer)(x)),
             (r"grad \(or vjp, jacrev\)", lambda: grad(lambda a: functional_call(layer, {"adapters.A": a}, (x,)).sum())(a)),
             (r"grad \(or vjp, jacrev\)", lambda: jacrev(layer)(x[0])),
             (r"jvp \(or jacfwd\)", lambda: jvp(layer, (x,), (x,)))]
    for name, call in cases:
        with pytest.raises(NotImplementedError, match=rf"torch.func.{name} over a sharelora_kernels layer is not supported"):
            call()


def test_a_parametrized_tensor_is_refused_by_name():
    import torch.nn.utils.parametrize as parametrize

    class Twice(nn.Module):
        def forward(self, t):
            return 2 * t

    x = torch.randn(3, 8)
    for owner, name in (("adapters", "A"), ("layer", "weight")):
        layer = sk.SharedLoRALinear(nn.Linear(8, 6), r=2)
        layer(x)  # a plan built before the parametrization
        parametrize.register_parametrization(layer.adapters if owner == "adapters" else layer, name, Twice())
        for call in (lambda: layer(x), layer.delta_weight, layer.merge):
            with pytest.raises(NotImplementedError, match=rf"parametrize on \['{name}'\] of a ShareLoRA layer"):
                call()


def test_safe_merge_checks_the_merged_weight_in_its_own_dtype():
    """A delta finite in float32 can overflow a float16 weight (65504): safe_merge refuses, as PEFT
    does, and the weight stays as it was."""
    layer = sk.SharedLoRALinear(nn.Linear(8, 6), r=2).half()
    with torch.no_grad():
        layer.lora_paths[0].A.fill_(30.0)
        layer.lora_paths[0].B.fill_(30.0)  # delta = s * B A = 8 * 2 * 900 = 14400 per element ...
        layer.weight.fill_(60000.0)  # ... on a weight of 60000: 74400 overflows float16
    before = layer.weight.clone()
    assert torch.isfinite(layer.delta_weight(["default"])).all() and not layer.merge_is_finite()
    with pytest.raises(ValueError, match="would put non-finite values into the base weight"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, before) and not layer.merged_adapters
