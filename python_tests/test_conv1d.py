"""Conv1D bases (GPT-2): the weight (K, N) read transposed in every backend, merge and export (PEFT parity:
test_peft.py)."""
import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

import sharelora_kernels as sk
from sharelora_kernels import ops
from sharelora_kernels.reference import LoRAPath
from tiny_models import randomize_adapters, tiny_family, token_batch

TARGETS = ["c_attn", "c_fc", "mlp.c_proj"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_conv1d_layer_keeps_its_weight_and_reads_it_transposed():
    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nx=8 in, nf=12 out: weight (8, 12)
    layer = sk.SharedLoRALinear(conv, r=3)
    assert layer.weight is conv.weight and tuple(layer.weight.shape) == (8, 12)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (8, 12, True)
    assert layer.base_weight().data_ptr() == conv.weight.data_ptr()  # a view, no copy
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)  # fresh: B = 0
    with torch.no_grad():
        layer.adapters["B"].normal_()
    a, b = layer.adapters["A"].double(), layer.adapters["B"].double()
    ref = x.double() @ conv.weight.double() + conv.bias.double() + (16 / 3) * (x.double() @ a.t()) @ b.t()
    assert rel_err(layer(x).double(), ref) < 1e-6
    before = conv.weight.detach().clone()
    layer.merge()
    assert rel_err(conv(x).double(), ref) < 1e-6 and layer.merged
    layer.unmerge()
    torch.testing.assert_close(conv.weight, before, rtol=0, atol=1e-6)


def test_triton_path_takes_the_transposed_weight_view(monkeypatch):
    """The fused kernels (Triton interpreter here) read a Conv1D's weight as a transposed view and give
    the float64 reference's output and gradients."""
    monkeypatch.setenv("SHARELORA_BACKEND", "triton")
    torch.manual_seed(1)
    k, n, r = 24, 40, 3
    stored = torch.randn(k, n)  # Conv1D layout
    weight = stored.t()  # (N, K), strides (1, N)
    assert not weight.is_contiguous()
    bias = torch.randn(n)
    a = torch.randn(r, k, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    x = torch.randn(7, k, requires_grad=True)
    y = ops.lora_linear(x, weight, bias, [LoRAPath("plain", (a, b), 0.5)])
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = x64 @ stored.double() + bias.double() + 0.5 * (x64 @ a64.t()) @ b64.t()
    ref_grads = torch.autograd.grad(ref, (x64, a64, b64), dy.double())
    assert rel_err(y.double(), ref) < 1e-4
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g.double(), rg) < 1e-4


@pytest.mark.parametrize("method", [dict(method="lora", r=3), dict(method="bishare", shape_transform="slice", local_r=1,
                                                                   intra_r=2, inter_r=2)])
def test_gpt2_export_loads_in_peft_and_merge_matches(method, tmp_path):
    base = tiny_family("gpt2")
    model = sk.apply(copy.deepcopy(base), sk.ShareLoRAConfig(target_modules=TARGETS, **method))
    randomize_adapters(model, std=0.1)
    sk.export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM"
    ids = token_batch(seed=3)
    with torch.no_grad():
        want = model(ids).logits
        assert rel_err(want, base(ids).logits) > 1e-3
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        assert rel_err(loaded(ids).logits, want) < 1e-5
        sk.merge(model)
        assert rel_err(model(ids).logits, want) < 1e-5
