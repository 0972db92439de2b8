"""python -m sharelora_kernels compare, end to end at a tiny step count on the built-in model and task."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import sharelora_kernels as sk
from cli_helpers import run_cli
from sharelora_kernels.cli.compare import METHODS, _texts
from sharelora_kernels.cli.training import Windows, heldout_loss
from tiny_models import VOCAB, tiny_model

TINY = ["--steps", "4", "--heldout", "4", "--batch-size", "2", "--seq-len", "32", "--threads", "1"]
FOUND = ["--calibration-samples", "16"]  # where the share sets are found (no --plan)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    code, printed, _ = run_cli(["compare", *TINY, *FOUND, "--out", out])
    assert code == 0
    return out, printed, json.loads((out / "compare.json").read_text())


def test_every_method_trains_alike_and_is_reported(compared):
    out, printed, result = compared
    assert result["finished"] and list(result["methods"]) == list(METHODS) and not result["skipped"]
    assert result["share_sets"] and result["steps"] == 4
    base = result["base_heldout_loss"]
    for name, row in result["methods"].items():
        assert len(row["train_losses"]) == 4 and all(math.isfinite(x) for x in row["train_losses"])
        assert math.isfinite(row["heldout_loss"]) and row["heldout_loss"] < base, name  # training on the task helps
        assert row["step_ms_median"] > 0
        # AdamW keeps two float32 moments per trainable parameter (and a step count per tensor)
        assert 8 * row["trainable_params"] <= row["optimizer_state_bytes"] <= 8 * row["trainable_params"] + 4 * 1000
        assert row["label"] in printed
        config = sk.ShareLoRAConfig.from_dict(row["config"])
        assert config.method == {"lora": "lora", "sharelora": "similarity", "sharelora_expanded": "similarity"}.get(
            name, "bishare")
    rows = result["methods"]
    assert rows["sharelora"]["trainable_params"] < rows["lora"]["trainable_params"]
    assert rows["sharelora"]["trainable_params"] < rows["sharelora_expanded"]["trainable_params"] <= rows["lora"]["trainable_params"]
    assert rows["sharelora"]["config"]["share_sets"] == result["share_sets"]
    assert rows["bishare_kron"]["config"]["kron_dim"] == 64 and rows["bishare_gate"]["config"]["gate_dims"] == [128, 64]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = result["machine"]  # what the step times were measured on
    assert machine["torch_threads"] == 1 and machine["cpu_count"] >= 1
    assert len(machine["loadavg_before"]) == len(machine["loadavg_after"]) == 3


def test_same_seed_same_start(compared):
    """Same seed, same windows: the first step's loss (before any update) is the base model's on the same batch."""
    losses = [row["train_losses"][0] for row in compared[2]["methods"].values()]
    assert max(losses) - min(losses) < 1e-5


def test_heldout_text_shares_no_line_with_the_training_text():
    import argparse

    train, heldout, note = _texts(argparse.Namespace(text=None, heldout=32))
    assert len(heldout) == 32 and all(len(p.splitlines()) == 4 for p in heldout)
    trained = {line for p in train for line in p.splitlines()}
    assert not trained & {line for p in heldout for line in p.splitlines()}
    assert "no line of them trained on" in note["heldout"]


def test_share_sets_from_a_plan_and_a_subset_of_methods(tmp_path):
    """The plan gives the share sets; its other adapter fields, where they differ from the command
    line's (which every method trains with), are named in a note."""
    plan = tmp_path / "plan.json"
    plan.write_text(sk.ShareLoRAConfig(method="similarity", r=2, dropout=0.2, share_sets=[[2, 3, 4, 5]]).to_json())
    code, out, _ = run_cli(["compare", *TINY, "--steps", "2", "--methods", "lora,sharelora", "--plan", plan,
                            "--out", tmp_path / "c"])
    assert code == 0
    assert f"note: compare takes only the share sets of --plan {plan}; its r=2, dropout=0.2 differ" in out
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert list(result["methods"]) == ["lora", "sharelora"] and result["share_sets"] == [[2, 3, 4, 5]]
    assert result["share_sets_from"] == str(plan)


@pytest.mark.parametrize("bos", [1, None])
def test_heldout_loss_is_the_token_mean_over_windows_covering_the_text(bos):
    """Against a float64 reference: every window [BOS] + 7 tokens alone, the last (shorter) one included."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(3))
    width = 8 - (bos is not None)
    total, count = 0.0, 0
    for s in range(0, len(tokens), width):
        ids = torch.tensor(([] if bos is None else [bos]) + tokens[s : s + width].tolist())
        if len(ids) >= 2:
            with torch.no_grad():
                logits = model(ids[None]).logits[0].double()
            total += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            count += len(ids) - 1
    got = heldout_loss(model, tokens, seq_len=8, bos_id=bos, batch_size=3)  # batches padded on the right
    assert abs(got - total / count) / (total / count) < 1e-5


def test_heldout_loss_without_a_token_to_predict_is_refused():
    with pytest.raises(ValueError, match="1 held-out tokens and no BOS token: no token to predict"):
        heldout_loss(tiny_model(), torch.tensor([5]), seq_len=8, bos_id=None, batch_size=3)


def test_compare_refuses_a_heldout_text_of_one_token_without_bos(tmp_path, capsys, monkeypatch):
    """A tokenizer without BOS and a held-out paragraph of one token: nothing to measure, said before loading."""
    import shutil

    from transformers import AutoTokenizer

    from cli_helpers import forbid_model_loading
    from sharelora_kernels.data import default_model_dir

    model_dir = tmp_path / "model"
    shutil.copytree(default_model_dir(), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("Convert 3 km to m. Answer: 3000 m.\n\n" * 8 + "x\n")
    forbid_model_loading(monkeypatch)
    code, _, _ = run_cli(["compare", "--model", model_dir, "--text", text, "--heldout", "1", "--methods", "lora",
                          "--seq-len", "16", "--out", tmp_path / "out"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: --heldout 1: the held-out text ({text}: its last 1 paragraphs) is 1 token, and the tokenizer has no "
        "BOS token to start a window with: no token to predict; hold out more or longer paragraphs")


def test_training_windows_start_with_bos_and_repeat_for_a_seed():
    tokens = torch.arange(100, 400)
    a, b = Windows(tokens, 16, 4, bos_id=7, seed=5), Windows(tokens, 16, 4, bos_id=7, seed=5)
    first = a()
    assert first.shape == (4, 16) and first.dtype == torch.long and (first[:, 0] == 7).all()
    assert all(torch.equal(row[1:], torch.arange(row[1], row[1] + 15)) for row in first)  # consecutive tokens
    assert torch.equal(first, b()) and not torch.equal(a(), first)
    with pytest.raises(ValueError, match="the text has 10 tokens, too few for windows of 16 tokens"):
        Windows(torch.arange(10), 16, 4, bos_id=None, seed=0)


def test_adapter_optimizer_steps_the_adapters_alone_with_multi_tensor_adamw():
    """The CLI's optimizer: AdamW over the trainable tensors only, its foreach step (a Bi-Share
    model has many small tensors), the same update as the per-tensor loop."""
    from sharelora_kernels.cli.training import adapter_optimizer

    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(method="bishare", shape_transform="gate", gate_dims=(8, 8),
                                                      target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = adapter_optimizer(model, 1e-2)
    assert opt.defaults["foreach"] and [p for g in opt.param_groups for p in g["params"]] == trainable
    loop = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in trainable], lr=1e-2, weight_decay=0.0,
                             foreach=False)
    for p, q in zip(trainable, loop.param_groups[0]["params"]):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    loop.step()
    for p, q in zip(trainable, loop.param_groups[0]["params"]):
        torch.testing.assert_close(p, q)
