"""torch.compile(fullgraph=True) of adapted models in every mode a user runs one: training (with
grad), torch.no_grad(), torch.inference_mode(), frozen adapters, and generate(); on dense
(LLaMA), Conv1D (GPT-2) and 4-bit bases. One graph, no break, outputs equal to eager."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch

import sharelora_kernels as sk
from sharelora_kernels.layer import SharedLoRALinear
from tiny_models import METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_family, tiny_model, token_batch

MODES = ("grad", "no_grad", "inference_mode", "frozen")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with dynamo's caches empty (the models' forwards share code objects)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Graphs:
    """A torch.compile backend that counts the graphs dynamo hands it (aot_eager runs them)."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.count += 1
        return aot_eager(gm, example_inputs)


def run_mode(mode: str, fn):
    """fn() under the mode's grad setting (frozen: the caller froze the adapters)."""
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, contextlib.nullcontext)
    with context():
        return fn()


def check_model(model, inputs, mode: str, rtol=1e-5):
    if mode == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
    graphs = Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    eager = run_mode(mode, lambda: model(**inputs).logits)
    out = run_mode(mode, lambda: compiled(**inputs).logits)
    assert graphs.count == 1
    assert (out - eager).abs().max() <= rtol * eager.abs().max()
    if mode == "grad":
        params = [p for p in model.parameters() if p.requires_grad]
        g_eager = torch.autograd.grad(model(**inputs).logits.pow(2).mean(), params)
        g_out = torch.autograd.grad(compiled(**inputs).logits.pow(2).mean(), params)
        for g, r in zip(g_out, g_eager):
            assert (g - r).abs().max() <= 1e-4 * r.abs().max()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["lora", "bishare_kron"])
def test_dense_llama_compiles_in_every_mode(method, mode):
    model = sk.apply(tiny_model(layers=2), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS[method]))
    randomize_adapters(model)
    check_model(model, {"input_ids": token_batch()}, mode)


@pytest.mark.parametrize("mode", MODES)
def test_conv1d_gpt2_compiles_in_every_mode(mode):
    model = sk.apply(tiny_family("gpt2"), sk.ShareLoRAConfig(method="lora", r=3, target_modules=["c_attn", "c_fc"]))
    randomize_adapters(model)
    check_model(model, {"input_ids": token_batch()}, mode)


def test_generate_compiled_matches_eager():
    model = sk.apply(tiny_model(layers=2), sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["lora"]))
    randomize_adapters(model)
    ids = token_batch(1, 5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **kw)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager", dynamic=True)
    assert torch.equal(model.generate(ids, **kw), eager)


@pytest.mark.parametrize("mode", MODES)
def test_4bit_base_compiles_in_every_mode(mode):
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(0)
    q = bnb.nn.Linear4bit(32, 24, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer = SharedLoRALinear(q, r=3, alpha=6.0).train()  # train: bitsandbytes' standard CPU layout
    torch.nn.init.normal_(layer.lora_paths[0].B)
    if mode == "frozen":
        layer.requires_grad_(False)
    x = torch.randn(2, 5, 32)
    graphs = Graphs()
    compiled = torch.compile(layer, fullgraph=True, backend=graphs)
    eager = run_mode(mode, lambda: layer(x))
    out = run_mode(mode, lambda: compiled(x))
    assert graphs.count == 1
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_compiled_inference_under_auto_runs_what_auto_chooses(monkeypatch, tmp_path):
    """auto inside a compiled inference call: one opaque op that asks dispatch when it runs, so the
    graph runs the kernels when they were measured faster (the interpreter stands in for a GPU)."""
    from sharelora_kernels import ops
    from sharelora_kernels.ops import dispatch, fused_lora_linear

    monkeypatch.setenv("SHARELORA_BACKEND", "auto")
    monkeypatch.setenv("SHARELORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch, "TIME_INTERPRETED_KERNELS", True)
    timed, ran = [], []
    previous = dispatch.set_timer(lambda name, run, device: timed.append(name) or {"triton": 1.0, "compose": 2.0}[name])
    real = fused_lora_linear.fused_lora_linear
    monkeypatch.setattr(fused_lora_linear, "fused_lora_linear", lambda *a: ran.append(1) or real(*a))
    try:
        dispatch.clear()
        torch.manual_seed(0)
        layer = SharedLoRALinear(torch.nn.Linear(24, 16), r=3)
        torch.nn.init.normal_(layer.lora_paths[0].B)
        x = torch.randn(2, 5, 24)
        graphs = Graphs()
        compiled = torch.compile(layer, fullgraph=True, backend=graphs)
        with torch.no_grad():
            out = compiled(x)
            ref = ops.lora_linear(x, layer.weight, layer.bias, layer.paths(), backend="compose")
        # verified against compose (one run), measured (by the injected timer), then run
        assert graphs.count == 1 and sorted(timed) == ["compose", "triton"] and len(ran) == 2
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert ops.dispatch_table()[0]["choice"] == "triton"
    finally:
        dispatch.set_timer(previous)
        dispatch.clear()


def test_adapter_changes_through_a_compile_wrapper_are_refused_before_anything_changes(tmp_path):
    """apply, load, delete_adapter and unload add or remove modules of the model itself: through the
    wrapper they are refused by name (they half-changed the model, or refused a matching checkpoint)."""
    model = tiny_model(layers=2)
    compiled = torch.compile(model, backend="eager")
    config = sk.ShareLoRAConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="apply changes the model's modules, and this is a torch.compile wrapper"):
        sk.apply(compiled, config)
    assert not sk.model.shared_layers(model)
    sk.apply(model, config, adapter_name="a")
    sk.apply(model, config, adapter_name="b")
    sk.save(compiled, tmp_path)  # reading through the wrapper is fine
    for call, what in ((lambda: sk.load(compiled, tmp_path), "load"),
                       (lambda: sk.delete_adapter(compiled, "b"), "delete_adapter"),
                       (lambda: sk.unload(compiled), "unload")):
        with pytest.raises(TypeError, match=f"call {what} on the model itself"):
            call()
        assert sk.model.adapter_names(model) == ["a", "b"] and len(sk.model.shared_layers(model)) == 2


def test_compiled_train_mode_dropout_without_grad_under_auto_draws_dropout(monkeypatch, tmp_path):
    """A compiled call in training mode with dropout that takes no gradient (no_grad: generation in
    RL) is not an inference call: its dropout is drawn, as in eager."""
    from sharelora_kernels.ops import dispatch

    monkeypatch.setenv("SHARELORA_BACKEND", "auto")
    monkeypatch.setenv("SHARELORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch, "TIME_INTERPRETED_KERNELS", True)
    previous = dispatch.set_timer(lambda name, run, device: {"triton": 1.0, "compose": 2.0}[name])
    try:
        dispatch.clear()
        torch.manual_seed(0)
        layer = SharedLoRALinear(torch.nn.Linear(32, 16), r=4, dropout=0.9).train()
        torch.nn.init.normal_(layer.lora_paths[0].B)
        x = torch.randn(64, 32)
        with torch.no_grad():
            base = torch.nn.functional.linear(x, layer.weight, layer.bias)
            undropped = layer.eval()(x) - base
            layer.train()
            dropped = torch.compile(layer, fullgraph=True, backend="eager")(x) - base
        assert (dropped - undropped).norm() > 0.5 * undropped.norm()  # a 0.9 dropout changes most of it
    finally:
        dispatch.set_timer(previous)
        dispatch.clear()


def test_a_model_compiled_before_any_mixed_batch_serves_one():
    """Compiled (and called) in a thread that never ran a mixed batch: a later block still gives each
    row its own adapter (dynamo guards on the thread's batches, present from the start)."""
    import threading

    model = tiny_model(layers=2).eval()
    for name in ("a", "b"):
        sk.apply(model, sk.ShareLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name=name)
        sk.set_adapter(model, name)
        randomize_adapters(model, seed=len(name) + ord(name))
    ids, rows, result = token_batch(batch=3, seq=4), ["a", "b", "__base__"], {}

    def serve():
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            compiled(input_ids=ids)
            with sk.mixed_batch(model, rows):
                result["eager"], result["compiled"] = model(input_ids=ids).logits, compiled(input_ids=ids).logits

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    torch.testing.assert_close(result["compiled"], result["eager"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_training_under_auto_runs_the_remembered_choice(dynamic, monkeypatch, tmp_path):
    """auto inside a compiled training call: dynamo cannot time, so the graph keeps the choice eager
    calls made for the signature (kernels measured faster: the fused op, its backward included);
    with no choice remembered, compose. The interpreter stands in for a GPU."""
    from sharelora_kernels import ops
    from sharelora_kernels.ops import dispatch, fused_lora_linear

    monkeypatch.setenv("SHARELORA_BACKEND", "auto")
    monkeypatch.setenv("SHARELORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch, "TIME_INTERPRETED_KERNELS", True)
    ran = []
    real = fused_lora_linear.forward_impl
    monkeypatch.setattr(fused_lora_linear, "forward_impl", lambda *a: ran.append(1) or real(*a))
    previous = dispatch.set_timer(lambda name, run, device: {"triton": 1.0, "compose": 2.0}[name])
    try:
        torch.manual_seed(0)
        layer = SharedLoRALinear(torch.nn.Linear(24, 16), r=3)
        torch.nn.init.normal_(layer.lora_paths[0].B)
        x = torch.randn(2, 5, 24, requires_grad=True)
        params = [x, *(t for p in layer.paths() for t in p.tensors)]

        def compiled_step():
            graphs = Graphs()
            if dynamic:  # a dynamic batch: M symbolic, auto's choice guarded to M's bucket
                torch._dynamo.mark_dynamic(x, 0)
            compiled = torch.compile(layer, fullgraph=True, backend=graphs)
            y = compiled(x)
            assert graphs.count == 1
            return y, torch.autograd.grad(y.pow(2).sum(), params)

        for remembered in (True, False):
            dispatch.clear()
            torch._dynamo.reset()
            if remembered:
                layer(x).sum().backward()  # eager: verified, measured, remembered
                assert [r["choice"] for r in ops.dispatch_table()] == ["triton"]
            else:
                for f in tmp_path.iterdir():
                    f.unlink()
            ran.clear()
            y, grads = compiled_step()
            assert bool(ran) == remembered
            ref = ops.lora_linear(x, layer.weight, layer.bias, layer.paths(), backend="compose")
            grads_ref = torch.autograd.grad(ref.pow(2).sum(), params)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            for g, r in zip(grads, grads_ref):  # float32 sums in another order: an error scaled to the tensor
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())
    finally:
        dispatch.set_timer(previous)
        dispatch.clear()


@pytest.mark.parametrize("backend", ["compose", "torch"])
def test_compiled_input_group_with_an_unused_member_matches_eager(backend):
    """q / k / v of one input group, k's output unused: the compiled grouped op gives every gradient
    eager gives (none for k's adapter, as eager), in one graph."""
    import torch.nn as nn

    from sharelora_kernels.grouping import InputGroup

    torch.manual_seed(0)
    layers = [SharedLoRALinear(nn.Linear(16, 8 + 4 * i), r=3, alpha=6) for i in range(3)]
    for layer in layers:
        nn.init.normal_(layer.lora_paths[0].B, std=0.3)
        layer.input_group = InputGroup(layers) if layer is layers[0] else layers[0].input_group
    model = nn.ModuleList(layers)

    def loss(x):
        q, _, v = (layer(x) for layer in model)
        return q.sum() * 2 + v.pow(2).sum()

    x = torch.randn(5, 16, requires_grad=True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    sk.ops.set_backend(backend)
    try:
        eager = torch.autograd.grad(loss(x), params, allow_unused=True)
        graphs = Graphs()
        out = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend=graphs)(x), params, allow_unused=True)
    finally:
        sk.ops.set_backend(None)
    assert graphs.count == 1
    assert [g is None for g in out] == [g is None for g in eager] == [False, False, False, True, True, False, False]
    for g, r in zip(out, eager):
        if r is not None:
            assert (g - r).abs().max() <= 1e-5 * r.abs().max()


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("x, message", [(torch.tensor(1.0), r"input is a 0-d tensor, this layer expects \(\.\.\., 16\)"),
                                        (torch.randn(3, 5), "input has 5 features in its last dim, this layer expects 16")],
                         ids=["0-d", "features"])
def test_a_compiled_layer_refuses_a_bad_input_with_the_eager_message(fullgraph, x, message):
    """A 0-d x gave dynamo's IndexError of shape[-1]; a compiled call now checks as an eager one."""
    import torch.nn as nn

    layer = SharedLoRALinear(nn.Linear(16, 8), r=3)
    # under fullgraph dynamo reports the ValueError raised in the traced code inside its own exception
    with pytest.raises(Exception if fullgraph else ValueError, match=message):
        torch.compile(layer, fullgraph=fullgraph, backend="aot_eager")(x)
