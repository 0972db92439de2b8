"""Shared by the subcommands: a plan file, a Transformers model directory (checked, as a weightless
skeleton, loaded), its tokenizer, the calibration / training texts and the device.

The checks (``read_plan``, ``read_model_config``, ``model_skeleton``, ``check_weight_shapes``,
``load_tokenizer``, ``load_texts``, ``resolve_device``) read no weights, so a command runs them all
before ``load_model``.
"""
from __future__ import annotations

from pathlib import Path

from . import CommandError

# What finetune and compare train: a decoder whose saved class predicts the next token.
CAUSAL_LM_NEED = ("fine-tuning (finetune, compare) needs a causal language model: a decoder saved as a *ForCausalLM "
                  "class (e.g. LlamaForCausalLM)")


def resolve_model_dir(model: str | None) -> Path:
    """``--model`` as a Path; None means the built-in tiny model."""
    from ..data import default_model_dir

    return default_model_dir() if model is None else Path(model)


def read_plan(path: Path):
    """The ShareLoRAConfig in a JSON file; CommandError naming the file if it is missing or not one."""
    from ..config import ShareLoRAConfig

    if path.is_dir():
        raise CommandError(f"plan file {path} is a folder: give the plan.json in it (or an adapter's "
                           "sharelora_config.json)")
    if not path.is_file():
        raise CommandError(f"plan file {path} does not exist (write one with `python -m sharelora_kernels plan`)")
    try:
        return ShareLoRAConfig.from_json(path.read_text())
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise CommandError(f"{path} is not a valid ShareLoRAConfig JSON: {err}") from err


def read_model_config(model_dir: Path, causal_lm: bool):
    """The directory's Transformers config, once it is known to be a model Transformers builds.

    CommandError naming the directory if it is missing, has no readable config.json, holds a model
    type ``AutoModel`` does not know, or (``causal_lm``) is not a causal language model: its model type
    has no causal-LM class, or config.json's ``architectures`` names a class without that head (an
    encoder such as BertModel, whose LM head would be random and its attention bidirectional).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    if not model_dir.exists():
        raise CommandError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise CommandError(f"{model_dir} is not a Transformers model directory (no config.json)")
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CommandError(f"{model_dir} is not a Transformers model directory (no usable config.json): "
                           f"{_first_line(err)}") from err
    except StrictDataclassError as err:  # a value of the wrong type, e.g. "hidden_size": "32"
        raise CommandError(f"{model_dir}/config.json holds an invalid value: {' '.join(str(err).split())}") from err
    except ArithmeticError as err:  # the config's own checks divide by a size or count
        raise CommandError(f"{model_dir}/config.json holds an invalid value: {err} (a size or count of 0, "
                           "e.g. num_attention_heads?)") from err
    if config.model_type not in MODEL_MAPPING_NAMES:
        raise CommandError(f"{model_dir} holds a model of type {config.model_type!r}, which Transformers' AutoModel "
                           "cannot build")
    if causal_lm:
        saved = list(getattr(config, "architectures", None) or [])
        heads = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (saved and not set(saved) & heads):
            what = "/".join(saved) or f"{config.model_type} model"
            raise CommandError(f"{model_dir} holds a {what} ({config.model_type}) with no causal-LM head; {CAUSAL_LM_NEED}. "
                               "`plan` works on it")
    return config


def model_skeleton(config, causal_lm: bool):
    """The model of ``config`` on the meta device: its module names and shapes, no weights (milliseconds).

    causal_lm: the AutoModelForCausalLM class (what finetune loads), else AutoModel (what plan loads).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as err:
        raise CommandError(f"cannot build a {config.model_type} model from its config.json: {_first_line(err)}") from err


def max_positions(config) -> int | None:
    """The longest input (in tokens) the model of ``config`` takes: its max_position_embeddings
    (GPT-2's n_positions) or n_ctx; None when its config names no limit."""
    text = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_weight_shapes(model_dir: Path, skeleton) -> None:
    """CommandError if a tensor of the directory's safetensors weights has another shape than the
    same tensor of ``skeleton`` (the model its config.json describes). Reads the files' headers
    only; tensors named differently (renamed by Transformers' loader), other formats and quantized
    checkpoints are left to ``load_model``."""
    import json

    from safetensors import SafetensorError, safe_open

    if getattr(skeleton.config, "quantization_config", None) is not None:
        return  # quantized tensors are stored packed, in other shapes
    index = model_dir / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # a damaged index: load_model names it
    prefix = getattr(skeleton, "base_model_prefix", "")
    expected = {}
    for name, t in skeleton.state_dict().items():
        expected[name] = expected[f"{prefix}.{name}"] = expected[name.removeprefix(f"{prefix}.")] = tuple(t.shape)
    for file in files:
        try:
            with safe_open(str(model_dir / file), framework="pt") as f:
                for name in f.keys():
                    shape = tuple(f.get_slice(name).get_shape())
                    if name in expected and shape != expected[name]:
                        raise CommandError(f"the weights in {model_dir / file} do not fit {model_dir}/config.json: "
                                           f"tensor {name} is {shape} there, {expected[name]} in the model config.json "
                                           "describes")
        except (OSError, SafetensorError):
            return  # missing or damaged: load_model names it


def load_model(model_dir: Path, causal_lm: bool, device: str):
    """The model's weights from ``model_dir``, eval mode, on ``device``, in the directory's dtype.

    causal_lm: AutoModelForCausalLM (fine-tuning needs the LM head), else AutoModel (the backbone gives the
    hidden states; encoder models such as BERT load too). CommandError naming the path if loading fails.
    """
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        model = auto.from_pretrained(model_dir, dtype="auto", local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        kind = "a causal language model" if causal_lm else "a model"
        raise CommandError(f"cannot load {model_dir} as {kind}: {_first_line(err)}") from err
    except (SafetensorError, EOFError, pickle.UnpicklingError, RuntimeError) as err:  # torch.load's zip reader: RuntimeError
        raise CommandError(f"cannot load the weights in {model_dir}: a damaged or truncated file? "
                           f"({_first_line(err)})") from err
    return model.to(device).eval()


def load_tokenizer(model_dir: Path):
    """The directory's tokenizer, with a pad token (its eos or unk token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CommandError(f"cannot load a tokenizer from {model_dir}: {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CommandError(f"the tokenizer of {model_dir} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_texts(text_file: str | None, samples: int | None, builtin: str = "calibration",
               default: int | None = None) -> list[str]:
    """The first ``samples`` paragraphs of ``text_file`` (blank-line separated), or for None of the
    built-in ``builtin`` text: "calibration" (the corpus, 121 paragraphs) or "task" (the fine-tuning
    task, generated: 256 paragraphs, or ``samples`` of them, at most ``TASK_MAX_TEXTS``).

    samples: the user's ``--samples`` (a count >= 1, checked by the caller), or None for ``default``
    paragraphs, or all of them when the text holds fewer or ``default`` is None. Only an explicit
    ``samples`` larger than the text is an error.
    """
    from ..data import TASK_MAX_TEXTS, calibration_texts, split_paragraphs, task_texts

    if text_file is None:
        if builtin == "task":
            if samples is not None and samples > TASK_MAX_TEXTS:
                raise CommandError(f"--samples {samples}: the built-in task makes at most {TASK_MAX_TEXTS:,} paragraphs "
                                   "(give a longer --text for more)")
            return task_texts(samples or default or 256)
        texts, source = calibration_texts(), "the built-in corpus"
    else:
        path = Path(text_file)
        if path.is_dir():
            raise CommandError(f"text file {path} is a directory, not a file")
        if not path.is_file():
            raise CommandError(f"text file {path} does not exist")
        try:
            texts, source = split_paragraphs(path.read_text(encoding="utf-8")), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise CommandError(f"text file {path} cannot be read as UTF-8 text: {_first_line(err)}") from err
        if not texts:
            raise CommandError(f"text file {path} holds no paragraph")
    if samples is not None and samples > len(texts):
        raise CommandError(f"--samples {samples} asks for more paragraphs than {source} holds ({len(texts)})")
    return texts[:samples if samples is not None else default]


def add_device_argument(p) -> None:
    """``--device``, read by ``resolve_device``."""
    p.add_argument("--device", metavar="DEVICE", default=None,
                   help="torch device (default: cuda if available, else cpu)")


def resolve_device(device: str | None) -> str:
    """``--device``: None means cuda if available, else cpu; CommandError if torch cannot use ``device`` here."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.empty(0, device=device).device.type
    except (RuntimeError, AssertionError) as err:  # AssertionError: "Torch not compiled with CUDA enabled"
        raise CommandError(f"--device {device} is not usable: {_first_line(err)}") from err
    if kind == "meta":
        raise CommandError(f"--device {device} holds shapes, no values: a model cannot run there (pass cpu or cuda)")
    return device


def _first_line(err: Exception) -> str:
    """The error's message on one line: its first line, and the lines it introduces when it ends with a
    colon (Transformers' "Couldn't instantiate the backend tokenizer from one of:" and its list)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return " ".join(lines) if lines[0].endswith(":") else lines[0]
