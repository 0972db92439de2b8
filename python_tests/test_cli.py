"""python -m sharelora_kernels plan / finetune, end to end on the built-in model and on a BERT-style directory."""
import json
import re
from pathlib import Path

import pytest
import torch

import sharelora_kernels as sk
from cli_helpers import bert_dir, run_cli
from sharelora_kernels.config import ShareLoRAConfig
from sharelora_kernels.data import default_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """(out dir, printed report) of `plan` on the built-in model."""
    out = tmp_path_factory.mktemp("plan")
    code, printed, _ = run_cli(["plan", "--samples", "24", "--eps", "0.8", "--out", out])
    assert code == 0
    return out, printed


def builtin_backbone():
    from transformers import AutoModel

    return AutoModel.from_pretrained(default_model_dir(), local_files_only=True)


def test_plan_writes_configs_heatmap_and_similarity(planned):
    out, _ = planned
    config = ShareLoRAConfig.from_json((out / "plan.json").read_text())
    info = json.loads((out / "similarity.json").read_text())
    L = info["num_layers"]
    assert config.method == "similarity" and L == 10
    assert config.share_sets == [g for g in info["share_sets"] if len(g) > 1]
    assert sorted(i for g in info["share_sets"] for i in g) == list(range(L))
    S = torch.tensor(info["similarity"], dtype=torch.float64)
    assert S.shape == (L, L) and torch.equal(S, S.T) and torch.equal(S.diagonal(), torch.ones(L, dtype=torch.float64))
    for g in config.share_sets:  # complete construction: every pair inside a set above eps
        assert all(S[i, j] >= 0.8 for i in g for j in g)
    counts = info["counts"]
    assert counts["share_params"] <= counts["lora_params"] and counts["share_expanded_params"] <= counts["lora_params"]
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gate = info["bishare"]["gate"]  # the gate core shrinks to the model (the paper's 1024 x 1024 would dwarf LoRA)
    assert max(gate["gate_dims"]) <= 1024 and gate["params"] < counts["lora_params"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temporary file


def test_plan_json_reproduces_the_printed_counts(planned):
    """plan.json and bishare_<t>.json are complete configs: applied to the model they train exactly the
    parameter counts the report printed, and plan.json carries the Kronecker dim and gate core priced."""
    out, printed = planned
    rows = dict(re.findall(r"^  (LoRA r=\d+|ShareLoRA r=\d+(?: \(expanded\))?|Bi-Share \w+) .*?([\d,]+)  \(",
                           printed, flags=re.M))
    rows = {name: int(n.replace(",", "")) for name, n in rows.items()}
    assert len(rows) == 6, printed
    plan = ShareLoRAConfig.from_json((out / "plan.json").read_text())

    def count(config):
        return sk.trainable_parameters(sk.apply(builtin_backbone(), config))

    import dataclasses

    assert count(plan) == rows["ShareLoRA r=8"]
    expanded = next(v for k, v in rows.items() if k.endswith("(expanded)"))
    assert count(dataclasses.replace(plan, expand_rank=True)) == expanded
    assert count(dataclasses.replace(plan, method="lora", share_sets=[])) == rows["LoRA r=8"]
    for transform in ("slice", "gate", "kron"):
        bishare = ShareLoRAConfig.from_json((out / f"bishare_{transform}.json").read_text())
        assert (bishare.method, bishare.shape_transform) == ("bishare", transform)
        assert (bishare.kron_dim, bishare.gate_dims) == (plan.kron_dim, plan.gate_dims)
        assert count(bishare) == rows[f"Bi-Share {transform}"]
    assert f"d_s={plan.kron_dim}" in printed and "m,n={},{}".format(*plan.gate_dims) in printed


def test_plan_prints_sets_and_counts(tmp_path):
    code, text, _ = run_cli(["plan", "--samples", "12", "--eps", "0.9", "--contiguous", "--position", "output",
                             "--out", tmp_path])
    assert code == 0
    for expected in ("share sets at eps=0.9 (complete, contiguous)", "LoRA r=8", " (expanded) ",
                     "Bi-Share slice", "Bi-Share gate", "Bi-Share kron", "d_s=64", "plan.json", "12 calibration samples"):
        assert expected in text
    assert not re.search(r"\b1 (sets|slots|steps|layers)\b", text)
    config = ShareLoRAConfig.from_json((tmp_path / "plan.json").read_text())
    assert all(g == list(range(g[0], g[-1] + 1)) for g in config.share_sets)


def test_matplotlib_is_a_dependency_so_the_main_command_draws_the_heatmap():
    """The README's main command installs with `pip install -e .` alone: the heatmap needs no extra.
    (CI installs the test extra, which no longer lists matplotlib, so the PNG tests there prove it too.)"""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.M | re.S).group(1)
    assert re.search(r'^\s*"matplotlib', block, flags=re.M)
    test_extra = re.search(r"^test = \[(.*?)\]", text, flags=re.M).group(1)
    assert "matplotlib" not in test_extra
    main_command = re.search(r"<!-- main-command -->\n```\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert main_command.startswith("pip install -e . &&") and "plan" in main_command


def test_finetune_lowers_loss_and_saves(planned, tmp_path):
    out = tmp_path / "ft"
    code, printed, _ = run_cli(["finetune", "--plan", planned[0] / "plan.json", "--steps", "12", "--samples", "2",
                                "--batch-size", "4", "--seq-len", "48", "--lr", "1e-2", "--log-every", "6", "--out", out])
    assert code == 0
    log = json.loads((out / "losses.json").read_text())
    assert len(log["losses"]) == log["finished_steps"] == 12 and log["interrupted"] is False
    assert sum(log["losses"][-3:]) / 3 < sum(log["losses"][:3]) / 3 - 0.02
    assert "mean loss of the first 3 steps" in printed
    assert (out / "peft" / "adapter_config.json").is_file() and (out / "peft" / "adapter_model.safetensors").is_file()
    # the saved adapter loads back into a fresh copy of the model and changes its output
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), local_files_only=True).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = sk.load(base, out / "adapter")(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    # into the backbone class `plan` loads, the module names differ: the error says which side lacks which
    with pytest.raises(ValueError, match=r"the checkpoint has module 'model\.layers\.0\.mlp\.down_proj', "
                                         r"which the model lacks \(50 such; 50 target modules in the checkpoint, 50 in"):
        sk.load(builtin_backbone(), out / "adapter")


def test_plan_on_an_encoder_directory(tmp_path):
    model_dir = bert_dir(tmp_path / "bert")
    out = tmp_path / "plan"
    code, _, _ = run_cli(["plan", "--model", model_dir, "--samples", "8", "--eps", "0.5",
                          "--target-modules", "query", "key", "value", "--out", out])
    assert code == 0
    config = ShareLoRAConfig.from_json((out / "plan.json").read_text())
    assert config.target_modules == ["query", "key", "value"]
    assert json.loads((out / "similarity.json").read_text())["num_layers"] == 4
    from transformers import AutoModel

    for transform in ("slice", "gate", "kron"):  # every config priced fits the encoder
        bishare = ShareLoRAConfig.from_json((out / f"bishare_{transform}.json").read_text())
        sk.apply(AutoModel.from_pretrained(model_dir), bishare)
    assert 64 % config.kron_dim == 0 and config.gate_dims == (64, 64)


def test_plan_on_a_representation_with_no_direction_is_a_one_line_error(tmp_path, capsys):
    """The built-in model with BOS's embedding zeroed, one token per text: layer 0's input is a zero vector."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.bos_token_id] = 0
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code, _, _ = run_cli(["plan", "--model", tmp_path / "model", "--max-length", "1", "--samples", "4",
                          "--out", tmp_path / "out"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert err.splitlines()[-1].endswith("error: cannot measure the layer similarity: representation of sample 0 at "
                                         "layer 0 has zero norm (no direction)"), err


def test_plan_similarity_lets_other_model_errors_through():
    """Only a bad representation becomes a one-line error: a ValueError the model's forward raises
    (the representations stream from it while the distance is measured) keeps its type and traceback."""
    from sharelora_kernels.cli.plan import similarity
    from tiny_models import tiny_model

    model = tiny_model("llama", layers=2)

    def broken_forward(*args, **kwargs):
        raise ValueError("a bug inside the model")

    model.model.forward = broken_forward

    def tokenizer(texts, **kwargs):
        ids = torch.ones(len(texts), 3, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    with pytest.raises(ValueError, match="a bug inside the model"):
        similarity(model, tokenizer, ["a", "b"], 8, "input", 2)


def test_short_text_file_needs_no_samples_option(tmp_path):
    """A --text shorter than the default 64 samples is used whole; only an explicit --samples beyond it is an error."""
    from sharelora_kernels.cli import CommandError
    from sharelora_kernels.cli.loading import load_texts

    text = tmp_path / "short.txt"
    text.write_text("one paragraph.\n\nanother one.\n\n\nand a third\nof two lines.\n")
    assert load_texts(str(text), None, default=64) == ["one paragraph.", "another one.", "and a third\nof two lines."]
    assert load_texts(str(text), 2, default=64) == ["one paragraph.", "another one."]
    with pytest.raises(CommandError, match="--samples 4 asks for more paragraphs than .* holds \\(3\\)"):
        load_texts(str(text), 4, default=64)


def test_a_line_of_spaces_or_tabs_separates_paragraphs():
    from sharelora_kernels.data import split_paragraphs

    assert split_paragraphs("first\n   \nsecond\r\n \t\r\nthird\nstill third\n") == ["first", "second",
                                                                                       "third\nstill third"]


def test_finetune_samples_default_is_the_whole_task():
    """Only a missing --samples (None) means the default of 256 task paragraphs."""
    from sharelora_kernels.cli.loading import load_texts

    texts = load_texts(None, None, builtin="task")
    assert len(texts) == 256
    assert load_texts(None, 3, builtin="task") == texts[:3]
