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
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import ShareLoRAConfig

PATH_ROLES = {
    "plain": ("A", "B"),
    "slice": ("A", "B"),
    "gate": ("A", "B", "G_id", "G_iu", "G_od", "G_ou"),
    "kron": ("A", "B", "K_A", "K_B"),
}
INIT_KINDS = ("kaiming_uniform", "kaiming_normal", "gaussian", "zeros")


@dataclass(frozen=True)
class ModuleInfo:
    """A target module as the planner sees it."""

    name: str  # full module path, e.g. "model.layers.3.self_attn.q_proj"
    layer: int
    module_type: str  # last path component, e.g. "q_proj"
    in_features: int
    out_features: int


@dataclass
class TensorSpec:
    """One trainable tensor of the plan. ``part``: lora | local | intra | inter."""

    name: str
    shape: tuple[int, ...]
    init: str
    part: str
    module_type: str | None = None  # None for tensors shared across module types
    init_std: float | None = None  # only for init "gaussian"


@dataclass
class PathSpec:
    """One low-rank path of one module: ``scale * B_eff (A_eff x)`` with tensors named by role."""

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

    def parameter_count(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SharePlan":
        tensors = {k: TensorSpec(**{**v, "shape": tuple(v["shape"])}) for k, v in d["tensors"].items()}
        modules = {
            k: ModulePlan(ModuleInfo(**m["info"]), [PathSpec(**p) for p in m["paths"]]) for k, m in d["modules"].items()
        }
        return cls(d["method"], d["num_layers"], tensors, modules)


def layer_position(name: str) -> tuple[int, str | None]:
    """A module's layer, the first integer in its dotted path (none: layer 0), and its stack of
    layers, the path before that integer (None without one): "model.layers.3.mlp" -> (3, "model.layers")."""
    parts = name.split(".")
    at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return (0, None) if at is None else (int(parts[at]), ".".join(parts[:at]))


def expanded_rank(num_layers: int, share_sets: list[list[int]], r: int) -> int:
    """floor(L / U * r) with U = L - sum|S_i| + |S| unique slots (METHOD section 1); singletons ignored."""
    sets = [s for s in share_sets if len(s) > 1]
    unique = num_layers - sum(len(s) for s in sets) + len(sets)
    return (num_layers * r) // unique


# ------------------------------------------------------------------------------------ planning
def build_plan(config: ShareLoRAConfig, modules: list[ModuleInfo], num_layers: int) -> SharePlan:
    """Plan every target module of a model for ``config``; raises ValueError on a misfit."""
    if not modules:
        raise ValueError(f"no target module found; target_modules={config.target_modules}")
    config.check_layers(num_layers)
    b = _Builder(config, num_layers)
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

    # ----------------------------------------------------------------------------- helpers
    def scale(self, r: int) -> float:
        return self.c.alpha / (math.sqrt(r) if self.c.use_rslora else r)

    def tensor(self, name: str, shape: tuple[int, ...], init: str, part: str, module_type: str | None) -> str:
        """Declare a tensor once; a second declaration must agree on the shape."""
        old = self.plan.tensors.get(name)
        if old is not None:
            if old.shape != shape:
                raise ValueError(f"modules sharing tensor {name!r} disagree on its shape: {old.shape} vs {shape}")
            return name
        if init == "a":  # the config's choice of A init
            init = "gaussian" if self.c.init_a == "gaussian" else "kaiming_uniform"
        std = 1.0 / shape[0] if init == "gaussian" else None
        self.plan.tensors[name] = TensorSpec(name, shape, init, part, module_type, std)
        return name

    def add_plain(self, m: ModuleInfo, a_name: str, b_name: str, r: int, part: str, a_type, b_type) -> None:
        a = self.tensor(a_name, (r, m.in_features), "a", part, a_type)
        b = self.tensor(b_name, (m.out_features, r), "zeros", part, b_type)
        self.plan.modules[m.name].paths.append(PathSpec("plain", part, {"A": a, "B": b}, self.scale(r), r))

    # ---------------------------------------------------------------------------- planners
    def lora(self, modules: list[ModuleInfo]) -> None:
        for m in modules:
            self.add_plain(m, f"{m.name}.A", f"{m.name}.B", self.c.r, "lora", m.module_type, m.module_type)

    def similarity(self, modules: list[ModuleInfo]) -> None:
        slot_of = {}
        for s in self.c.share_sets:
            for layer in s:
                slot_of[layer] = f"layers{s[0]}-{s[-1]}" if len(s) > 1 else f"layer{s[0]}"
        r = self.c.r
        if self.c.expand_rank:
            r = expanded_rank(self.plan.num_layers, self.c.share_sets, self.c.r)
        seen: dict[tuple[str, int], str] = {}
        for m in modules:
            other = seen.setdefault((m.module_type, m.layer), m.name)
            if other != m.name:
                raise ValueError(f"method 'similarity' gives one adapter per (module type, layer), and modules {other!r} "
                                 f"and {m.name!r} are both {m.module_type} of layer {m.layer} (encoder-decoder, "
                                 "cross-attention or expert modules): use method 'lora' or 'share_*' for this model")
            slot = f"{m.module_type}.{slot_of.get(m.layer, f'layer{m.layer}')}"
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
        if c.local_r:
            for m in modules:
                self.add_plain(m, f"{m.name}.local.A", f"{m.name}.local.B", c.local_r, "local", m.module_type, m.module_type)
        if c.intra_r:
            _check_one_layer_stack(modules)
        groups = {"intra": {}, "inter": {"inter": modules}}
        for m in modules:
            groups["intra"].setdefault(f"layer{m.layer}.intra", []).append(m)
        for part, r in (("intra", c.intra_r), ("inter", c.inter_r)):
            if r == 0:
                continue
            for prefix, members in groups[part].items():
                {"slice": self.slice_group, "gate": self.gate_group, "kron": self.kron_group}[c.shape_transform](
                    prefix, members, part, r)

    def slice_group(self, prefix: str, members: list[ModuleInfo], part: str, r: int) -> None:
        k_max = max(m.in_features for m in members)
        n_max = max(m.out_features for m in members)
        a = self.tensor(f"{prefix}.A", (r, k_max), "a", part, None)
        b = self.tensor(f"{prefix}.B", (n_max, r), "zeros", part, None)
        for m in members:
            path = PathSpec("slice", part, {"A": a, "B": b}, self.scale(r), r,
                            _offset(self.c.slice_policy, k_max, m.in_features),
                            _offset(self.c.slice_policy, n_max, m.out_features))
            self.plan.modules[m.name].paths.append(path)

    def gate_group(self, prefix: str, members: list[ModuleInfo], part: str, r: int) -> None:
        (gm, gn), g = self.c.gate_dims, self.c.gate_rank
        a = self.tensor(f"{prefix}.A", (r, gm), "a", part, None)
        b = self.tensor(f"{prefix}.B", (gn, r), "zeros", part, None)
        for m in members:
            t = m.module_type
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
        a = self.tensor(f"{prefix}.A", (r, d), "a", part, None)
        b = self.tensor(f"{prefix}.B", (d, r), "zeros", part, None)
        for m in members:
            t = m.module_type
            k_a = self.tensor(f"{m.name}.{part}.K_A", (1, m.in_features // d), "kaiming_normal", part, t)
            k_b = self.tensor(f"{m.name}.{part}.K_B", (m.out_features // d, 1), "kaiming_normal", part, t)
            path = PathSpec("kron", part, {"A": a, "B": b, "K_A": k_a, "K_B": k_b}, self.scale(r), r)
            self.plan.modules[m.name].paths.append(path)


def _check_one_layer_stack(modules: list[ModuleInfo]) -> None:
    """Intra-layer adapters are keyed by layer number: refuse several stacks of numbered layers
    (an encoder and a decoder), whose layer n would share one intra adapter."""
    stacks: dict[str, str] = {}
    for m in modules:
        stack = layer_position(m.name)[1]
        if stack is not None:
            stacks.setdefault(stack, m.name)
    if len(stacks) > 1:
        first, second = list(stacks.values())[:2]
        raise ValueError(f"Bi-Share's intra-layer adapters are keyed by layer number, and {first!r} and {second!r} "
                         f"lie in different stacks of layers ({sorted(stacks)}): set intra_r=0 for this model")


def _offset(policy: str, full: int, size: int) -> int:
    return {"top_left": 0, "center": (full - size) // 2, "bottom_right": full - size}[policy]
