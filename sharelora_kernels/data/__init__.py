"""Built-in data shipped with the package: a trained tiny byte-level LLaMA, a calibration corpus and
a fine-tuning task.

``tiny_llama/`` is a Transformers model directory (``AutoModelForCausalLM`` / ``AutoTokenizer``
``.from_pretrained`` load it offline) made by ``train_tiny_model.py`` from ``calibration.txt``,
original English prose written for this project (paragraphs separated by blank lines).
``task_texts`` generates the default fine-tuning data: a task the model never saw (unit
conversions in a fixed format), so fine-tuning visibly lowers the loss.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
CALIBRATION_FILE = DATA_DIR / "calibration.txt"


def default_model_dir() -> Path:
    """Directory of the built-in tiny model (10 layers, hidden 128, byte-level vocabulary of 260)."""
    path = DATA_DIR / "tiny_llama"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"built-in model missing at {path}; rebuild it with "
                                "`python -m sharelora_kernels.data.train_tiny_model`")
    return path


def split_paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs of ``text`` (blocks separated by blank lines: empty, or only spaces or
    tabs), whitespace-trimmed."""
    return [p.strip() for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]


def calibration_texts(n: int | None = None) -> list[str]:
    """The first ``n`` paragraphs of the built-in corpus (all of them for None), in file order."""
    texts = split_paragraphs(CALIBRATION_FILE.read_text(encoding="utf-8"))
    if n is None:
        return texts
    if not 1 <= n <= len(texts):
        raise ValueError(f"n must be in [1, {len(texts)}] (the built-in corpus has {len(texts)} paragraphs), got {n}")
    return texts[:n]


TASK_MAX_TEXTS = 100_000  # the most paragraphs task_texts makes (a second's work)
_VALUES = 99  # a line converts 1 .. 99 units
_UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
          ("days", "hours", 24), ("litres", "millilitres", 1000), ("weeks", "days", 7))


def task_texts(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` paragraphs of the fine-tuning task, deterministic for a seed: each holds four lines like
    ``Convert 7 km to m. Answer: 7000 m.`` (``task_line_count`` different lines in all). ValueError
    unless 1 <= n <= TASK_MAX_TEXTS."""
    if not 1 <= n <= TASK_MAX_TEXTS:
        raise ValueError(f"n must be in [1, {TASK_MAX_TEXTS:,}], got {n}")
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        lines = []
        for _ in range(4):
            big, small, factor = rng.choice(_UNITS)
            value = rng.randint(1, _VALUES)
            lines.append(f"Convert {value} {big} to {small}. Answer: {value * factor} {small}.")
        texts.append("\n".join(lines))
    return texts


def task_line_count() -> int:
    """How many different lines the fine-tuning task has: one per unit pair and value."""
    return len(_UNITS) * _VALUES
