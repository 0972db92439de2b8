"""Shared by the subcommands: load a Transformers model directory and the calibration / training texts."""
from __future__ import annotations

from pathlib import Path

from . import CommandError


def resolve_model_dir(model: str | None) -> Path:
    """``--model`` as a Path; None means the built-in tiny model."""
    from ..data import default_model_dir

    return default_model_dir() if model is None else Path(model)


def load_model(model_dir: Path, causal_lm: bool, device: str):
    """(model, tokenizer) from a local directory, eval mode, on ``device``; CommandError naming the path if it is not a model.

    causal_lm: load with AutoModelForCausalLM (fine-tuning needs the LM head), else AutoModel (the backbone
    gives the hidden states; encoder models such as BERT load too). Weights keep the directory's dtype.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not model_dir.is_dir():
        raise CommandError(f"model directory {model_dir} does not exist")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise CommandError(f"{model_dir} is not a Transformers model directory (no usable config.json): {_first_line(err)}") from err
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        model = auto.from_pretrained(model_dir, dtype="auto", local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        kind = "a causal language model" if causal_lm else "a model"
        raise CommandError(f"cannot load {model_dir} ({config.model_type}) as {kind}: {_first_line(err)}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CommandError(f"cannot load a tokenizer from {model_dir}: {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CommandError(f"the tokenizer of {model_dir} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return model.to(device).eval(), tokenizer


def load_texts(text_file: str | None, samples: int | None, builtin: str = "calibration") -> list[str]:
    """The first ``samples`` paragraphs of ``text_file`` (blank-line separated), or for None of the
    built-in ``builtin`` text: "calibration" (the corpus) or "task" (the fine-tuning task).

    samples: a count >= 1 (the caller checks ``--samples``), or None for all paragraphs (256 of the task).
    """
    from ..data import calibration_texts, split_paragraphs, task_texts

    if text_file is None:
        if builtin == "task":
            return task_texts(256 if samples is None else samples)
        texts, source = calibration_texts(), "the built-in corpus"
    else:
        path = Path(text_file)
        if not path.is_file():
            raise CommandError(f"text file {path} does not exist")
        texts, source = split_paragraphs(path.read_text(encoding="utf-8")), str(path)
        if not texts:
            raise CommandError(f"text file {path} holds no paragraph")
    if samples is not None and samples > len(texts):
        raise CommandError(f"--samples {samples} asks for more paragraphs than {source} holds ({len(texts)})")
    return texts[:samples]


def resolve_device(device: str | None) -> str:
    """``--device``: None means cuda if available, else cpu; CommandError if torch cannot use ``device`` here."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # AssertionError: "Torch not compiled with CUDA enabled"
        raise CommandError(f"--device {device} is not usable: {_first_line(err)}") from err
    return device


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
