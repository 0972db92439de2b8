"""ShareLoRAConfig: which sharing method, which modules, which ranks (the README's "The methods").

The config is model-independent; checks that need the model (layer indices in range, Kronecker
dimension dividing a module's dims) run in the planner, which knows the module shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

METHODS = ("lora", "similarity", "share_a", "share_b", "share_ab", "bishare")
SHAPE_TRANSFORMS = ("slice", "gate", "kron")
SLICE_POLICIES = ("top_left", "center", "bottom_right")
INITS = ("kaiming", "gaussian")

# Paper defaults for Bi-Share LoRA (the README's "The methods"): (local_r, intra_r, inter_r) per transform.
BISHARE_DEFAULT_RANKS = {"slice": (2, 4, 32), "gate": (2, 8, 16), "kron": (2, 4, 16)}
BISHARE_RANKS = ("local_r", "intra_r", "inter_r")
# Fields that only Bi-Share reads, with their defaults: another method refuses other values. (kron_dim
# and gate_dims are dims of the model, which the command line fits once for every method's config.)
BISHARE_ONLY = {"shape_transform": "slice", "slice_policy": "center", "gate_rank": 1}

ALL_LINEAR = "all-linear"
# Path kinds and the tensor roles each reads, in order (shapes: plan.py's docstring). Planners and kernels share it.
PATH_ROLES = {
    "plain": ("A", "B"),
    "slice": ("A", "B"),
    "gate": ("A", "B", "G_id", "G_iu", "G_od", "G_ou"),
    "kron": ("A", "B", "K_A", "K_B"),
}


@dataclass
class ShareLoRAConfig:
    """Everything that decides who owns which low-rank parameters.

    method: "lora" (plain, per module), "similarity" (layers in one of ``share_sets`` share A and B
        per module type), "share_a" / "share_b" / "share_ab" (one A / B / both per module type for
        the whole model), "bishare" (local + intra-layer + inter-layer paths).
    r, alpha: rank and scale numerator of every plain path (scale alpha / r, or alpha / sqrt(r)
        with ``use_rslora``). Bi-Share paths use their own ranks and the same alpha.
    dropout: dropout probability on the adapter input (as PEFT).
    target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: which
        modules get adapters and which train in full, with PEFT's meanings (``targeting.py``): a
        list of names (a name matches a module's full name or its dotted suffix), a regular
        expression full-matched against the full name, "all-linear" (target_modules only), or None
        (target_modules: the model type's default; modules_to_save: the task's head, e.g. the
        classifier of a sequence-classification model).
    rank_pattern, alpha_pattern: for "lora", per-module rank and alpha (PEFT's: a key matches a
        module whose name ends with it, as a regex after a dot).
    share_sets: for "similarity", lists of layer indices sharing one A/B slot; others are alone.
    expand_rank: for "similarity", raise r to floor(L / U * r) per module type, L and U counted over
        the layers that type is adapted in (the README's "The methods"); modules outside the layers keep r.
    local_r, intra_r, inter_r: Bi-Share ranks; None (kept None) takes the paper default of the
        transform in use (``bishare_ranks()``), also after ``shape_transform`` is changed.
    shape_transform, slice_policy, gate_rank, gate_dims, kron_dim: Bi-Share shape transforms (another
        method refuses a Bi-Share rank, transform, policy or gate rank other than the default).
    init_a: "kaiming" (PEFT's kaiming-uniform, a=sqrt(5)) or "gaussian" (normal, std 1/r).
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    share_sets: list[list[int]] = field(default_factory=list)
    expand_rank: bool = False
    local_r: int | None = None
    intra_r: int | None = None
    inter_r: int | None = None
    shape_transform: str = "slice"
    slice_policy: str = "center"
    gate_rank: int = 1
    gate_dims: tuple[int, int] = (1024, 1024)
    kron_dim: int = 256
    init_a: str = "kaiming"

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        if isinstance(self.layers_to_transform, (tuple, range)):
            self.layers_to_transform = list(self.layers_to_transform)
        elif getattr(self.layers_to_transform, "ndim", 0) == 1:  # a numpy array or a tensor of layer indices
            self.layers_to_transform = self.layers_to_transform.tolist()
        self.validate()

    def bishare_ranks(self) -> tuple[int, int, int]:
        """(local_r, intra_r, inter_r), a None rank the paper default of ``shape_transform``."""
        defaults = BISHARE_DEFAULT_RANKS[self.shape_transform]
        return tuple(default if getattr(self, name) is None else getattr(self, name)
                     for name, default in zip(BISHARE_RANKS, defaults))

    # ----------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field; numbers of other types (numpy's) that are
        valid become Python ints and floats, each share set a sorted list, gate_dims a tuple (so a
        field assigned after the config was made is normalized as the constructor's arguments are)."""
        _choice("method", self.method, METHODS)
        _choice("shape_transform", self.shape_transform, SHAPE_TRANSFORMS)
        _choice("slice_policy", self.slice_policy, SLICE_POLICIES)
        _choice("init_a", self.init_a, INITS)
        self.r = check_int("r", self.r, minimum=1)
        for name in ("use_rslora", "expand_rank"):
            check_bool(name, getattr(self, name))
        for name in BISHARE_RANKS:
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), minimum=0))
        self.gate_rank = check_int("gate_rank", self.gate_rank, minimum=1)
        self.kron_dim = check_int("kron_dim", self.kron_dim, minimum=1)
        if not isinstance(self.gate_dims, (list, tuple)) or len(self.gate_dims) != 2:
            raise ValueError(f"gate_dims must be a pair (m, n), got {self.gate_dims!r}")
        self.gate_dims = tuple(check_int("gate_dims", d, minimum=1) for d in self.gate_dims)
        self.alpha = check_positive("alpha", self.alpha)
        self.dropout = check_dropout(self.dropout)
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        _check_names("layers_pattern", self.layers_pattern)
        if self.modules_to_save is not None and not (isinstance(self.modules_to_save, list) and all(
                isinstance(m, str) and m for m in self.modules_to_save)):
            raise ValueError(f"modules_to_save must be a list of module names or None, got {self.modules_to_save!r}")
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, list) and not layers:
                raise ValueError("layers_to_transform must name at least one layer (or be None)")
            self.layers_to_transform = ([check_int("layers_to_transform", i, minimum=0) for i in layers]
                                        if isinstance(layers, list) else check_int("layers_to_transform", layers, minimum=0))
            if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
                raise ValueError("layers_to_transform cannot be used with a regular-expression target_modules "
                                 "(write the layers into the expression)")
        elif self.layers_pattern is not None:
            raise ValueError("layers_pattern only applies together with layers_to_transform")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict) or not all(isinstance(k, str) and k for k in pattern):
                raise ValueError(f"{name} must map module names to values, got {pattern!r}")
            for key in pattern:  # PEFT's keys are regular expressions, matched against the module names
                _check_regex(f"{name} key", key)
            if name == "rank_pattern":
                pattern = {k: check_int(f"rank_pattern[{k!r}]", v, minimum=1) for k, v in pattern.items()}
            else:
                pattern = {k: check_positive(f"alpha_pattern[{k!r}]", v) for k, v in pattern.items()}
            setattr(self, name, pattern)
            if pattern and self.method != "lora":
                raise ValueError(f"{name} only applies to method='lora', not {self.method!r}")
        if self.method == "bishare" and sum(self.bishare_ranks()) == 0:
            raise ValueError("bishare needs at least one of local_r, intra_r, inter_r > 0")
        if self.method != "bishare":
            for name, default in BISHARE_ONLY.items():
                if getattr(self, name) != default:
                    raise ValueError(f"{name} only applies to method='bishare', not {self.method!r}")
            # configs saved by earlier versions hold the slice ranks filled in for every method
            for name, default in zip(BISHARE_RANKS, BISHARE_DEFAULT_RANKS["slice"]):
                if getattr(self, name) not in (None, default):
                    raise ValueError(f"{name} only applies to method='bishare', not {self.method!r}")
        self.share_sets = check_share_sets(self.share_sets)
        if self.share_sets and self.method != "similarity":
            raise ValueError(f"share_sets only applies to method='similarity', not {self.method!r}")
        if self.expand_rank and self.method != "similarity":
            raise ValueError(f"expand_rank only applies to method='similarity', not {self.method!r}")

    def check_layers(self, num_layers: int) -> None:
        """Raise ValueError if a share set names a layer the model does not have."""
        check_share_sets(self.share_sets, num_layers)

    # ------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gate_dims"] = list(self.gate_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShareLoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys are {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ShareLoRAConfig":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"a config JSON must hold an object, got {type(d).__name__}")
        return cls.from_dict(d)


def _check_names(name: str, value: Any) -> None:
    """ValueError unless ``value`` is None, a valid regular expression, or a non-empty list of names."""
    if value is None:
        return
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string")
        _check_regex(name, value)
        return
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{name} must be a non-empty list of module names, a regular expression or None, got {value!r}")
    if name == "layers_pattern":  # each entry is a regular expression (PEFT's layers_pattern)
        for entry in value:
            _check_regex(name, entry)


def _check_regex(name: str, value: str) -> None:
    """ValueError naming field ``name`` when ``value`` is not a valid regular expression."""
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"{name} {value!r} is not a valid regular expression ({err})") from None


def check_share_sets(share_sets: Any, num_layers: int | None = None, name: str = "share_sets") -> list[list[int]]:
    """``share_sets`` as sorted lists of Python ints; ValueError naming the first set that is empty or not
    a list of layer indices, holds a layer outside [0, num_layers) (None: any layer >= 0) or twice, or shares
    a layer with an earlier set. The one check of share sets: the config's, ``plan.expanded_rank``'s
    and the heatmap's."""
    if not isinstance(share_sets, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in share_sets):
        raise ValueError(f"{name} must be a list of lists of layer indices, got {share_sets!r}")
    seen: dict[int, int] = {}
    for k, s in enumerate(share_sets):
        if not s:
            raise ValueError(f"{name}[{k}] is empty: a share set names the layers that share (leave it out)")
        for layer in s:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise ValueError(f"{name}[{k}] {list(s)} holds {layer!r}, not a layer index")
            if layer < 0 or (num_layers is not None and layer >= num_layers):
                bound = "a negative index" if num_layers is None else f"outside [0, {num_layers})"
                raise ValueError(f"{name}[{k}] {list(s)} holds layer {layer}, {bound}")
            if layer in seen:
                where = "twice" if seen[layer] == k else f"and so does {name}[{seen[layer]}]"
                raise ValueError(f"{name}[{k}] {list(s)} holds layer {layer} {where}: share sets must not overlap")
            seen[int(layer)] = k
    return [sorted(int(i) for i in s) for s in share_sets]


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _python_number(value: numbers.Real) -> int | float:
    """``value`` (numpy's numbers too) as a Python int (an integral value) or float."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_positive(name: str, value: Any) -> int | float:
    """``value`` as a Python number; ValueError unless it is a finite real number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return _python_number(value)


def check_dropout(value: Any) -> float:
    """``value`` as a Python float; ValueError unless it is a dropout probability in [0, 1) (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"dropout must be in [0, 1), got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int; ValueError unless it is an integer >= minimum (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> None:
    """ValueError unless ``value`` is True or False (a string such as "no" is not)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
