"""python -m sharelora_kernels compare, end to end at a tiny step count on the built-in model and task."""
import json
import math

import pytest

import sharelora_kernels as sk
from cli_helpers import run_cli
from sharelora_kernels.cli.compare import METHODS, _texts

TINY = ["--steps", "4", "--heldout", "4", "--batch-size", "2", "--seq-len", "32", "--calibration-samples", "16"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    code, printed, _ = run_cli(["compare", *TINY, "--out", out])
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
    plan = tmp_path / "plan.json"
    plan.write_text(sk.ShareLoRAConfig(method="similarity", share_sets=[[2, 3, 4, 5]]).to_json())
    code, _, _ = run_cli(["compare", *TINY, "--steps", "2", "--methods", "lora,sharelora", "--plan", plan,
                          "--out", tmp_path / "c"])
    assert code == 0
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert list(result["methods"]) == ["lora", "sharelora"] and result["share_sets"] == [[2, 3, 4, 5]]
    assert result["share_sets_from"] == str(plan)
