"""A layer's call plan: everything one call needs that does not change between calls, built once.

A layer call used to resolve, every time, the backend setting, the path tuples, the checks, the
router's choice and the op's flat arguments, although none of them changes from one call to the
next. A ``CallPlan`` resolves them once (the way vLLM builds its LoRA kernel metadata once per
batch) and keeps a ``run(x)`` that issues the chosen backend's one op boundary directly:

    compose, plain / slice paths   ``dense_program.dense_runner``: one autograd Function over a
                                   ``DenseProgram`` built once, ``DenseLean`` (no dropout, nothing
                                   cast) or ``DenseCompose``, its backward hand-written; the
                                   forward alone when no gradient is wanted
    compose, gate / Kronecker      ``path_program.path_runner``: one autograd Function, ``PathCompose``,
                                   over a ``PathProgram`` (which path is what, scales, windows)
                                   built once; the forward alone when no gradient is wanted
    compose, other paths           ``compose.planned_call`` (a tensor read twice, mixed adapter
                                   dtypes): its one Function, flat arguments made once
    triton                         ``fused_lora_linear.FusedLinear`` (the kernels, no custom-op
                                   wrapper), its factor tables built once
    torch                          ``reference.lora_linear`` on the prebuilt path list
    auto                           the choice of ``dispatch.auto_choice``, kept per M bucket
    under autocast                 a base in autocast's dtype: x cast, then the plan of those
                                   operands; a base of another dtype, plain / slice paths on
                                   compose: ``dense_program.cast_base_runner`` (W and b cast every call,
                                   as autocast does); anything else: the router
    a base that computes itself    ``lowrank_only.LowRankDense`` (plain / slice paths on the torch
                                   path) or ``LowRankPlanned`` (no custom-op wrapper)

A plan is valid while nothing it was built from changed. Two cheap comparisons decide, at each call:

  * ``environment(x, ...)``: x's dtype, device, layout and requires_grad, grad mode, autocast state
    and dtype, the settings' version (``set_backend``, ``refresh_settings``, ``dispatch.clear``),
    the layer's train/eval mode and ``_paths_version`` (what paths it computes, merged or not);
  * ``Source`` of every tensor: where the layer reads it (a module's parameter dict and name), the
    object found there, its data pointer, strides and shape (a ``.to()``, an assign-load, FSDP
    resharding, ``p.data = p.data.t()``, ``p.data = p.data[:2]`` change them; an in-place optimizer
    step does not, and needs no rebuild) and requires_grad; and of each path's spec and store (their
    identity).

Anything else is rebuilt: ``build_linear`` checks the inputs (``encoding.check_linear``: shapes,
dropout, every path) with the messages a call of the op gives, so what left the per-call path is
checked once per plan. Under ``torch.compile`` the layer does not use a plan (dynamo traces the
router, ``ops.lora_linear``, and reaches the custom ops).
"""
from __future__ import annotations

import operator
from typing import Callable, Hashable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..reference import LoRAPath
from . import compose, dense_program, dispatch, path_program
from .autocast import AutocastOff, autocast_enabled
from .encoding import check_linear

Run = Callable[[Tensor], Tensor]


class Source(NamedTuple):
    """Where a tensor of the plan lives: ``owner[name]`` (a module's ``_parameters``), the object
    found there at build, its ``data_ptr()`` and ``requires_grad``."""

    owner: dict
    name: str
    tensor: Tensor
    data_ptr: int
    requires_grad: bool


def source(owner: dict, name: str) -> Source:
    """The source of the tensor ``owner[name]``, or of any other object there (told by identity)."""
    t = owner[name]
    if t is not None and not isinstance(t, torch.Tensor):
        return Source(owner, name, t, -2, False)
    return Source(owner, name, t, _data_ptr(t), t is not None and t.requires_grad)


def _data_ptr(t: Tensor | None) -> int:
    """t's data pointer; -1 for a tensor without storage of its own (a DTensor or other wrapper:
    identity alone tells its replacement)."""
    if t is None:
        return 0
    try:
        return t.data_ptr()
    except RuntimeError:
        return -1


_VERSION = 6  # the index of the settings' version in an environment


def environment(x: Tensor, training: bool, paths_version: Hashable) -> tuple:
    """What a plan depends on besides its tensors: x's dtype / device / layout / requires_grad, grad
    mode, autocast (its dtype, or None when off), the settings' version, the layer's train/eval mode
    and ``_paths_version``. (Every Python-level call here costs a call's host time: autocast's state
    is read once when no autocast is on anywhere.)"""
    return (x.dtype, x.device, x.layout, x.requires_grad, torch.is_grad_enabled(), autocast_state(x),
            dispatch.SETTINGS.version, training, paths_version)


def autocast_state(x: Tensor) -> torch.dtype | None:
    """The autocast dtype on x's device type, or None when autocast is off there."""
    if not _any_autocast():
        return None
    device = x.device.type
    return torch.get_autocast_dtype(device) if autocast_enabled(device) else None


def _any_autocast_fallback() -> bool:
    return True  # a torch without the query: read the device's state every call


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", _any_autocast_fallback)


class CallPlan:
    """``run(x)`` (x of the plan's environment; reshaped by ``run``), valid while ``fits`` says so;
    ``adds_to_base``: ``run(y, x)`` adds the paths into the output y of a base that computes itself."""

    __slots__ = ("env", "sources", "run", "backend", "adds_to_base", "_owners", "_names", "_found", "_tensors",
                 "_grads", "_ptr_of", "_ptrs", "_strides", "_sizes")

    def __init__(self, env: tuple, sources: Sequence[Source], run: Run, backend: str, adds_to_base: bool = False):
        self.env, self.sources, self.run, self.backend = env, tuple(sources), run, backend
        self.adds_to_base = adds_to_base
        # fits() as a few C-level passes (map) over flat lists, not a Python loop over the sources
        self._owners = [s.owner for s in self.sources]
        self._names = [s.name for s in self.sources]
        self._found = [s.tensor for s in self.sources]
        checked = [s for s in self.sources if s.tensor is not None and s.data_ptr != -2]
        self._tensors = [s.tensor for s in checked]
        self._grads = [s.requires_grad for s in checked]
        self._ptr_of = [s.tensor for s in checked if s.data_ptr >= 0]
        self._ptrs = [s.data_ptr for s in checked if s.data_ptr >= 0]
        self._strides = list(map(Tensor.stride, self._ptr_of))  # ``p.data = p.data.t()`` keeps the pointer
        self._sizes = list(map(Tensor.size, self._ptr_of))  # so does ``p.data = p.data[:2]``

    def fits(self, env: tuple) -> bool:
        """Whether this plan serves a call of environment ``env`` with the tensors as they are now."""
        return env == self.env and self.tensors_as_built()

    def tensors_as_built(self) -> bool:
        """Whether every tensor it reads is as when it was built: the same one in the same storage and
        layout (``reads_current_tensors``), requiring grad or not as then."""
        return self.reads_current_tensors() and list(map(_requires_grad, self._tensors)) == self._grads

    def reads_current_tensors(self) -> bool:
        """Whether every tensor it reads is still the one in its module, in the same storage, shape and layout (a
        tensor frozen or unfrozen since, as switching adapters does, may be again when the plan is wanted)."""
        return (all(map(operator.is_, map(dict.get, self._owners, self._names), self._found))
                and list(map(Tensor.data_ptr, self._ptr_of)) == self._ptrs
                and list(map(Tensor.stride, self._ptr_of)) == self._strides
                and list(map(Tensor.size, self._ptr_of)) == self._sizes)


_requires_grad = operator.attrgetter("requires_grad")


KEPT_PLANS = 8  # plans kept per layer or input group: environments come and go (dtypes, autocast)


def kept_or_built(plans: dict[tuple, CallPlan], env: tuple, build: Callable[[], CallPlan],
                  layer_state: Callable[[], tuple]) -> CallPlan:
    """The plan of ``env`` kept in ``plans`` (environment -> plan: grad on and off under reentrant
    checkpointing, train and eval, ...) if it still fits, else ``build()``'s, kept there. Before a
    build, ``plans`` keeps only those of the current settings whose tensors are all still in place
    (none holds views of a replaced tensor's old storage), and none once ``KEPT_PLANS`` are kept.
    ``layer_state()``: the train / eval mode and paths version of ``env`` as they are now; a plan
    built while they changed (another thread switched adapters) may hold either state: it serves
    the call and is not kept (``plans.get(env) is plan`` tells)."""
    plan = plans.get(env)
    if plan is not None and plan.fits(env):
        return plan
    version = dispatch.SETTINGS.version
    valid = {e: p for e, p in plans.items() if e[_VERSION] == version and p.reads_current_tensors()}
    plans.clear()
    if len(valid) < KEPT_PLANS:
        plans.update(valid)
    plan = build()
    if layer_state() == env[_VERSION + 1:]:
        plans[env] = plan
    return plan


def grad_wanted(x: Tensor, paths: Sequence[LoRAPath]) -> bool:
    """Whether autograd will take a gradient of this call (``dispatch.call_mode``)."""
    return dispatch.call_mode(x, paths) == "fwd+bwd"


def build_linear(env: tuple, sources: Sequence[Source], x: Tensor, weight: Tensor, bias: Tensor | None,
                 paths: Sequence[LoRAPath], dropout_p: float, training: bool) -> CallPlan:
    """The plan of a dense base: y = x W^T + b + paths(dropout(x)); weight (N, K) as the backends read it."""
    from . import _autocast_operands, _auto_times_triton, _compose_takes, _fusable, backend_for, lora_linear

    check_linear(x, weight, bias, paths, dropout_p)
    if not paths:
        return CallPlan(env, sources, lambda x: F.linear(x, weight, bias), "base")
    setting = backend_for(x)
    if setting == "torch":
        return CallPlan(env, sources, _torch_runner(weight, bias, paths, dropout_p, training), "torch")
    cast = _autocast_operands(x, weight, bias)
    if cast is not None:
        if cast[1] is weight and cast[2] is bias:  # the base in autocast's dtype: only x is cast per call
            return _without_autocast(env, sources, cast[0], weight, bias, paths, dropout_p, training)
        if (setting == "compose" or (setting == "auto" and not _auto_times_triton(x))) and _compose_takes(*cast, paths) \
                and dense_program.DenseProgram.takes(paths):
            return CallPlan(env, sources, _cast_base_runner(cast, weight, bias, paths, dropout_p, training), "compose")
        # a base of another dtype is cast every call (as autocast's linear does): the router's path
        return CallPlan(env, sources, lambda x: lora_linear(x, weight, bias, paths, dropout_p, training, backend=setting),
                        setting)
    torch_run = _torch_runner(weight, bias, paths, dropout_p, training)
    if not _compose_takes(x, weight, bias, paths):  # float64, a base that trains, ...: the torch path alone takes it
        return CallPlan(env, sources, torch_run, "torch")
    fusable = _fusable(x, weight, bias, paths)
    if setting == "triton":
        return (CallPlan(env, sources, _triton_runner(x, weight, bias, paths, dropout_p, training), "triton") if fusable
                else CallPlan(env, sources, torch_run, "torch"))
    compose_run = _compose_runner(x, weight, bias, paths, dropout_p, training)
    if setting == "compose" or not (fusable and _auto_times_triton(x)):  # auto with compose alone (the CPU): untimed
        return CallPlan(env, sources, compose_run, "compose")
    runners = {"compose": compose_run, "triton": _triton_runner(x, weight, bias, paths, dropout_p, training)}
    return CallPlan(env, sources, _auto_runner(runners, weight, bias, paths, dropout_p, training), "auto")


def _without_autocast(env: tuple, sources: Sequence[Source], xs: Tensor, weight: Tensor, bias: Tensor | None,
                      paths: Sequence[LoRAPath], dropout_p: float, training: bool) -> CallPlan:
    """The plan under autocast when W and b are in its dtype already: x cast to that dtype, then the
    plan of those operands with autocast off (what the router does, built once). ``xs``: x cast."""
    with torch.autocast(xs.device.type, enabled=False):
        inner = build_linear(env, sources, xs, weight, bias, paths, dropout_p, training)
    return CallPlan(env, sources, cast_without_autocast(inner.run, xs), inner.backend)


def cast_without_autocast(run: Callable, xs: Tensor) -> Callable:
    """run(x) of a plan built under autocast on operands in its dtype, ``xs`` (x cast): each call
    casts x to that dtype and runs ``run`` with autocast off, as the router does."""
    device, dtype = xs.device.type, xs.dtype

    def run_cast(x: Tensor):
        with AutocastOff(device):
            return run(x if x.dtype == dtype else x.to(dtype))
    return run_cast


def _cast_base_runner(cast: tuple, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                      training: bool) -> Run:
    """compose's run(x) under autocast for a base cast every call (``dense_program.cast_base_runner``) of
    plain / slice paths. ``cast``: this call's (x, W, b) in the autocast dtype, what the program is
    built from."""
    xs, ws, bs = cast
    p = dropout_p if training else 0.0
    program = dense_program.DenseProgram(ws, bs, paths, p, per_call=True)
    tensors = [t for q in paths for t in q.tensors]
    return dense_program.cast_base_runner(program, weight, bias, tensors, grad_wanted(xs, paths), xs.dtype)


def build_compose_group(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                        paths: Sequence[Sequence[LoRAPath]], dropout_p: float, training: bool) -> Run | None:
    """compose's run(x) -> one (..., N_g) per member of an input group: one dropout draw on x, then
    each member's planned Function (``DenseCompose`` or ``PathCompose``) on that draw. None where a
    member's paths need the general compose call (a tensor read twice, mixed adapter dtypes) or a
    base compose does not take: the router runs the group."""
    from . import _compose_takes

    p = dropout_p if training else 0.0
    calls = []
    for w, b, ps in zip(weights, biases, paths):
        if not (ps and _compose_takes(x, w, b, ps)):
            return None
        compose._check(x, w, b, ps, p)
        tensors = [t for q in ps for t in q.tensors]
        if dense_program.DenseProgram.takes(ps):
            calls.append((dense_program.dense_apply, dense_program.DenseProgram(w, b, ps, p), (None, None, *tensors)))
        elif path_program.PathProgram.takes(ps):
            calls.append((path_program.path_apply, path_program.PathProgram(w, b, ps, p), tensors))
        else:
            return None
    k = x.shape[-1]

    def run(x: Tensor) -> tuple[Tensor, ...]:
        x2 = x.reshape(-1, k)
        dropped = compose.draw_dropout(x2, p)
        lead = x.shape[:-1]
        return tuple(apply(program, x2, dropped, *args).view(*lead, program.n) for apply, program, args in calls)
    return run


def _torch_runner(weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                  training: bool) -> Run:
    """The torch backend's run(x): ``reference.lora_linear`` (gradients of W and b too, where they require it)."""
    return lambda x: reference.lora_linear(x, weight, bias, paths, dropout_p, training)


def _compose_runner(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                    training: bool) -> Run:
    p = dropout_p if training else 0.0
    if dense_program.DenseProgram.takes(paths):
        program = dense_program.DenseProgram(weight, bias, paths, p)
        tensors = [t for q in paths for t in q.tensors]
        return dense_program.dense_runner(program, tensors, grad_wanted(x, paths))
    if path_program.PathProgram.takes(paths):
        return path_program.path_runner(x, weight, bias, paths, p, grad_wanted(x, paths))
    return compose.planned_call(x, weight, bias, paths, dropout_p, training)


def _triton_runner(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                   training: bool) -> Run:
    from .fused_lora_linear import planned_call

    return planned_call(x, weight, bias, paths, dropout_p, training)


def _auto_runner(runners: dict[str, Run], weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath],
                 dropout_p: float, training: bool) -> Run:
    """auto: ``dispatch.auto_choice`` once per M bucket of this plan, then that backend's runner."""
    def choose(x: Tensor) -> str:
        from . import _fused_lora_linear

        return dispatch.auto_choice(x, weight, bias, paths, dropout_p, training,
                                    {"triton": _fused_lora_linear, "compose": compose.lora_linear})
    pick = _per_bucket(weight.shape[1], runners, choose)
    return lambda x: pick(x)(x)


def _per_bucket(k: int, runners: dict[str, Callable], choose: Callable[[Tensor], str]) -> Callable[[Tensor], Callable]:
    """pick(x): the runner named by ``choose(x)`` (auto's choice), asked once per M bucket of x (..., K)."""
    chosen: dict[int, Callable] = {}

    def pick(x: Tensor) -> Callable:
        bucket = dispatch.m_bucket(x.numel() // k if k else 0)
        fn = chosen.get(bucket)
        if fn is None:
            fn = chosen[bucket] = runners[choose(x)]
        return fn
    return pick


def build_lowrank(env: tuple, sources: Sequence[Source], x: Tensor, n: int, paths: Sequence[LoRAPath],
                  dropout_p: float, training: bool, compute_dtype: torch.dtype) -> CallPlan:
    """The plan of a base that computes itself: ``run(y, x)`` adds the paths into its output y (..., N)."""
    from . import _auto_times_triton, backend_for, lowrank_auto_choice, lowrank_takes_triton
    from .lowrank_only import planned_call

    if not paths:
        return CallPlan(env, sources, lambda y, x: y, "base", adds_to_base=True)
    setting = backend_for(x)
    takes = lowrank_takes_triton(paths, compute_dtype, compute_dtype)
    if setting == "auto" and takes and _auto_times_triton(x):
        runners = {name: planned_call(x, n, paths, dropout_p, training, compute_dtype, name == "triton")
                   for name in ("triton", "compose")}
        pick = _per_bucket(x.shape[-1], runners, lambda x: lowrank_auto_choice(
            x, n, paths, dropout_p, training, compute_dtype, compute_dtype))
        return CallPlan(env, sources, lambda y, x: pick(x)(y, x), "auto", adds_to_base=True)
    use_triton = takes and setting == "triton"
    return CallPlan(env, sources, planned_call(x, n, paths, dropout_p, training, compute_dtype, use_triton),
                    "triton" if use_triton else "torch", adds_to_base=True)
