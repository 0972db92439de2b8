"""The built-in tiny model and corpus: shipped, offline, trained, with a lossless byte tokenizer."""
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from sharelora_kernels.data import CALIBRATION_FILE, calibration_texts, default_model_dir


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def test_directory_is_small_and_complete():
    path = default_model_dir()
    names = {f.name for f in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_log.json"} <= names
    assert sum(f.stat().st_size for f in path.iterdir()) < 6 * 2**20


def test_tokenizer_gives_what_the_model_takes(model_and_tokenizer):
    """model(**tokenizer(text)) and generate(**tokenizer(text)) work: the config names the inputs, so
    Transformers 4.x, whose fast tokenizer adds token_type_ids by default, gives none (LLaMA refuses them)."""
    model, tok = model_and_tokenizer
    config = json.loads((default_model_dir() / "tokenizer_config.json").read_text())
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    batch = tok(["a short text"], return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 2


def test_every_data_file_is_package_data_by_name():
    """What a wheel ships of data/ is named in pyproject.toml (a data/**/* glob shipped data/__pycache__
    and scratch files): every file the package reads is matched, and no pattern spans all of data/."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "sharelora_kernels"]
    package = root / "sharelora_kernels"
    shipped = [*default_model_dir().iterdir(), CALIBRATION_FILE, package / "ops" / "README.md",
               package / "integrations" / "README.md"]
    for f in shipped:
        assert any(fnmatch.fnmatch(f.relative_to(package).as_posix(), p) for p in patterns), f
    assert not any(fnmatch.fnmatch("data/__pycache__/x.pyc", p) for p in patterns)


def test_architecture(model_and_tokenizer):
    model, _ = model_and_tokenizer
    c = model.config
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert 8 <= c.num_hidden_layers <= 12 and 128 <= c.hidden_size <= 256
    assert c.num_key_value_heads < c.num_attention_heads
    linears = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))}
    assert set(linears) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert linears["k_proj"].out_features < linears["q_proj"].out_features
    assert all(m.in_features % 32 == 0 and m.out_features % 32 == 0 for m in linears.values())


def test_tokenizer_round_trips_random_text(model_and_tokenizer):
    _, tok = model_and_tokenizer
    rng = random.Random()  # fresh text every run
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"\n\t-éüßøñ日本語✓€😀"
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(text.encode("utf-8")) + 1
        assert all(0 <= i < 256 for i in ids[1:])
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_model_has_learned_the_corpus(model_and_tokenizer):
    """English text scores far better than the same bytes shuffled, and far better than uniform (ln 260 = 5.56)."""
    model, tok = model_and_tokenizer
    rng = random.Random()
    texts = rng.sample(calibration_texts(), 4)
    shuffled = ["".join(rng.sample(t, len(t))) for t in texts]

    def loss(batch):
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        with torch.no_grad():
            return model(**enc, labels=labels).loss.item()

    english, noise = loss(texts), loss(shuffled)
    assert english < 2.5 < noise
    log = json.loads((default_model_dir() / "training_log.json").read_text())
    assert log["final_corpus_loss_nats_per_byte"] < 2.5


def test_calibration_corpus():
    assert CALIBRATION_FILE.stat().st_size >= 60_000
    texts = calibration_texts()
    assert len(texts) >= 100 and all(t == t.strip() and t for t in texts)
    assert calibration_texts(5) == texts[:5]
    with pytest.raises(ValueError, match="built-in corpus has"):
        calibration_texts(len(texts) + 1)
