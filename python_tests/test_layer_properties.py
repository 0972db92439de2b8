"""Property tests of whole layers: drawn configurations through the layer's call plan against float64.

``test_properties`` draws the functional op (``ops.lora_linear``); here the draws go through
``SharedLoRALinear`` itself, so every branch of its call plan is reached (``DenseLean``,
``DenseCompose``, ``PathCompose``, the general compose call, the cast base under autocast, input
groups, a base that computes itself, the torch path, the kernels through the interpreter): dense,
Conv1D, bitsandbytes nf4 and int8 bases, path mixes whose tensors are shared by two layers (the
gradients of a shared tensor sum over both) or read twice by one, base and adapter dtypes,
autocast, bias, eval-mode dropout, frozen tensors, an input without grad, 2-d, 3-d and strided
inputs, M = 0 and 1, grad mode, no_grad and inference mode, adapters disabled, merged (held to
the unmerged math) and unmerged again. Errors are measured against each element's magnitude bound
(the same math on absolute values), so a sum that cancels in bfloat16 is held to what its terms
allow. Each draw calls its layers three times: once to build the plan, once in the steady state,
and once after an in-place update of every tensor (an optimizer step), each call against float64;
gradients are checked on the last, and a frozen tensor must get none.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from transformers.pytorch_utils import Conv1D

from sharelora_kernels import ops, reference
from sharelora_kernels.base import dequantized_weight
from sharelora_kernels.grouping import InputGroup
from sharelora_kernels.layer import AdapterStore, LoRAPathModule, SharedLoRALinear
from sharelora_kernels.plan import PathSpec, TensorSpec

try:
    import bitsandbytes as bnb
except ImportError:  # a test extra: without it the draws keep to dense and Conv1D bases
    bnb = None

BASES = ["linear", "linear", "conv1d"] + (["nf4", "int8"] if bnb is not None else [])
NF4 = {"base": "nf4"} if bnb is not None else {}  # the pinned cases of an nf4 base
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # of each element's magnitude bound


def dims(case) -> tuple[int, int]:
    """(K, N): off every block size, but for an nf4 base what bitsandbytes' CPU layout of eval mode
    needs (K a multiple of its 64-element quantization block, N of 32)."""
    return (64, 32) if case["base"] == "nf4" else (16, 12)


def role_shapes(kind: str, r: int, k: int, n: int) -> dict[str, tuple[tuple[int, int], bool]]:
    """role -> (shape, shared by the two layers) of one path: slice tensors and the gate / Kronecker
    cores shared (Bi-Share's intra / inter parts), everything else the layer's own."""
    if kind == "plain":
        return {"A": ((r, k), False), "B": ((n, r), False)}
    if kind == "slice":
        return {"A": ((r, k + 5), True), "B": ((n + 3, r), True)}
    if kind == "gate":
        return {"A": ((r, 6), True), "B": ((5, r), True), "G_id": ((2, k), False), "G_iu": ((6, 2), False),
                "G_od": ((2, 5), False), "G_ou": ((n, 2), False)}
    return {"A": ((r, 4), True), "B": ((4, r), True), "K_A": ((1, k // 4), False), "K_B": ((n // 4, 1), False)}


def build_layers(case) -> tuple[list[SharedLoRALinear], list[nn.Module], AdapterStore, list[torch.Tensor]]:
    """``case['layers']`` layers of one store, their bases (``make_base``), the store, and each base
    weight in float64 before the adapters were merged (``case['adapters']``); every tensor random."""
    g = torch.Generator().manual_seed(case["seed"])
    specs, params, per_layer = {}, {}, []

    def tensor(name: str, shape: tuple[int, int]) -> str:
        if name not in params:  # a shared tensor is made by its first layer
            specs[name] = TensorSpec(name, shape, "gaussian", "lora", init_std=0.3)
            params[name] = nn.Parameter((torch.randn(shape, generator=g) * 0.3).to(case["adapter_dtype"]))
        return name

    for layer in range(case["layers"]):
        paths = []
        for i, (kind, r) in enumerate(zip(case["kinds"], case["ranks"])):
            names = {role: tensor(f"p{i}.{role}" if shared else f"l{layer}.p{i}.{role}", shape)
                     for role, (shape, shared) in role_shapes(kind, r, *dims(case)).items()}
            offsets = (2, 1) if kind == "slice" else (0, 0)
            paths.append(PathSpec(kind, "lora", names, 0.5 + 0.25 * i, 2 if kind == "gate" else r, *offsets))
        first = paths[0]
        if case["read_twice"] and first.kind == "plain":  # one more path reading the first path's A
            names = {"A": first.tensors["A"], "B": tensor(f"l{layer}.extra.B", (dims(case)[1], first.rank))}
            paths.append(PathSpec("plain", "lora", names, 1.5, first.rank, 0, 0))
        per_layer.append(paths)
    store = AdapterStore(params, specs)
    bases = [make_base(case, g) for _ in per_layer]
    layers = [SharedLoRALinear(base, [LoRAPathModule(s, store) for s in paths], dropout=case["dropout"])
              for base, paths in zip(bases, per_layer)]
    if case["group"] and len(layers) > 1:
        group = InputGroup(layers)
        for layer in layers:
            layer.input_group = group
    for layer in layers:
        layer.train(case["train"])
    for name in case["frozen"]:
        if name < len(params):
            list(params.values())[name].requires_grad_(False)
    weights = [base_weight64(layer) for layer in layers]  # before any merge
    for layer in layers:
        if case["adapters"] == "disabled":
            layer.enable_adapters(False)
        elif case["adapters"] in ("merged", "unmerged"):
            with warnings.catch_warnings():  # an nf4 base is requantized (and says so)
                warnings.simplefilter("ignore")
                layer.merge()
                if case["adapters"] == "unmerged":
                    layer.unmerge()
    if case["adapters"] == "unmerged":  # the weights back within their rounding (nf4: requantized twice)
        weights = [base_weight64(layer) for layer in layers]
    return layers, bases, store, weights


def make_base(case, g: torch.Generator) -> nn.Module:
    """A random frozen base of ``case['base']``: nn.Linear, transformers' Conv1D (weight (K, N)), a
    bitsandbytes nf4 layer computing in ``case['base_dtype']``, or a bitsandbytes int8 layer."""
    k, n = dims(case)
    dense = nn.Linear(k, n, bias=case["bias"])
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n, k, generator=g) * 0.3)
        if case["bias"]:
            dense.bias.copy_(torch.randn(n, generator=g))
    if case["base"] == "linear":
        return dense.to(case["base_dtype"])
    if case["base"] == "conv1d":
        conv = Conv1D(n, k)
        with torch.no_grad():
            conv.weight.copy_(dense.weight.t())
            conv.bias.copy_(dense.bias if case["bias"] else torch.zeros(n))
        return conv.to(case["base_dtype"])
    if case["base"] == "int8":
        q = bnb.nn.Linear8bitLt(k, n, bias=case["bias"], has_fp16_weights=False)
        q.load_state_dict(dense.state_dict())
        return q.to("cpu")
    q = bnb.nn.Linear4bit(k, n, bias=case["bias"], compute_dtype=case["base_dtype"], quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")


def base_weight64(layer) -> torch.Tensor:
    """The (N, K) weight the layer's base computes with, in float64."""
    if layer.layout.computes_itself:
        return dequantized_weight(layer.base_layer, layer.layout, torch.float64)
    return layer.base_weight().detach().double()


def float64_outputs(layers, x, dy, base_outs, weights, magnitude: bool = False):
    """Each layer's output in float64 and, for ``dy`` (one per layer, or None), the float64 gradients
    of x and of every store tensor by id (a shared tensor's summed over the layers; None where
    frozen). ``base_outs``: per layer, what a base that computes itself returned for x (its own
    numerics: bitsandbytes' CPU kernel of eval mode rounds the nf4 scales to bfloat16), taken as
    the base's part of the output; else None. ``weights``: per layer, its base weight (N, K) in
    float64 before any merge (a merged layer is held to the unmerged math; its adapters get no
    gradient). ``magnitude``: the same of every operand's absolute
    value (x, W, b, the adapters, dy): a bound on what each element sums, against which a rounding
    error is measured (a sum that cancels is not held to its own small size)."""
    fix = torch.abs if magnitude else (lambda t: t)
    store_params = {id(t): t for layer in layers for p in layer.paths() for t in p.tensors}
    p64 = {i: fix(t.detach().double()).requires_grad_(t.requires_grad) for i, t in store_params.items()}
    x64 = fix(x.detach().double()).requires_grad_(x.requires_grad)
    ys = []
    for layer, base_out, weight in zip(layers, base_outs, weights):
        merged = layer.merged
        paths = [p._replace(tensors=tuple(p64[id(t)].detach() if merged else p64[id(t)] for t in p.tensors))
                 for p in layer.paths()]  # none while adapters are disabled
        bias = None if layer.bias is None else fix(layer.bias.detach().double())
        weight = fix(weight)
        y = reference.lora_linear(x64, weight, bias, paths)
        if base_out is not None:  # the base's own output, the gradient of x W^T
            y = y - F.linear(x64, weight, bias).detach() + fix(base_out.double())
        ys.append(y)
    if dy is None:
        return ys, None
    wanted = [t for t in [x64, *p64.values()] if t.requires_grad]
    outs = [(y, fix(d.double())) for y, d in zip(ys, dy) if y.requires_grad]
    grads = [None] * len(wanted)
    if wanted and outs:
        grads = torch.autograd.grad([y for y, _ in outs], wanted, [d for _, d in outs], allow_unused=True)
    by_id = dict(zip(map(id, wanted), grads))
    return ys, {"x": by_id.get(id(x64)), **{i: by_id.get(id(t)) for i, t in p64.items()}}


def assert_close(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, tol: float, what: str) -> None:
    """Every element within ``tol`` times its magnitude bound (``float64_outputs(magnitude=True)``)."""
    err = (got.double() - want).abs()
    worst = (err - tol * bound).max().item() if err.numel() else -1.0
    assert worst <= 1e-12, f"{what}: error {err.max().item():.3g} beyond {tol} x its magnitude"


def make_input(case, g: torch.Generator) -> torch.Tensor:
    k, m = dims(case)[0], case["m"]
    shape = {"2d": (m, k), "3d": (2, m, k), "strided": (k, m)}[case["x_layout"]]
    x = torch.randn(shape, generator=g)
    x = x.t() if case["x_layout"] == "strided" else x
    # x in the base's dtype; for an nf4 base in its compute dtype, or float32 under autocast
    dtype = torch.float32 if case["base"] == "nf4" and case["autocast"] else case["base_dtype"]
    return x.to(dtype).requires_grad_(case["x_grad"])


def grad_context(mode: str):
    return {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]()


def call(layers, case, x):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if case["autocast"] else contextlib.nullcontext()
    with autocast:  # the members of an input group: the first one's call runs the group's
        return [layer(x) for layer in layers]


def base_results(layers, bases, case, x) -> tuple[list, list[torch.dtype]]:
    """(what each base that computes itself returns for x, else None; each base's result dtype),
    right after the layers' call, in its grad mode: bitsandbytes repacks a 4-bit weight on the CPU,
    with other numerics, for an eval-mode input without grad (the layer restores the standard
    layout where it trains), so the base must see what the layer's call saw."""
    if not layers[0].layout.computes_itself:
        with torch.no_grad():
            return [None] * len(layers), [y.dtype for y in call(bases, case, x[..., :1, :] if x.dim() > 1 else x)]
    if x.numel() == 0 and case["base"] == "nf4":  # bitsandbytes' CPU 4-bit kernel dies on it (returning x's dtype)
        return [None] * len(layers), [x.dtype] * len(layers)
    outs = [y.detach() for y in call(bases, case, x)]
    return outs, [y.dtype for y in outs]


def check_case(case):
    layers, bases, store, weights = build_layers(case)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    half = (case["autocast"] or torch.bfloat16 in (case["base_dtype"], case["adapter_dtype"])
            or case["base"] == "int8")  # bitsandbytes' int8 matmul runs in float16
    tol = TOL[torch.bfloat16 if half else torch.float32]
    for step in range(3):
        if step == 2 and case["adapters"] != "merged":  # an optimizer step: every tensor changed in place
            with torch.no_grad():
                for t in store.parameters():
                    t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.1)
        x = make_input(case, g)
        last = step == 2 and case["grad_mode"] == "grad"
        with grad_context(case["grad_mode"]):
            ys = call(layers, case, x)
            base_outs, dtypes = base_results(layers, bases, case, x)
        dys = [torch.randn(y.shape, generator=g) for y in ys] if last else None
        ys64, grads64 = float64_outputs(layers, x, dys, base_outs, weights)
        bounds, grad_bounds = float64_outputs(layers, x, dys, base_outs, weights, magnitude=True)
        for y, y64, bound, dtype in zip(ys, ys64, bounds, dtypes):
            event(type(y.grad_fn).__name__)
            assert y.shape == y64.shape and y.dtype == dtype  # the base's result dtype
            assert_close(y, y64, bound, tol, f"call {step}: output")
        if not last:
            continue
        if not any(y.requires_grad for y in ys):
            assert grads64 is None or all(v is None for v in grads64.values())
            continue
        torch.autograd.backward([y for y in ys if y.requires_grad], [d.to(y.dtype) for y, d in zip(ys, dys)
                                                                      if y.requires_grad])
        if case["x_grad"]:
            assert_close(x.grad, grads64["x"], grad_bounds["x"], tol, "dx")
        for t in store.parameters():
            expected = grads64.get(id(t))
            if not t.requires_grad or expected is None:
                assert t.grad is None, "a frozen tensor got a gradient"
                continue
            assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert_close(t.grad, expected, grad_bounds[id(t)], tol, f"gradient of {t.shape}")


layer_cases = st.fixed_dictionaries({
    "kinds": st.lists(st.sampled_from(["plain", "slice", "gate", "kron"]), min_size=1, max_size=3),
    "ranks": st.lists(st.integers(1, 5), min_size=3, max_size=3),
    "layers": st.sampled_from([1, 2]),
    "group": st.booleans(),
    "read_twice": st.booleans(),
    "base": st.sampled_from(BASES),
    "base_dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    "adapter_dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    "autocast": st.booleans(),
    "bias": st.booleans(),
    "train": st.booleans(),
    "dropout": st.sampled_from([0.0, 0.2]),
    "frozen": st.lists(st.integers(0, 11), max_size=3),
    "adapters": st.sampled_from(["on", "on", "on", "disabled", "merged", "unmerged"]),
    "x_grad": st.booleans(),
    "x_layout": st.sampled_from(["2d", "3d", "strided"]),
    "m": st.sampled_from([0, 1, 5, 9]),
    "grad_mode": st.sampled_from(["grad", "grad", "no_grad", "inference"]),
    "seed": st.integers(0, 2**16),
}).filter(lambda c: not (c["train"] and c["dropout"])  # dropout is checked against its mask elsewhere
          and not (c["adapters"] == "merged" and c["base"] in ("nf4", "int8")))  # requantized: tested elsewhere


def pinned(**changes) -> dict:
    """A case found by these tests once, kept: a plain-path layer with ``changes``."""
    case = {"kinds": ["plain"], "ranks": [1, 1, 1], "layers": 1, "group": False, "read_twice": False, "base": "linear",
            "base_dtype": torch.float32, "adapter_dtype": torch.float32, "autocast": False, "bias": False,
            "train": False, "dropout": 0.0, "frozen": [], "adapters": "on", "x_grad": False, "x_layout": "2d", "m": 1,
            "grad_mode": "grad", "seed": 0}
    return {**case, **changes}


@pytest.mark.parametrize("backend", ["compose", "torch"])
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layer_cases)
@example(case=pinned(**NF4, m=0))  # bitsandbytes' CPU kernel dies on an empty eval batch
@example(case=pinned(**NF4, x_grad=True))  # eval, x with grad: the layer's layout, not the CPU repack
@example(case=pinned(layers=2, frozen=[0, 1]))  # one layer without grad beside one with
def test_layers_match_float64(case, backend):
    ops.set_backend(backend)
    check_case(case)


@pytest.mark.skipif(not ops.HAS_TRITON, reason="triton not importable")
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=layer_cases)
@example(case=pinned(**NF4, kinds=["gate"], autocast=True, m=0))  # gate table built under autocast
@example(case=pinned(**NF4, kinds=["gate"], autocast=True, m=3, x_grad=True))
def test_layers_on_the_kernels_match_float64(case):
    ops.set_backend("triton")
    check_case(case)
