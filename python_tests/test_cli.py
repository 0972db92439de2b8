"""python -m sharelora_kernels plan / finetune, end to end on the built-in model and on a BERT-style directory."""
import json

import pytest
import torch
from transformers import BertConfig, BertModel

import sharelora_kernels as sk
from sharelora_kernels.__main__ import main
from sharelora_kernels.config import ShareLoRAConfig
from sharelora_kernels.data import default_model_dir
from sharelora_kernels.data.train_tiny_model import byte_tokenizer


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    assert main(["plan", "--samples", "24", "--eps", "0.8", "--out", str(out)]) == 0
    return out


def test_plan_writes_config_heatmap_and_similarity(planned, capsys):
    config = ShareLoRAConfig.from_json((planned / "plan.json").read_text())
    info = json.loads((planned / "similarity.json").read_text())
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
    assert (planned / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gate = info["bishare"]["gate"]  # the gate core shrinks to the model (the paper's 1024 x 1024 would dwarf LoRA)
    assert max(gate["gate_dims"]) <= 1024 and gate["params"] < counts["lora_params"]


def test_plan_prints_sets_and_counts(tmp_path, capsys):
    assert main(["plan", "--samples", "12", "--eps", "0.9", "--contiguous", "--position", "output",
                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for expected in ("share sets at eps=0.9 (complete, contiguous)", "LoRA r=8", "ShareLoRA expanded r=",
                     "Bi-Share slice", "Bi-Share gate", "Bi-Share kron", "d_s=64", "plan.json"):
        assert expected in text
    config = ShareLoRAConfig.from_json((tmp_path / "plan.json").read_text())
    assert all(g == list(range(g[0], g[-1] + 1)) for g in config.share_sets)


def test_plan_without_matplotlib_writes_everything_but_the_heatmap(tmp_path, capsys, monkeypatch):
    """matplotlib is optional: the README's main command must not need it."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["plan", "--samples", "12", "--out", str(tmp_path)]) == 0
    assert "similarity.png not drawn: similarity_heatmap needs matplotlib" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "similarity.json"]


def test_finetune_lowers_loss_and_saves(planned, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--plan", str(planned / "plan.json"), "--steps", "12", "--samples", "2", "--batch-size", "4",
            "--seq-len", "48", "--lr", "1e-2", "--log-every", "6", "--out", str(out)]
    assert main(argv) == 0
    losses = json.loads((out / "losses.json").read_text())["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02
    assert (out / "peft" / "adapter_config.json").is_file() and (out / "peft" / "adapter_model.safetensors").is_file()
    # the saved adapter loads back into a fresh copy of the model and changes its output
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), local_files_only=True).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = sk.load(base, out / "adapter")(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_plan_on_an_encoder_directory(tmp_path):
    model_dir = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, pad_token_id=256)).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "plan"
    assert main(["plan", "--model", str(model_dir), "--samples", "8", "--eps", "0.5",
                 "--target-modules", "query", "key", "value", "--out", str(out)]) == 0
    config = ShareLoRAConfig.from_json((out / "plan.json").read_text())
    assert config.target_modules == ["query", "key", "value"]
    assert json.loads((out / "similarity.json").read_text())["num_layers"] == 4


def test_not_a_model_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["plan", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a Transformers model directory" in err and "Traceback" not in err
    assert main(["plan", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["finetune", "--plan", str(tmp_path / "notes.txt")]) == 2
    assert "not a valid ShareLoRAConfig JSON" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["plan", "--samples", "0"], "--samples must be a positive number, got 0"),
    (["plan", "--max-length", "0"], "--max-length must be a positive number, got 0"),
    (["plan", "--batch-size", "0"], "--batch-size must be a positive number, got 0"),
    (["plan", "--r", "0"], "--r must be a positive number, got 0"),
    (["plan", "--alpha", "nan"], "--alpha must be a positive number, got nan"),
    (["plan", "--kron-dim", "-4"], "--kron-dim must be a positive number, got -4"),
    (["plan", "--device", "nonsense"], "--device nonsense is not usable: "),
    (["plan", "--samples", "500"], "--samples 500 asks for more paragraphs than the built-in corpus holds (121)"),
    (["finetune", "--plan", "plan.json", "--samples", "0"], "--samples must be a positive number, got 0"),
    (["finetune", "--plan", "plan.json", "--samples", "-3"], "--samples must be a positive number, got -3"),
    (["finetune", "--plan", "plan.json", "--steps", "0"], "--steps must be a positive number, got 0"),
    (["finetune", "--plan", "plan.json", "--batch-size", "0"], "--batch-size must be a positive number, got 0"),
    (["finetune", "--plan", "plan.json", "--lr", "-0.01"], "--lr must be a positive number, got -0.01"),
    (["finetune", "--plan", "plan.json", "--lr", "inf"], "--lr must be a positive number, got inf"),
    (["finetune", "--plan", "plan.json", "--log-every", "0"], "--log-every must be a positive number, got 0"),
    (["finetune", "--plan", "plan.json", "--seq-len", "1"], "--seq-len must be >= 2, got 1"),
])
def test_bad_option_values_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"python -m sharelora_kernels {argv[0]}: error: {message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(planned, tmp_path, capsys):
    for argv in (["plan"], ["finetune", "--plan", str(planned / "plan.json")]):
        assert main(argv + ["--device", "cuda", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"{argv[0]}: error: --device cuda is not usable" in err and "Traceback" not in err


def test_finetune_samples_default_is_the_whole_task():
    """Only a missing --samples (None) means the default of 256 task paragraphs."""
    from sharelora_kernels.cli.loading import load_texts

    texts = load_texts(None, None, builtin="task")
    assert len(texts) == 256
    assert load_texts(None, 3, builtin="task") == texts[:3]
