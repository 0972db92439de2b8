"""Input groups: the SharedLoRALinear modules that read the same x compute together, opt-in.

``enable_input_groups(model)`` finds, in known architectures (LLaMA / Mistral / Qwen2), the modules
that share an input: ``self_attn.{q,k,v}_proj`` and ``mlp.{gate,up}_proj``, and gives each group an
``InputGroup`` coordinator (``SharedLoRALinear.input_group``), which each member's forward calls:

  * the first member called with x runs ``ops.grouped_lora_linear`` for the whole group, keeps the
    siblings' outputs keyed by the identity of x (holding x, so the identity cannot be reused) and
    returns its own;
  * a sibling called with that same x pops its output (the cache entry is dropped once consumed);
  * a sibling called with any other x, or in another grad mode, or after anything its output was
    computed from changed (x or an adapter tensor written in place, though not through ``.data``,
    which keeps no version; a tensor replaced, moved, frozen or unfrozen, an adapter switched,
    disabled, merged, a train / eval switch: ``_state``), or after a backward through the group's
    one autograd node (the kernels': it freed what the pending outputs' backward needs), drops its
    stale entry and runs its own op; a member with no entry starts a new group run (replacing every
    pending entry), so at most one pending output per member is ever held, and none once the group's
    siblings ran. A module not among the members (a copy of one) runs alone.

An inference tensor (made under ``torch.inference_mode()``) keeps no version, so an output computed
from one could not be told stale: with such an x (or adapter tensor) each member runs its own op.

Members run alone when the group cannot run together: merged, path-less or quantized members
(a base that computes itself has no dense weight to share), different dropout or training mode,
or a member whose forward raises a shape/dtype error (it reports it);
and when the group's op would run them one by one anyway (auto; compose without a dropout mask
to share), each runs its own call plan directly, with no coordination.
Autograd needs nothing special: the cached outputs are ordinary outputs of the grouped op.
"""
from __future__ import annotations

import operator
import weakref
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .layer import SharedLoRALinear
from .ops import call_plan
from .ops.autocast import autocast_enabled

KNOWN_ARCHITECTURES = ("llama", "mistral", "qwen2")  # config.model_type
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings that read their parent's one input
_version = operator.attrgetter("_version")


def _dropping_pending(group: "InputGroup"):
    """A pre-hook of the group's one autograd node: its backward (through any member's output) frees
    what the siblings' pending outputs need, so it drops them; a later run's entries stay (weakly
    held: the node does not keep the group alive)."""
    ref, pending = weakref.ref(group), group._pending

    def drop(grad_outputs):
        group = ref()
        if group is not None and group._pending is pending:
            group._pending = {}
    return drop


def _unversioned(source: call_plan.Source) -> bool:
    """Whether the source's tensor is an inference tensor (it has no version to tell in-place writes by)."""
    return isinstance(source.tensor, Tensor) and source.tensor.is_inference()


class InputGroup:
    """Coordinator of the modules of one group (same in_features, dtype and device)."""

    def __init__(self, members: Sequence[SharedLoRALinear]):
        self.members = list(members)
        # member index -> (x, grad mode, output, the plan of the run (None when traced), ``_state`` then)
        self._pending: dict[int, tuple[Tensor, bool, Tensor, call_plan.CallPlan | None, tuple]] = {}
        self._plan: call_plan.CallPlan | None = None  # the group's call plan of the last run (built once, like a layer's)
        self._plans: dict[tuple, call_plan.CallPlan] = {}  # environment -> plan, a few kept

    def forward(self, module: SharedLoRALinear, x: Tensor) -> Tensor:
        """The output of member ``module`` for x: (..., in_features) -> (..., out_features)."""
        index = next((i for i, m in enumerate(self.members) if m is module), None)
        if index is None or (not torch.compiler.is_compiling() and (x.is_inference() or self._runs_alone(module, x))):
            return module.forward_alone(x)  # its call plan: what the group's op would run, module by module
        grad_mode = torch.is_grad_enabled()
        entry = self._pending.pop(index, None)
        if (entry is not None and entry[0] is x and entry[1] == grad_mode and self._state(x, entry[3]) == entry[4]
                and (entry[3] is None or entry[3].tensors_as_built())):  # none replaced, frozen or unfrozen
            return entry[2]
        outs = None
        if entry is None and x.dim() and x.shape[-1] == module.in_features:  # else a bad input: reported below
            outs = self._run(x, module)
        if outs is None:  # the member's own op (it also reports bad inputs)
            return module.forward_alone(x)
        plan = None if torch.compiler.is_compiling() else self._plan
        state = self._state(x, plan)
        self._pending = {i: (x, grad_mode, y, plan, state) for i, y in enumerate(outs) if i != index}
        node = None if plan is None else outs[index].grad_fn  # (traced: no node to hold)
        if node is not None and any(y.grad_fn is node for i, y in enumerate(outs) if i != index):
            node.register_prehook(_dropping_pending(self))  # one node for every member: its backward frees them
        return outs[index]

    def _state(self, x: Tensor, plan: call_plan.CallPlan | None) -> tuple:
        """What a pending output was computed from, as cheap values: x's and every tensor's version
        of the run's ``plan`` (in-place writes; a tensor replaced, frozen or unfrozen is told by the
        plan itself: ``tensors_as_built``), each member's paths version (adapters switched, enabled,
        disabled, merged), train / eval mode and autocast. Not traced (``plan`` None): a compiled
        model's calls are one graph."""
        if plan is None:
            return ()
        return (x._version, call_plan.autocast_state(x), *(m._paths_version for m in self.members),
                *(m.training for m in self.members), *map(_version, plan._tensors))

    def _run(self, x: Tensor, module: SharedLoRALinear) -> tuple[Tensor, ...] | None:
        """The group's op on x, or None where its members cannot run together (``_can_group``).
        Eager calls run the group's call plan (``_build``), kept per environment like a layer's (grad
        on and off under reentrant checkpointing, train and eval) and rebuilt when what it was built
        from changed (``ops.call_plan``; the members' train / eval modes and paths versions are part of
        its environment, so whether they can run together is too)."""
        members = self.members
        if torch.compiler.is_compiling():
            if not self._can_group(x):
                return None
            return ops.grouped_lora_linear(x, [m.base_weight() for m in members], [m.bias for m in members],
                                           [m.paths() for m in members], module.dropout, module.training)
        env = call_plan.environment(x, module.training, (*(m._paths_version for m in members),
                                                         *(m.training for m in members)))
        plan = self._plan
        if plan is None or not plan.fits(env):
            self._plan = None
            plan = call_plan.kept_or_built(
                self._plans, env, lambda: self._build(x, module, env),
                lambda: (module.training, (*(m._paths_state() for m in members), *(m.training for m in members))))
            if self._plans.get(env) is not plan:  # built while a member switched (another thread): run alone
                return None
            self._plan = plan
        return plan.run(x)

    def _build(self, x: Tensor, module: SharedLoRALinear, env: tuple) -> call_plan.CallPlan:
        """The group's call plan: the kernels' ``GroupedPlan`` under triton, each member's planned
        compose call on one dropout draw under compose (``call_plan.build_compose_group``), else the
        router on paths made once. Under autocast with the bases in its dtype, x is cast and that
        plan runs with autocast off (as a layer's plan does); a base of another dtype takes the
        router. Its run returns None where the members run alone: they cannot run together, one
        grouped kernel call would not take them (triton, adapters of two dtypes: each member's own
        plan runs its kernels), or a tensor it reads is an inference tensor (its pending outputs
        could not be told stale)."""
        members = self.members
        sources = [s for m in members for s in m._sources()]
        alone = call_plan.CallPlan(env, sources, lambda x: None, "alone")
        if not self._can_group(x) or any(map(_unversioned, sources)):
            return alone
        ws, bs, ps = [m.base_weight() for m in members], [m.bias for m in members], [m.paths() for m in members]
        args = (ws, bs, ps, module.dropout, module.training)
        cast = ops._autocast_operands(x, *ws, *bs)
        run, backend = None, "router"
        if cast is None:
            run, backend = self._planned(x, args)
        elif all(c is t for c, t in zip(cast[1:], (*ws, *bs))):  # the bases in autocast's dtype: x cast per call
            with torch.autocast(x.device.type, enabled=False):
                run, backend = self._planned(cast[0], args)
            if run is not None:
                run = call_plan.cast_without_autocast(run, cast[0])
        if backend == "alone":
            return alone
        if run is None:
            run, backend = (lambda x: ops.grouped_lora_linear(x, *args)), "router"
        return call_plan.CallPlan(env, sources, run, backend)

    @staticmethod
    def _planned(x: Tensor, args: tuple) -> tuple:
        """(run, backend) of the group's planned op for operands x and ``args`` (weights, biases,
        paths, dropout, training) with autocast off: triton's ``GroupedPlan`` (None, "alone" where
        one grouped call does not take the members but each takes its own kernels), compose's
        group (run None where ``build_compose_group`` does not take them), else (None, "router");
        a None run takes the router."""
        setting, (ws, bs, ps) = ops.backend_for(x), args[:3]
        if setting == "triton":
            if ops._group_fusable(x, ws, bs, ps):
                from .ops.grouped_lora_linear import planned_call

                return planned_call(x, *args), "triton"
            if all(ops._fusable(x, w, b, p) for w, b, p in zip(ws, bs, ps)):
                return None, "alone"
        if setting == "compose":
            return call_plan.build_compose_group(x, *args), "compose"
        return None, "router"

    @staticmethod
    def _runs_alone(module: SharedLoRALinear, x: Tensor) -> bool:
        """Whether the group's op would run this member on its own anyway: under auto (module by
        module, each its own choice), or on compose with no dropout drawn (the one mask a group
        shares is all it shares there)."""
        setting = ops.backend_for(x)
        return setting == "auto" or (setting == "compose" and (module.dropout == 0 or not module.training))

    def _can_group(self, x: Tensor) -> bool:
        """Whether the members can run as one op on x: adapters active and not merged, dense bases
        on x's device in x's dtype (or in autocast's dtype, x cast to it), one dropout, one mode."""
        first = self.members[0]
        dtype = x.dtype
        if (autocast_enabled(x.device.type) and x.is_floating_point()
                and first.weight.dtype == torch.get_autocast_dtype(x.device.type)):
            dtype = first.weight.dtype
        return all(not m.merged and len(m.lora_paths) > 0 and not m.layout.computes_itself and m.dropout == first.dropout
                   and m.training == first.training and m.in_features == x.shape[-1]
                   and m.weight.device == x.device and m.weight.dtype == dtype for m in self.members)

    def clear(self) -> None:
        self._pending.clear()
        self._plan, self._plans = None, {}

    def __getstate__(self) -> dict:
        """Copies and pickles hold the members, not the pending outputs of a run in flight."""
        return {**self.__dict__, "_pending": {}, "_plan": None, "_plans": {}}


def check_known_architecture(model: nn.Module) -> None:
    """ValueError unless ``model`` is one of ``KNOWN_ARCHITECTURES``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in KNOWN_ARCHITECTURES:
        raise ValueError(f"input groups are known for model types {list(KNOWN_ARCHITECTURES)}, "
                         f"this model's is {model_type!r}")


def enable_input_groups(model: nn.Module) -> int:
    """Make the modules of each input group compute together; returns the number of groups formed.

    A group is the SharedLoRALinear children of one module named as in ``GROUPS`` (at least two of
    them, same in_features, dtype and device). Only for ``KNOWN_ARCHITECTURES``, where those
    siblings do read one input (elsewhere, e.g. cross-attention, they may not): ValueError otherwise.
    Calling it again regroups with fresh coordinators.
    """
    check_known_architecture(model)
    disable_input_groups(model)
    count = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [m for m in (getattr(parent, n, None) for n in names) if isinstance(m, SharedLoRALinear)]
            if len(members) < 2 or len({(m.in_features, m.weight.dtype, m.weight.device) for m in members}) > 1:
                continue
            group = InputGroup(members)
            for m in members:
                m.input_group = group
            count += 1
    return count


def disable_input_groups(model: nn.Module) -> None:
    """Undo ``enable_input_groups``: every module runs its own op again, caches dropped."""
    for m in model.modules():
        if isinstance(m, SharedLoRALinear) and m.input_group is not None:
            m.input_group.clear()
            m.input_group = None
