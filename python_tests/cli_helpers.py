"""Shared by the command-line tests: run a command and read its result, a BERT directory, a model-load trap."""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import torch

from sharelora_kernels.__main__ import main


def run_cli(argv: list[str]) -> tuple[int, str, float]:
    """(exit status, stdout, seconds) of ``python -m sharelora_kernels *argv``, in this process."""
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), time.perf_counter() - start


def bert_dir(path: Path) -> Path:
    """A small random BertModel directory with the built-in byte tokenizer (an encoder: no causal-LM head)."""
    from transformers import BertConfig, BertModel

    from sharelora_kernels.data.train_tiny_model import byte_tokenizer

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, pad_token_id=256)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def forbid_model_loading(monkeypatch) -> None:
    """Make every Transformers weight load fail the test: a check that must come first did not."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was checked")

    for auto in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", refuse)
