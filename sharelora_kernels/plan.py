"""Share plans: who owns which low-rank tensor, and how each target module sees it.

A planner turns a config and the model's target modules into a ``SharePlan``: the trainable tensors
to create (each exactly once) and, per module, a list of ``PathSpec``s. Compute code (reference,
Triton ops, export) only ever reads path specs; a new sharing method is a new planner.

Path kinds and the tensor roles they read (K = in_features, N = out_features of the module):

    plain  A (r, K)       B (N, r)
    slice  A (r, K_max)   B (N_max, r)   seen as A[:, k_offset:k_offset+K], B[n_offset:n_offset+N]
    gate   A (r, m)       B (n, r)       G_id (g, K)  G_iu (m, g)  G_od (g, n)  G_ou (N, g)
    kron   A (r, d)       B (d, r)       K_A (1, K/d) K_B (N/d, 1)
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import METHODS, PATH_ROLES, ShareLoRAConfig, check_int, check_share_sets
from .targeting import ModuleInfo, layer_position

INIT_KINDS = ("kaiming_uniform", "kaiming_normal", "gaussian", "zeros")
HAND_WRAPPED = "hand_wrapped"  # the method of a plan read off hand-wrapped layers


@dataclass
class TensorSpec:
    """One trainable tensor of the plan. ``part``: lora | local | intra | inter."""

    name: str
    shape: tuple[int, ...]
    init: str
    part: str
    module_type: str | None = None  # None for tensors shared across module types
    init_std: float | None = None  # only for init "gaussian"


@dataclass(frozen=True)
class PathSpec:
    """One low-rank path of one module: ``scale * B_eff (A_eff x)`` with tensors named by role.
    Frozen: a layer's call plan holds what it read from a spec, so a path changes by a new spec
    (``dataclasses.replace``) assigned to its module, which the plan notices."""

    kind: str
    part: str
    tensors: dict[str, str]
    scale: float
    rank: int  # rank of the path's update (g for a gate path)
    k_offset: int = 0
    n_offset: int = 0


@dataclass
class ModulePlan:
    info: ModuleInfo
    paths: list[PathSpec] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """Rank of this module's update as one plain LoRA (what export writes)."""
        return sum(p.rank for p in self.paths)


@dataclass
class SharePlan:
    method: str
    num_layers: int
    tensors: dict[str, TensorSpec]
    modules: dict[str, ModulePlan]
    modules_to_save: list[str] = field(default_factory=list)  # full names of the modules trained in full

    def parameter_count(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def layer_slots(self) -> dict[str, tuple[int, int]]:
        """Per module type, over its modules in numbered layers: (distinct adapters, largest rank), where
        an adapter is a module's tensors as a whole (modules with the same tensors share one)."""
        adapters: dict[str, set] = {}
        ranks: dict[str, int] = {}
        for m in self.modules.values():
            if m.info.layer is not None:
                t = m.info.module_type
                adapters.setdefault(t, set()).add(tuple(sorted(n for p in m.paths for n in p.tensors.values())))
                ranks[t] = max(ranks.get(t, 0), m.rank)
        return {t: (len(a), ranks[t]) for t, a in adapters.items()}

    def breakdown(self) -> dict[str, int]:
        """Trainable parameters per part ("part:lora", ...) and per module type ("type:q_proj", ...)."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            n = math.prod(t.shape)
            out[f"part:{t.part}"] = out.get(f"part:{t.part}", 0) + n
            key = f"type:{t.module_type or 'shared'}"
            out[key] = out.get(key, 0) + n
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_layers": self.num_layers,
            "tensors": {k: asdict(v) for k, v in self.tensors.items()},
            "modules": {k: {"info": asdict(m.info), "paths": [asdict(p) for p in m.paths]} for k, m in self.modules.items()},
            "modules_to_save": list(self.modules_to_save),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SharePlan":
        """The plan ``to_dict`` wrote. ValueError naming the field if it is not what ``to_dict`` writes
        (a hand-edited plan): a list or value where an object goes, a missing or unknown key."""
        def obj(value, field: str) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise ValueError(f"plan field {field!r} must be a JSON object, got {type(value).__name__}")
            return value

        try:
            d = obj(d, "plan")
            tensors = {k: TensorSpec(**{**obj(v, f"tensors.{k}"), "shape": tuple(v["shape"])})
                       for k, v in obj(d["tensors"], "tensors").items()}
            modules = {k: ModulePlan(_module_info(obj(obj(m, f"modules.{k}")["info"], f"modules.{k}.info")),
                                     [PathSpec(**obj(p, f"modules.{k}.paths")) for p in m["paths"]])
                       for k, m in obj(d["modules"], "modules").items()}
            plan = cls(d["method"], d["num_layers"], tensors, modules, list(d.get("modules_to_save", [])))
            unknown = sorted(set(d) - {"method", "num_layers", "tensors", "modules", "modules_to_save"})
            if unknown:
                raise ValueError(f"plan has unknown field(s) {unknown}")
        except KeyError as e:
            raise ValueError(f"plan lacks field {e.args[0]!r}") from e
        except TypeError as e:  # an unknown key (a keyword the spec does not take), a shape that is no list
            raise ValueError(f"plan has a malformed entry: {e}") from e
        plan._check_values()
        return plan

    def _check_values(self) -> None:
        """ValueError naming the first value ``to_dict`` would not write: an unknown method or path
        kind, a path naming a tensor the plan lacks or a tensor its kind does not read, a shape or
        rank that is not positive integers, a scale that is not a finite number."""
        if self.method not in (*METHODS, HAND_WRAPPED):
            raise ValueError(f"plan method {self.method!r} is not one of {[*METHODS, HAND_WRAPPED]}")
        check_int("plan num_layers", self.num_layers, minimum=0)
        for name, t in self.tensors.items():
            for n in t.shape:
                check_int(f"plan tensor {name!r} shape", n, minimum=1)
        for module, m in self.modules.items():
            for p in m.paths:
                where = f"plan module {module!r}: a {p.kind!r} path"
                if p.kind not in PATH_ROLES or sorted(p.tensors) != sorted(PATH_ROLES[p.kind]):
                    raise ValueError(f"{where} naming roles {sorted(p.tensors)} (kinds and roles: {PATH_ROLES})")
                missing = [t for t in p.tensors.values() if t not in self.tensors]
                if missing:
                    raise ValueError(f"{where} reads tensor {missing[0]!r}, which the plan lacks")
                if isinstance(p.scale, bool) or not isinstance(p.scale, numbers.Real) or not math.isfinite(p.scale):
                    raise ValueError(f"{where} has scale {p.scale!r}, not a finite number")
                check_int(f"{where}'s rank", p.rank, minimum=1)
                for offset in (p.k_offset, p.n_offset):
                    check_int(f"{where}'s offset", offset, minimum=0)


def _module_info(d: dict[str, Any]) -> ModuleInfo:
    """A stored ModuleInfo; plans saved before ``stack`` existed get it from the name."""
    if "stack" not in d:
        d = {**d, "stack": layer_position(d["name"])[1]}
    return ModuleInfo(**d)


def expanded_rank(num_layers: int, share_sets: list[list[int]], r: int, layers: list[int] | None = None) -> int:
    """floor(L / U * r) (the README's "The methods") over the adapted layers ``layers`` (default: all of [0, L)):
    L = len(layers), U = L - sum|S_i| + |S| unique slots, with each set cut to the adapted layers (a set
    left with one adapted layer saves nothing). U slots of rank floor(L / U * r) hold at most L * r
    ranks, so the count stays at or under LoRA's over those layers. ValueError for num_layers or r
    below 1, no adapted layer, or sets or layers that are not distinct layer indices in [0, num_layers)."""
    num_layers, r = check_int("num_layers", num_layers, minimum=1), check_int("r", r, minimum=1)
    share_sets = check_share_sets(share_sets, num_layers)
    adapted = list(range(num_layers)) if layers is None else list(layers)
    if (not adapted or len(set(adapted)) != len(adapted)
            or not all(isinstance(layer, numbers.Integral) and not isinstance(layer, bool) and 0 <= layer < num_layers
                       for layer in adapted)):
        raise ValueError(f"layers must be distinct layer indices in [0, {num_layers}), at least one, got {layers}")
    adapted = set(adapted)
    sizes = [n for n in (len(adapted.intersection(s)) for s in share_sets) if n > 1]
    unique = len(adapted) - sum(sizes) + len(sizes)
    return (len(adapted) * r) // unique


# ------------------------------------------------------------------------------------ planning
def build_plan(config: ShareLoRAConfig, modules: list[ModuleInfo], num_layers: int,
               modules_to_save: list[str] | None = None) -> SharePlan:
    """Plan every target module of a model for ``config``; raises ValueError on a misfit.
    ``modules_to_save``: full names of the modules that train in full (recorded in the plan)."""
    if not modules:
        raise ValueError(f"no target module found; target_modules={config.target_modules}")
    config.check_layers(num_layers)
    b = _Builder(config, num_layers)
    b.plan.modules_to_save = list(modules_to_save or [])
    planner = {"lora": b.lora, "similarity": b.similarity, "share_a": b.share, "share_b": b.share,
               "share_ab": b.share, "bishare": b.bishare}[config.method]
    for m in modules:
        b.plan.modules[m.name] = ModulePlan(m)
    planner(modules)
    return b.plan


class _Builder:
    def __init__(self, config: ShareLoRAConfig, num_layers: int):
        self.c = config
        self.plan = SharePlan(config.method, num_layers, {}, {})
        self.first_user: dict[str, str] = {}
        self.user: str | None = None  # the module being planned (named in errors)

    # ----------------------------------------------------------------------------- helpers
    def scale(self, r: int, alpha: float | None = None) -> float:
        alpha = self.c.alpha if alpha is None else alpha
        return alpha / (math.sqrt(r) if self.c.use_rslora else r)

    def tensor(self, name: str, shape: tuple[int, ...], init: str, part: str, module_type: str | None) -> str:
        """Declare a tensor once; a second declaration must agree on the shape."""
        old = self.plan.tensors.get(name)
        if old is not None:
            if old.shape != shape:
                raise ValueError(f"modules {self.first_user[name]!r} and {self.user!r} share tensor {name!r} but "
                                 f"disagree on its shape: {old.shape} vs {shape} (use method 'lora' for them)")
            return name
        self.first_user[name] = self.user
        if init == "a":  # the config's choice of A init
            init = "gaussian" if self.c.init_a == "gaussian" else "kaiming_uniform"
        std = 1.0 / shape[0] if init == "gaussian" else None
        self.plan.tensors[name] = TensorSpec(name, shape, init, part, module_type, std)
        return name

    def add_plain(self, m: ModuleInfo, a_name: str, b_name: str, r: int, part: str, a_type, b_type,
                  alpha: float | None = None) -> None:
        self.user = m.name
        a = self.tensor(a_name, (r, m.in_features), "a", part, a_type)
        b = self.tensor(b_name, (m.out_features, r), "zeros", part, b_type)
        self.plan.modules[m.name].paths.append(PathSpec("plain", part, {"A": a, "B": b}, self.scale(r, alpha), r))

    # ---------------------------------------------------------------------------- planners
    def lora(self, modules: list[ModuleInfo]) -> None:
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self.c, name):
                if not any(pattern_matches(key, m.name) for m in modules):
                    raise ValueError(f"{name} key {key!r} matches no target module (a key matches a target module "
                                     "whose full name ends with it, after a dot)")
        for m in modules:
            r = pattern_value(self.c.rank_pattern, m.name, self.c.r)
            alpha = pattern_value(self.c.alpha_pattern, m.name, self.c.alpha)
            self.add_plain(m, f"{m.name}.A", f"{m.name}.B", r, "lora", m.module_type, m.module_type, alpha)

    def similarity(self, modules: list[ModuleInfo]) -> None:
        _check_one_layer_stack(modules, "method 'similarity' shares adapters between the layers of each share set, "
                                        "whose indices name layers of one stack", "use method 'lora' or 'share_*', or "
                                        "target the modules of one stack")
        adapted = {m.layer for m in modules if m.layer is not None}
        slot_of = {}
        for k, s in enumerate(self.c.share_sets):
            _check_set_is_adapted(k, s, adapted, self.c.layers_to_transform)
            for layer in s:
                slot_of[layer] = f"layers{s[0]}-{s[-1]}" if len(s) > 1 else f"layer{s[0]}"
        rank = {}  # per module type: expand_rank counts the layers where that type is adapted
        if self.c.expand_rank:
            layers: dict[str, list[int]] = {}
            for m in modules:
                if m.layer is not None:
                    layers.setdefault(m.module_type, []).append(m.layer)
            rank = {t: expanded_rank(self.plan.num_layers, self.c.share_sets, self.c.r, ls) for t, ls in layers.items()}
        for m in modules:  # a module outside the layers (no index) has a slot of its own and keeps r
            slot = m.module_type if m.layer is None else f"{m.module_type}.{slot_of.get(m.layer, f'layer{m.layer}')}"
            r = self.c.r if m.layer is None else rank.get(m.module_type, self.c.r)
            self.add_plain(m, f"{slot}.A", f"{slot}.B", r, "lora", m.module_type, m.module_type)

    def share(self, modules: list[ModuleInfo]) -> None:
        share_a = self.c.method in ("share_a", "share_ab")
        share_b = self.c.method in ("share_b", "share_ab")
        for m in modules:
            a = f"{m.module_type}.A" if share_a else f"{m.name}.A"
            b = f"{m.module_type}.B" if share_b else f"{m.name}.B"
            self.add_plain(m, a, b, self.c.r, "lora", m.module_type, m.module_type)

    def bishare(self, modules: list[ModuleInfo]) -> None:
        c = self.c
        local_r, intra_r, inter_r = c.bishare_ranks()
        if local_r:
            for m in modules:
                self.add_plain(m, f"{m.name}.local.A", f"{m.name}.local.B", local_r, "local", m.module_type, m.module_type)
        if intra_r:
            _check_one_layer_stack(modules, "Bi-Share's intra-layer adapters are keyed by layer number", "set intra_r=0")
        groups = {"intra": {}, "inter": {"inter": modules}}
        for m in modules:  # a module outside the layers has an intra adapter of its own
            groups["intra"].setdefault(f"{m.name}.intra" if m.layer is None else f"layer{m.layer}.intra", []).append(m)
        for part, r in (("intra", intra_r), ("inter", inter_r)):
            if r == 0:
                continue
            for prefix, members in groups[part].items():
                {"slice": self.slice_group, "gate": self.gate_group, "kron": self.kron_group}[c.shape_transform](
                    prefix, members, part, r)
            if c.shape_transform == "kron" and r > c.kron_dim:  # once the paths are known to fit (an error first)
                warnings.warn(f"Bi-Share's {part}-layer Kronecker paths have rank {part}_r={r} above "
                              f"kron_dim={c.kron_dim}: a Kronecker path's rank is at most kron_dim, so {r - c.kron_dim} "
                              f"of the ranks its A ({r} x {c.kron_dim}) and B train add nothing; set kron_dim >= {r} "
                              f"where it divides the modules' dims, or {part}_r <= {c.kron_dim}", UserWarning, stacklevel=2)

    def slice_group(self, prefix: str, members: list[ModuleInfo], part: str, r: int) -> None:
        self.user = members[0].name
        k_max = max(m.in_features for m in members)
        n_max = max(m.out_features for m in members)
        a = self.tensor(f"{prefix}.A", (r, k_max), "a", part, None)
        b = self.tensor(f"{prefix}.B", (n_max, r), "zeros", part, None)
        for m in members:
            self.user = m.name
            path = PathSpec("slice", part, {"A": a, "B": b}, self.scale(r), r,
                            _offset(self.c.slice_policy, k_max, m.in_features),
                            _offset(self.c.slice_policy, n_max, m.out_features))
            self.plan.modules[m.name].paths.append(path)

    def gate_group(self, prefix: str, members: list[ModuleInfo], part: str, r: int) -> None:
        (gm, gn), g = self.c.gate_dims, self.c.gate_rank
        self.user = members[0].name
        a = self.tensor(f"{prefix}.A", (r, gm), "a", part, None)
        b = self.tensor(f"{prefix}.B", (gn, r), "zeros", part, None)
        for m in members:
            t = m.module_type
            self.user = m.name
            names = {"A": a, "B": b}
            for role, shape in (("G_id", (g, m.in_features)), ("G_iu", (gm, g)), ("G_od", (g, gn)), ("G_ou", (m.out_features, g))):
                names[role] = self.tensor(f"{m.name}.{part}.{role}", shape, "kaiming_uniform", part, t)
            self.plan.modules[m.name].paths.append(PathSpec("gate", part, names, self.scale(r), g))

    def kron_group(self, prefix: str, members: list[ModuleInfo], part: str, r: int) -> None:
        d = self.c.kron_dim
        for m in members:
            for dim_name, dim in (("in_features", m.in_features), ("out_features", m.out_features)):
                if dim % d:
                    raise ValueError(f"kron_dim={d} does not divide {dim_name}={dim} of module {m.name!r}")
        self.user = members[0].name
        a = self.tensor(f"{prefix}.A", (r, d), "a", part, None)
        b = self.tensor(f"{prefix}.B", (d, r), "zeros", part, None)
        for m in members:
            t = m.module_type
            self.user = m.name
            k_a = self.tensor(f"{m.name}.{part}.K_A", (1, m.in_features // d), "kaiming_normal", part, t)
            k_b = self.tensor(f"{m.name}.{part}.K_B", (m.out_features // d, 1), "kaiming_normal", part, t)
            path = PathSpec("kron", part, {"A": a, "B": b, "K_A": k_a, "K_B": k_b}, self.scale(r), r)
            self.plan.modules[m.name].paths.append(path)


def _check_set_is_adapted(k: int, share_set: list[int], adapted: set[int], layers_to_transform) -> None:
    """ValueError if no layer of share set ``k`` holds a target module (it names the wrong layers); a
    warning if one does (that set shares nothing). A set may name unadapted layers besides: share
    sets are found over every layer of the model, ``layers_to_transform`` then picks some."""
    held = [layer for layer in share_set if layer in adapted]
    if len(held) > 1:
        return
    where = f" (layers_to_transform {layers_to_transform})" if layers_to_transform is not None else ""
    message = f"the target modules lie in layers {sorted(adapted)}{where}"
    if not held:
        raise ValueError(f"share_sets[{k}] {share_set} names no layer that holds a target module: {message}")
    warnings.warn(f"share_sets[{k}] {share_set} shares nothing: only its layer {held[0]} holds target modules "
                  f"({message})", stacklevel=4)


def _check_one_layer_stack(modules: list[ModuleInfo], why: str, fix: str) -> None:
    """Refuse target modules in several stacks of numbered layers (an encoder and a decoder): a plan
    keyed by layer number would not know which stack's layer n is meant."""
    stacks: dict[str, str] = {}
    for m in modules:
        if m.stack is not None:
            stacks.setdefault(m.stack, m.name)
    if len(stacks) > 1:
        first, second = list(stacks.values())[:2]
        raise ValueError(f"{why}, and target modules {first!r} and {second!r} lie in different stacks of layers "
                         f"({sorted(stacks)}): {fix} for this model")


def pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that ends the module name after a dot."""
    for key, value in pattern.items():
        if pattern_matches(key, name):
            return value
    return default


def pattern_matches(key: str, name: str) -> bool:
    """Whether a rank_pattern / alpha_pattern ``key`` picks module ``name`` (PEFT's rule)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _offset(policy: str, full: int, size: int) -> int:
    return {"top_left": 0, "center": (full - size) // 2, "bottom_right": full - size}[policy]
