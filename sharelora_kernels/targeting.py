"""Which modules get adapters, and how the planners group them: the one place for these rules.

Matching follows PEFT (``target_modules``, ``exclude_modules``, ``modules_to_save``):
  * a list entry matches a module whose full name equals it or ends with ``"." + entry``
    (``"attention.output.dense"`` picks BERT's attention output, not its FFN output);
  * a string is a regular expression, full-matched against the full name;
  * ``"all-linear"`` (target_modules only): every ``nn.Linear`` / ``Conv1D`` but the output head.
``layers_to_transform`` keeps the modules whose layer index it lists. ``target_modules=None``
takes ``DEFAULT_TARGET_MODULES[model_type]``. A user's list entry that matches no module, an
``exclude_modules`` or ``modules_to_save`` entry that matches none, or a listed layer no target
lies in: each raises ValueError naming it.

Layers and module types (what the planners share by):
  * a module's layer is the first integer in its dotted name (with ``layers_pattern``: the integer
    after the first name component matching it, as in PEFT); its *stack* is the name before that
    integer (``"model.layers"``). Modules outside numbered layers (pooler, heads) have no layer.
  * its module type is its full name with the layer index replaced by ``*``
    (``encoder.layer.*.attention.output.dense``); plans label each type by the shortest dotted
    suffix that tells it apart from the other targeted types (``q_proj``, ``attention.output.dense``,
    ``*.output.dense``, ``pooler.dense``).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

from .base import describe_base, is_linear_like, is_wrapped
from .config import ALL_LINEAR, ShareLoRAConfig


@dataclass(frozen=True)
class ModuleInfo:
    """A target module as the planner sees it (``find_target_modules`` finds them)."""

    name: str  # full module path, e.g. "model.layers.3.self_attn.q_proj"
    layer: int | None  # None: outside the numbered layers (a pooler, a head)
    module_type: str  # label of the name with the layer index as "*" (``type_labels``), e.g. "q_proj"
    in_features: int
    out_features: int
    stack: str | None = None  # the path before the layer index, e.g. "model.layers"


# The papers' targets (q, k, v, up, down; the README's "The methods") in each family's module names. PEFT's
# own table targets attention q and v only; pass target_modules=["q_proj", "v_proj"] for that.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **{t: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "cohere")},
    # mixture-of-experts: the experts are fused 3-D parameters (no linear modules), so attention only
    **{t: ["q_proj", "k_proj", "v_proj"] for t in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")},
    "opt": ["q_proj", "k_proj", "v_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "fc_in", "fc_out"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "c_fc", "c_proj"],  # c_proj: the MLP's (attention's is o_proj)
    "phi3": ["qkv_proj", "gate_up_proj", "down_proj"],  # fused q/k/v and gate/up
    "gpt2": ["c_attn", "c_fc", "mlp.c_proj"],  # Conv1D; attn.c_proj is the output projection
    # fused q/k/v, up, down; the attention output is "attention.dense" / "self_attention.dense"
    **{t: ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"] for t in ("falcon", "bloom", "gpt_neox")},
    # "output.dense" is the attention output and the FFN output alike (BERT names both so)
    **{t: ["query", "key", "value", "intermediate.dense", "output.dense"] for t in ("bert", "roberta")},
    "t5": ["q", "k", "v", "wi", "wi_0", "wi_1", "wo"],  # wi: T5 v1.0, wi_0 / wi_1: gated T5 v1.1
}

# PEFT's task types, by the Transformers auto-class mapping the model's class is in (first match).
_TASK_MAPPINGS = (("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                  ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
                  ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
                  ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
                  ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
                  ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"))
_TASK_SUFFIXES = (("CAUSAL_LM", "ForCausalLM"), ("SEQ_CLS", "ForSequenceClassification"),
                  ("TOKEN_CLS", "ForTokenClassification"), ("QUESTION_ANS", "ForQuestionAnswering"))
# modules_to_save=None means these heads for these tasks (PEFT's task types do the same)
_CLASSIFIERS = ("classifier", "score", "pre_classifier")  # pre_classifier: DistilBERT's, new at init as its classifier
TASK_HEADS = {"SEQ_CLS": _CLASSIFIERS, "TOKEN_CLS": _CLASSIFIERS, "QUESTION_ANS": ("qa_outputs",)}


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type of a Transformers model class (what ``AutoPeftModelFor*`` loads), or None."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, mapping in _TASK_MAPPINGS:
        for classes in getattr(modeling_auto, mapping, {}).values():
            if name in ((classes,) if isinstance(classes, str) else classes):
                return task
    return next((task for task, suffix in _TASK_SUFFIXES if name.endswith(suffix)), None)


def matches(name: str, spec: str | Sequence[str]) -> bool:
    """PEFT's rule: a string full-matches as a regex; a list entry equals the name or is its dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == e or name.endswith("." + e) for e in spec)


def layer_position(name: str, layers_pattern: str | Sequence[str] | None = None) -> tuple[int | None, str | None]:
    """(layer index, stack) of a module name: "model.layers.3.mlp" -> (3, "model.layers"); (None, None)
    outside numbered layers. With ``layers_pattern`` (PEFT's rule), the index follows the first match
    of a pattern, in order, that starts at a component and may span several ("decoder.block")."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    for p in patterns:
        found = re.match(rf"(?:^|.*?\.)(?:{p})\.(?P<sharelora_layer>\d+)(?:\.|$)", name)
        if found:
            return int(found["sharelora_layer"]), name[:found.start("sharelora_layer") - 1]
    if patterns:
        return None, None
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            return int(parts[i]), ".".join(parts[:i])
    if parts[0].isdigit():  # a container root: its children are the layers
        return int(parts[0]), ""
    return None, None


def module_type(name: str, layers_pattern: str | Sequence[str] | None = None) -> str:
    """The name with its layer index replaced by ``*`` (the name itself outside numbered layers)."""
    layer, stack = layer_position(name, layers_pattern)
    if layer is None:
        return name
    rest = name[len(stack) + len(str(layer)) + (2 if stack else 1):]
    return ".".join(p for p in (stack, "*", rest) if p)


def type_labels(types: Sequence[str]) -> dict[str, str]:
    """Each module type's shortest dotted suffix that no other of ``types`` ends with; the type itself
    where every suffix is one (a root ``fc`` beside ``layers.*.fc``: labels ``fc`` and ``*.fc``)."""
    unique = sorted(set(types))
    labels = {}
    for t in unique:
        parts = t.split(".")
        for k in range(1, len(parts) + 1):
            label = ".".join(parts[-k:])
            if not any(o != t and (o == label or o.endswith("." + label)) for o in unique):
                labels[t] = label
                break
        else:
            labels[t] = t
    return labels


def default_target_modules(model: nn.Module) -> list[str]:
    """The default targets of the model's ``config.model_type``; ValueError asking for them otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"target_modules=None takes the default targets of the model's model_type, and there are "
                         f"none for {model_type!r} (known: {sorted(DEFAULT_TARGET_MODULES)}): pass target_modules "
                         "(module names, a regular expression, or 'all-linear')")
    return list(DEFAULT_TARGET_MODULES[model_type])


def check_no_peft(model: nn.Module) -> None:
    """ValueError if the model holds PEFT adapters (a PeftModel or PEFT tuner layers), which ``apply``
    would freeze and ``save`` / ``export_peft`` would leave out."""
    for name, module in model.named_modules():
        peft_classes = [c.__name__ for c in type(module).__mro__ if c.__module__.split(".")[0] == "peft"]
        if peft_classes:
            where = f"module {name!r} is a {type(module).__name__}" if name else f"the model is a {type(model).__name__}"
            raise ValueError(f"this model holds PEFT adapters ({where}, from peft): sharelora_kernels would freeze "
                             "them and save and export without them. Convert a PEFT LoRA with "
                             "sharelora_kernels.from_peft(model), or apply to the base model.")


def find_modules_to_save(model: nn.Module, config: ShareLoRAConfig) -> list[str]:
    """Full names of the modules ``config.modules_to_save`` picks (None: the task's head, see
    ``TASK_HEADS``), outermost only, in model order; ValueError naming an entry that matches none."""
    entries = config.modules_to_save
    if entries is None:
        heads = TASK_HEADS.get(peft_task_type(model), ())
        entries = [h for h in heads if isinstance(getattr(model, h, None), nn.Module)]
    names = [n for n, _ in model.named_modules() if n]
    for e in entries:
        if not any(matches(n, [e]) for n in names):
            raise ValueError(f"modules_to_save entry {e!r} matches no module of this model")
    chosen: list[str] = []
    for n in names:
        if matches(n, entries) and not any(_inside(n, c) for c in chosen):
            chosen.append(n)
    return chosen


def find_target_modules(model: nn.Module, config: ShareLoRAConfig,
                        wrapped_ok: bool = False) -> tuple[list[ModuleInfo], int]:
    """The target modules ``config`` picks, in model order, and the model's layer count.

    The layer count is the model config's ``num_hidden_layers`` when present, else the largest layer
    index + 1. A picked module that is already wrapped (unless ``wrapped_ok``: another named adapter
    joins it), has a base ``describe_base`` refuses (quantized, custom forward), or a weight tied to
    another module's is refused by name. Modules inside a wrapped one are never picked.
    """
    wrapped = [n for n, m in model.named_modules() if is_wrapped(m)]
    modules = {n: m for n, m in model.named_modules() if not any(n.startswith(f"{w}.") for w in wrapped)}
    saved = find_modules_to_save(model, config)
    spec = config.target_modules if config.target_modules is not None else default_target_modules(model)
    if spec == ALL_LINEAR:
        heads = _output_heads(model)
        picked = [n for n, m in modules.items() if (is_linear_like(m) or is_wrapped(m))
                  and n not in heads]
    else:
        picked = [n for n in modules if n and matches(n, spec)]
        if config.target_modules is not None and not isinstance(spec, str):
            missing = [e for e in spec if not any(matches(n, [e]) for n in modules if n)]
            if missing:
                fused = _fused_experts(model, [missing[0]])
                raise ValueError(f"target_modules entry {missing[0]!r} matches no module of this model" + (
                    f", only fused expert parameters ({fused[0]!r}, ...), which get no adapter" if fused else ""))
    fused = _fused_experts(model, spec)
    if fused:
        warnings.warn(f"{len(fused)} fused expert parameter(s) of this model (e.g. {fused[0]!r}: 3-D, one slice per "
                      "expert) match the targets but are no linear modules: they get no adapter and stay frozen "
                      "(ShareLoRA adapts linear modules)", stacklevel=3)
    picked = [n for n in picked if not any(_inside(n, s) for s in saved)]
    picked = _exclude(picked, modules, config.exclude_modules)
    picked = _keep_layers(picked, config)
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    types = {n: module_type(n, config.layers_pattern) for n in picked}
    labels = type_labels(list(types.values()))
    infos = []
    for name in picked:
        module = modules[name]
        if is_wrapped(module) and not wrapped_ok:
            raise ValueError(f"module {name!r} already has ShareLoRA adapters; apply() runs once per model")
        base = module.layout if is_wrapped(module) else describe_base(module, name)
        tied = [o for o in owners[id(module.weight)] if o not in (f"{name}.weight", f"{name}.base_layer.weight")]
        if tied:
            raise ValueError(f"target module {name!r} has its weight tied to {tied[0]!r}; merging an adapter into it "
                             "would change that module too (remove it from target_modules)")
        layer, stack = layer_position(name, config.layers_pattern)
        infos.append(ModuleInfo(name, layer, labels[types[name]], base.in_features, base.out_features, stack))
    found = max((m.layer for m in infos if m.layer is not None), default=-1) + 1
    configured = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return infos, max(found, configured or 0)


def _fused_experts(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Names of the model's fused MoE expert parameters (3-D, as recent Transformers stores a layer's
    experts) that ``spec`` names, all of them for "all-linear"."""
    fused = [n for n, p in model.named_parameters() if p.dim() == 3 and "expert" in n]
    return fused if spec == ALL_LINEAR else [n for n in fused if matches(n, spec)]


def peft_target_names(model: nn.Module, names: Sequence[str]) -> list[str]:
    """A PEFT ``target_modules`` list that matches exactly ``names`` in ``model``: their last name
    components when those pick no other module, else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    others = [n for n, _ in model.named_modules() if n and n not in set(names)]
    if not any(matches(n, leaves) for n in others):
        return leaves
    return sorted(names)


def _inside(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _output_heads(model: nn.Module) -> set[str]:
    """Names of the output embedding and the task heads: what "all-linear" leaves out."""
    heads = set(TASK_HEADS.get(peft_task_type(model), ()))
    get_output = getattr(model, "get_output_embeddings", None)
    out = get_output() if callable(get_output) else None
    heads.update(n for n, m in model.named_modules() if out is not None and m is out)
    return heads


def _exclude(picked: list[str], modules: dict[str, nn.Module], exclude: str | list[str] | None) -> list[str]:
    if exclude is None:
        return picked
    names = [n for n in modules if n]
    entries = [exclude] if isinstance(exclude, str) else exclude
    for e in entries:
        if not any(matches(n, e if isinstance(exclude, str) else [e]) for n in names):
            raise ValueError(f"exclude_modules entry {e!r} matches no module of this model")
    return [n for n in picked if not matches(n, exclude)]


def _keep_layers(picked: list[str], config: ShareLoRAConfig) -> list[str]:
    wanted = config.layers_to_transform
    if wanted is None:
        return picked
    wanted = [wanted] if isinstance(wanted, int) else wanted
    # a module named in full in target_modules is adapted whatever its layer, as PEFT adapts it
    named = set(config.target_modules) if isinstance(config.target_modules, (list, tuple, set)) else set()
    kept = [n for n in picked if n in named or layer_position(n, config.layers_pattern)[0] in wanted]
    found = {layer_position(n, config.layers_pattern)[0] for n in kept}
    missing = [i for i in wanted if i not in found]
    if missing:
        where = f" (layers_pattern {config.layers_pattern!r})" if config.layers_pattern else ""
        raise ValueError(f"layers_to_transform names layer {missing[0]}, where no target module lies{where}")
    return kept
