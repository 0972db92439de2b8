"""The planned compose calls of a layer (dense_program.DenseLean / DenseCompose,
path_program.PathCompose, lowrank_only.LowRankDense): every path kind and mix against float64
(outputs and every gradient), in each base dtype; with dropout equal to the router's compose call
drawing the same mask; frozen adapters, an input without grad, M = 0, many tokens."""
from __future__ import annotations

import pytest
import torch

from sharelora_kernels import ops, reference
from sharelora_kernels.ops import compose, dense_program, path_program

from test_call_plan import K, N, bishare_layer, check_against_float64, rel_err

MIXES = [("plain",), ("slice",), ("plain", "slice", "slice"), ("gate",), ("kron",), ("gate", "kron"),
         ("plain", "gate", "slice", "kron")]


def function_of(layer, x) -> str:
    """The name of the autograd node a layer call of a 2-d x makes."""
    return type(layer(x).grad_fn).__name__


@pytest.fixture(autouse=True)
def on_compose():
    ops.set_backend("compose")
    yield
    ops.set_backend(None)


@pytest.mark.parametrize("kinds", MIXES)
def test_planned_call_matches_float64(kinds):
    layer = bishare_layer(kinds=kinds)
    x = torch.randn(3, 5, K, requires_grad=True)
    check_against_float64(layer, x)
    dense = all(k in ("plain", "slice") for k in kinds)
    expected = "DenseLeanBackward" if dense else "PathComposeBackward"
    assert function_of(layer, x[0]) == expected


@pytest.mark.parametrize("kinds", [("plain",), ("plain", "slice", "slice"), ("gate", "kron")])
def test_planned_call_of_many_tokens(kinds):
    """From dense_program.TALL_ROWS tokens on, dB comes from the (R, N)-shaped GEMM (a transposed view)."""
    layer = bishare_layer(kinds=kinds)
    check_against_float64(layer, torch.randn(dense_program.TALL_ROWS + 3, K, requires_grad=True))
    layer.zero_grad(set_to_none=False)  # a gradient accumulated into an existing .grad
    x = torch.randn(dense_program.TALL_ROWS, K)
    layer(x).sum().backward()
    first = [t.grad.clone() for t in layer.store.parameters()]
    layer(x).sum().backward()
    for t, g in zip(layer.store.parameters(), first):
        torch.testing.assert_close(t.grad, 2 * g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kinds", [("plain",), ("plain", "slice", "slice"), ("gate", "kron")])
def test_planned_call_half_bases(kinds, dtype):
    """A half base: the low-rank GEMMs in bf16 (fp32 under fp16), gradients in the adapters' dtype."""
    layer = bishare_layer(kinds=kinds, dtype=dtype)
    x = torch.randn(6, K, dtype=dtype, requires_grad=True)
    check_against_float64(layer, x, tol=2e-2)


@pytest.mark.parametrize("kinds", [("plain",), ("plain", "slice", "slice"), ("gate", "kron"), ("kron",)])
def test_planned_dropout_equals_the_router_call_with_the_same_mask(kinds):
    layer = bishare_layer(kinds=kinds, dropout=0.3).train()
    x = torch.randn(7, K, requires_grad=True)
    params = [t for p in layer.paths() for t in p.tensors]
    dy = torch.randn(7, N)
    torch.manual_seed(5)
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params], dy)
    torch.manual_seed(5)
    y_ref = compose.lora_linear(x, layer.base_weight(), layer.bias, layer.paths(), 0.3, True)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], dy)
    assert rel_err(y, y_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5
    with torch.no_grad():  # the forward alone draws the same mask
        torch.manual_seed(5)
        assert rel_err(layer(x), y_ref) < 1e-5


@pytest.mark.parametrize("kinds", [("plain",), ("slice",), ("plain", "slice"), ("gate", "kron")])
def test_frozen_adapters_input_without_grad_and_empty_batch(kinds):
    layer = bishare_layer(kinds=kinds)
    x = torch.randn(4, K)
    for p in layer.store.parameters():
        p.requires_grad_(False)
    y = layer(x)
    assert y.grad_fn is None  # nothing wants a gradient: the forward alone
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(layer(xg), [xg], torch.ones(4, N))
    x64 = x.double().requires_grad_()
    paths64 = [p._replace(tensors=tuple(t.double() for t in p.tensors)) for p in layer.paths()]
    from sharelora_kernels import reference

    y64 = reference.lora_linear(x64, layer.weight.double(), layer.bias.double(), paths64)
    (dx64,) = torch.autograd.grad(y64, [x64], torch.ones(4, N, dtype=torch.float64))
    assert rel_err(y, y64) < 1e-5 and rel_err(dx, dx64) < 1e-5
    for p in layer.store.parameters():
        p.requires_grad_(True)
    # adapters train, x does not (the first layer of a model); then an empty batch
    check_against_float64(layer, x)
    empty = torch.randn(0, K, requires_grad=True)
    y0 = layer(empty)
    assert y0.shape == (0, N)
    y0.sum().backward()
    assert empty.grad.shape == (0, K)


@pytest.mark.parametrize("kinds", [("plain",), ("slice",), ("gate", "kron")])
def test_an_adapter_changed_in_place_before_backward_is_reported(kinds):
    """As autograd reports it for its own ops: a planned call whose backward reads the parameters
    saves them. (Several dense paths save their stacked copy: backward needs no parameter.)"""
    layer = bishare_layer(kinds=kinds)
    y = layer(torch.randn(4, K, requires_grad=True))
    with torch.no_grad():
        next(iter(layer.store.parameters())).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_path_program_takes():
    layer = bishare_layer(kinds=("gate", "kron"))
    paths = layer.paths()
    assert path_program.PathProgram.takes(paths) and not dense_program.DenseProgram.takes(paths)
    assert not path_program.PathProgram.takes(bishare_layer(kinds=("plain", "slice")).paths())
    twice = [paths[0], paths[0]]  # a tensor read by two paths: the general compose call (one buffer per tensor)
    assert not path_program.PathProgram.takes(twice)


def test_4bit_base_planned_call_equals_the_router_call():
    """A 4-bit base computing in float32 with plain paths: the plan's LowRankDense adds the paths
    as ``ops.lowrank_add`` does (outputs and every gradient), with and without grad."""
    bnb = pytest.importorskip("bitsandbytes")
    import logging

    import torch.nn as nn

    from sharelora_kernels.layer import SharedLoRALinear

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    base = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(dense.state_dict())
    layer = SharedLoRALinear(base.to("cpu"), r=4, alpha=8).train()
    nn.init.normal_(layer.lora_paths[0].B, std=0.5)
    x = torch.randn(2, 3, 64, requires_grad=True)
    params = [t for p in layer.paths() for t in p.tensors]
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LowRankDenseBackward"
    dy = torch.randn(y.shape)
    grads = torch.autograd.grad(y, [x, *params], dy)
    y_ref = ops.lowrank_add(layer._base_output(x), x, layer.paths(), 0.0, True)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], dy)
    assert rel_err(y, y_ref) < 1e-6
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5
    with torch.no_grad():
        assert rel_err(layer(x), y_ref) < 1e-6


@pytest.mark.parametrize("paths_of", ["plain", "slices"])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_4bit_half_compute_with_dropout_matches_float64(paths_of, autocast, half, monkeypatch):
    """QLoRA's setting: a 4-bit base computing in bf16 or fp16 (x in float32 under autocast, or in
    that dtype), float32 adapters, dropout in training. The plan's LowRankDense rounds the operands to
    it and accumulates in float32; output and every gradient against float64 math on the same mask."""
    pytest.importorskip("bitsandbytes")
    import logging

    import bitsandbytes as bnb
    import torch.nn as nn

    from sharelora_kernels.layer import SharedLoRALinear
    from sharelora_kernels.ops import lowrank_only

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(K, N, compute_dtype=half, quant_type="nf4")
    base.load_state_dict(nn.Linear(K, N).state_dict())
    if paths_of == "plain":
        layer = SharedLoRALinear(base.to("cpu"), r=5, alpha=8, dropout=0.25).train()
    else:
        donor = bishare_layer(kinds=("plain", "slice", "slice"))
        layer = SharedLoRALinear(base.to("cpu"), donor.lora_paths, dropout=0.25).train()
        layer.store = donor.store
    for t in layer.parameters():
        if t.requires_grad:
            nn.init.normal_(t, std=0.3)
    masks = []

    def recording(x, p):
        out = compose.draw_dropout(x, p)
        masks.append(out[1])
        return out

    monkeypatch.setattr(lowrank_only, "draw_dropout", recording)
    x = torch.randn(2, 7, K, dtype=torch.float32 if autocast else half, requires_grad=True)
    params = [t for p in layer.paths() for t in p.tensors]
    with torch.autocast("cpu", dtype=half, enabled=autocast):
        y = layer(x)
        y_base = layer._base_output(x)
    assert type(y.grad_fn).__name__ == "LowRankDenseBackward" and len(masks) == 1
    dy = torch.randn(y.shape, dtype=y.dtype)
    grads = torch.autograd.grad(y, [x, *params], dy)
    (dx_base,) = torch.autograd.grad(y_base, [x], dy)

    def rounded(t):  # an operand as the op reads it: rounded to the compute dtype
        return t.detach().to(half).double().requires_grad_()

    x64, p64 = rounded(x), [rounded(t) for t in params]
    paths64, i = [], 0
    for p in layer.paths():
        paths64.append(p._replace(tensors=tuple(p64[i:i + len(p.tensors)])))
        i += len(p.tensors)
    xd = (x64.reshape(-1, K) * masks[0] / 0.75).reshape(x.shape)
    zero = torch.zeros(N, K, dtype=torch.float64)
    low64 = reference.lora_linear(xd, zero, None, paths64)
    grads64 = torch.autograd.grad(low64, [x64, *p64], rounded(dy))
    assert rel_err(y, y_base.double() + low64) < 2e-2
    assert rel_err(grads[0], grads64[0] + dx_base.double()) < 2e-2
    for g, g64 in zip(grads[1:], grads64[1:]):
        assert g.dtype == torch.float32 and rel_err(g, g64) < 2e-2
    assert 0 < masks[0].float().mean() < 1  # some dropped, some kept


def test_the_torch_paths_dropout_seed_is_drawn_on_the_host():
    """The torch path reads its seed on the host (a device seed would sync every call); the
    kernels read theirs on x's device."""
    from sharelora_kernels.ops import lowrank_only

    assert lowrank_only._seed(torch.device("cuda"), use_triton=False).device.type == "cpu"
    assert lowrank_only._seed(torch.device("cpu"), use_triton=True).device.type == "cpu"
