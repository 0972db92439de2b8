"""Shared adapters as a PEFT method: ``peft.get_peft_model(model, ShareLoRAPeftConfig(...))``.

The tuner (``ShareLoRAModel``) runs the core: the same targeting, plan, ``AdapterStore`` (one per
adapter name, owned once by the model as ``sharelora_adapters[_<name>]``), layers, kernels and bases
(dense, Conv1D, bitsandbytes 4-bit / 8-bit) as ``sharelora_kernels.apply``. PEFT's own machinery
does the rest: ``PeftModel``, ``save_pretrained`` / ``from_pretrained``, ``modules_to_save`` (its
``ModulesToSaveWrapper``: one copy per adapter), task types and the Auto classes.

PEFT internals this relies on (peft 0.21): the method tables ``PEFT_TYPE_TO_CONFIG_MAPPING``,
``PEFT_TYPE_TO_TUNER_MAPPING`` and ``PEFT_TYPE_TO_PREFIX_MAPPING`` in ``peft.mapping`` (its public
``register_peft_method`` accepts only members of its closed ``PeftType`` enum), and the tuner's
state-dict hooks ``_get_adapter_state_dict``, ``_remove_adapter_name_from_key`` and
``_remap_adapter_state_dict_for_load``, and the forward-hook context ``_enable_peft_forward_hooks``
(``PeftModel.forward`` / ``generate`` pass it their kwargs; ``adapter_names`` runs a mixed batch,
and PEFT's modules-to-save wrappers get ``adapter_names`` per row, as PEFT's LoRA gives it), and
``peft.utils.integrations``' ``skip_init_on_device`` (``low_cpu_mem_usage``: PEFT builds the first
adapter's tuner under its ``init_empty_weights``).
When they are missing this module raises ImportError naming the installed PEFT version. Also read,
with a fallback when missing: ``peft.peft_model.CLASSIFIER_MODULE_NAMES`` (the heads PEFT's task
classes add to every config's ``modules_to_save``, which a model may lack).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import sys
from typing import Sequence

import torch.nn as nn

from ..base import check_4bit_layouts
from ..config import ShareLoRAConfig
from ..layer import AdapterStore, SharedLoRALinear, adapter_name_list, check_adapter_name
from ..model import (STORE_ATTR, activate_adapters, active_adapters, adapter_names, adapter_store, apply_plan,
                     check_bank_room, check_config_unchanged, check_known, check_safe_merge, is_applied,
                     keep_base_dtypes, remove_adapter, unwrap_layers)
from ..plan import build_plan
from ..serving import mixed_batch
from ..targeting import DEFAULT_TARGET_MODULES, check_no_peft, find_target_modules, matches

PEFT_TYPE = "SHARELORA"
PREFIX = "sharelora_"
_HOOKS = ("_get_adapter_state_dict", "_remove_adapter_name_from_key", "_remap_adapter_state_dict_for_load")


def _peft_version() -> str:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _moved(what: str) -> ImportError:
    return ImportError(f"sharelora_kernels' PEFT method needs {what}, which peft {_peft_version()} does not have (it "
                       "was built on peft 0.21): use sharelora_kernels.apply / save / load, which do not need PEFT, "
                       'or install a PEFT it supports (pip install "sharelora_kernels[peft]")')


try:
    from peft import mapping as _tables
    from peft import peft_model as _peft_model
    from peft.config import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _delete_auxiliary_adapter
    from peft.tuners.tuners_utils import set_requires_grad as _peft_set_requires_grad
    from peft.utils.integrations import skip_init_on_device
    from peft.utils.other import AuxiliaryTrainingWrapper, _set_adapter, set_additional_trainable_modules
except ImportError as e:
    raise _moved(f"these PEFT modules ({e})") from e
for _table in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
    if not isinstance(getattr(_tables, _table, None), dict):
        raise _moved(f"peft.mapping.{_table}")
if not all(hasattr(BaseTuner, h) for h in _HOOKS):
    raise _moved(f"the tuner state-dict hooks BaseTuner.{', '.join(_HOOKS)}")
# what PEFT's task classes add to modules_to_save (classification heads, and QA's)
_TASK_HEADS = (*getattr(_peft_model, "CLASSIFIER_MODULE_NAMES", ("classifier", "score")), "qa_outputs")


# ------------------------------------------------------------------------------------------ config
def _sharelora_fields() -> list[tuple]:
    """Every ShareLoRAConfig field with its default, for the PEFT config."""
    out = []
    for f in dataclasses.fields(ShareLoRAConfig):
        has_default = f.default is not dataclasses.MISSING
        default = {"default": f.default} if has_default else {"default_factory": f.default_factory}
        out.append((f.name, f.type, dataclasses.field(**default)))
    return out


class _PeftTypeName(str):
    """The method's name where PEFT expects a member of its closed ``PeftType`` enum: equal to, hashed
    and saved as ``"SHARELORA"``, with a member's ``.value`` and ``str()`` (``PeftType.SHARELORA``), so
    that PEFT's code reading them (hotswap, mixed models, model status) refuses or names the method
    instead of failing on a plain string."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"


def _post_init(self) -> None:
    PeftConfig.__post_init__(self)
    self.peft_type = _PeftTypeName(PEFT_TYPE)
    checked = self.to_config()  # raises as ShareLoRAConfig raises, naming the field
    for f in dataclasses.fields(ShareLoRAConfig):
        setattr(self, f.name, getattr(checked, f.name))


def _to_config(self) -> ShareLoRAConfig:
    """The ``sharelora_kernels.ShareLoRAConfig`` of this config's ShareLoRA fields."""
    return ShareLoRAConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ShareLoRAConfig)})


def _from_config(cls, config: ShareLoRAConfig, **peft_fields) -> "ShareLoRAPeftConfig":
    """The PEFT config of ``config``, with PEFT's own fields (``task_type``, ``inference_mode``, ...)."""
    return cls(**dataclasses.asdict(config), **peft_fields)


ShareLoRAPeftConfig = dataclasses.make_dataclass(
    "ShareLoRAPeftConfig", _sharelora_fields(), bases=(PeftConfig,),
    namespace={"__post_init__": _post_init, "to_config": _to_config, "from_config": classmethod(_from_config),
               "__doc__": """A ``peft.PeftConfig`` for shared adapters: every ``ShareLoRAConfig`` field (same names,
defaults and checks) plus PEFT's own (``task_type``, ``inference_mode``, ``base_model_name_or_path``, ...);
``peft_type`` is ``"SHARELORA"``. ``modules_to_save`` has PEFT's meaning: the listed modules, plus the
head PEFT's task class adds (``task_type="SEQ_CLS"``: classifier / score), one copy per adapter.
``ShareLoRAPeftConfig.from_config(sk_config, task_type=...)`` and ``.to_config()`` convert."""})
ShareLoRAPeftConfig.__module__ = __name__  # copies and pickles find it here


# ------------------------------------------------------------------------------------------- layer
class ShareLoRAPeftLayer(SharedLoRALinear, BaseTunerLayer):
    """``SharedLoRALinear`` as PEFT sees a tuner layer. Adapters, the active / merged / disabled state
    and their controls are the layer's own (``adapter_paths`` holds each adapter's path list);
    ``BaseTunerLayer``'s ``weight`` / ``bias`` give way to the layer's own tensors."""

    adapter_layer_names = ("adapter_paths",)

    @skip_init_on_device
    def __init__(self, *args, **kwargs) -> None:
        """``SharedLoRALinear``'s, keeping the base's tensors where they are under PEFT's
        ``low_cpu_mem_usage`` (its ``init_empty_weights`` would put every registered tensor on meta)."""
        super().__init__(*args, **kwargs)

    def _own_or_base(self, name: str):
        if name in self._parameters:
            return self._parameters[name]
        if "base_layer" not in self._modules:
            raise AttributeError(name)  # not set yet (nn.Module's hasattr check while registering it)
        return getattr(self._modules["base_layer"], name)

    @property
    def weight(self):
        return self._own_or_base("weight")

    @property
    def bias(self):
        return self._own_or_base("bias")

    @bias.setter
    def bias(self, value) -> None:  # None (a Parameter is registered by nn.Module.__setattr__)
        self.register_parameter("bias", value)

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        SharedLoRALinear.set_adapter(self, adapter_names)


# ------------------------------------------------------------------------------------------- tuner
def _store_prefixes(model: nn.Module, adapter_name: str) -> tuple[str, ...]:
    """State-dict key prefixes of adapter ``adapter_name``'s store in ``model``."""
    tail = f"{STORE_ATTR}.{adapter_name}"
    return tuple(f"{n}." for n, m in model.named_modules()
                 if isinstance(m, AdapterStore) and (n == tail or n.endswith("." + tail)))


def _is_store_key(key: str) -> bool:
    return STORE_ATTR in key.split(".")[:-1]


def _copy_bytes(model: nn.Module, modules_to_save: Sequence[str]) -> int:
    """Bytes of the copies PEFT makes for a new adapter of the modules whose names end with an entry
    of ``modules_to_save`` (its match; of a module it wrapped already, the original)."""
    copied = {}
    for name, module in model.named_modules():
        if name and any(name.endswith(e) for e in modules_to_save):
            module = getattr(module, "original_module", module)
            copied.update((id(t), t) for t in [*module.parameters(), *module.buffers()])
    return sum(t.numel() * t.element_size() for t in copied.values())


class ShareLoRAModel(BaseTuner):
    """PEFT's tuner for ``ShareLoRAPeftConfig``: adds each named adapter through the core planner."""

    prefix = PREFIX
    tuner_layer_cls = ShareLoRAPeftLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state = True

    def __init__(self, model: nn.Module, *args, **kwargs) -> None:
        """BaseTuner's, once the model is known to hold no PEFT adapters of another method (refused
        with ``apply``'s message before PEFT records this method's config in the model)."""
        check_no_peft(model)
        super().__init__(model, *args, **kwargs)

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # target_modules=None: the core's defaults of the model type

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("ShareLoRA plans all target modules of an adapter at once (inject_adapter)")

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        """Plan and add adapter ``adapter_name`` (every check before the model changes), then PEFT's
        bookkeeping: active adapter, trainable tensors, its modules to save. The first adapter freezes
        the base; a later one leaves every tensor already there trainable or frozen as it was (as PEFT).
        ``low_cpu_mem_usage``: the adapter's tensors are made on the meta device, for a load to fill."""
        peft_config = self.peft_config[adapter_name]
        check_adapter_name(adapter_name)
        managed = getattr(model, "peft_config", {})  # BaseTuner puts its configs there after the first adapter
        applied = [n for n in adapter_names(model) if n not in managed]
        if applied:
            raise ValueError(f"this model holds ShareLoRA adapters {applied} of sharelora_kernels.apply / load, which "
                             "PEFT would not know: it would deactivate them and save without them. Add adapters "
                             "with sharelora_kernels.apply(model, config, adapter_name=...), or call "
                             "sharelora_kernels.unload(model) first")
        if adapter_name in adapter_names(model):
            raise ValueError(f"this model already has a ShareLoRA adapter named {adapter_name!r}")
        config = peft_config.to_config()
        names = [n for n, _ in model.named_modules() if n]
        # PEFT wraps the modules to save; the planner only keeps targets out of them. The heads PEFT's task
        # classes add to every config may be absent (a model without that head); an entry the user gave
        # must match a module, as apply's does.
        found = [e for e in peft_config.modules_to_save or [] if any(matches(n, [e]) for n in names)]
        missing = [e for e in peft_config.modules_to_save or [] if e not in found and e not in _TASK_HEADS]
        if missing:
            raise ValueError(f"modules_to_save entry {missing[0]!r} matches no module of this model")
        config.modules_to_save = found
        check_4bit_layouts(model)
        infos, num_layers = find_target_modules(model, config, wrapped_ok=is_applied(model))
        plan = build_plan(config, infos, num_layers)
        check_bank_room(model, plan, adapter_name, _copy_bytes(model, peft_config.modules_to_save or []))
        first = not adapter_names(model)
        requires_grad_before = [(p, p.requires_grad) for p in model.parameters()]
        if first:
            self._requires_grad_before = requires_grad_before
        apply_plan(model, config, plan, adapter_name=adapter_name, layer_cls=ShareLoRAPeftLayer,
                   on_meta=low_cpu_mem_usage)  # the store on meta, to be loaded
        self.targeted_module_names.extend(n for n in plan.modules if n not in self.targeted_module_names)
        self.set_adapter(self.active_adapters, inference_mode=peft_config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        set_additional_trainable_modules(model=model, peft_config=peft_config,
                                         model_config=BaseTuner.get_model_config(self), adapter_name=adapter_name,
                                         activate_adapter=adapter_name in self.active_adapters)
        if not first:  # set_adapter above set the active adapters' flags by the new adapter's inference_mode
            for p, requires_grad in requires_grad_before:
                p.requires_grad_(requires_grad)
        self.__dict__.setdefault("_configs_as_added", {})[adapter_name] = peft_config.to_config().to_dict()
        if _in_a_peft_load():  # PEFT's loader adds it: taken out again if its load is refused (``_take_out``)
            self.__dict__.setdefault("_as_added", {})[adapter_name] = _versions(adapter_store(model, adapter_name))

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        """PEFT's LoRA-only combination of adapters: refused by name."""
        raise NotImplementedError("add_weighted_adapter combines LoRA adapters' per-module A / B pairs, and ShareLoRA "
                                  "adapters share their tensors across modules: export each adapter to PEFT LoRA "
                                  "(sharelora_kernels.export_peft) and combine those in a LoRA PeftModel")

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's dtype switch, called after an adapter is added: adapters of half-precision bases are
        made in float32 (``autocast_adapter_dtype=True``, the default); False keeps their base's dtype."""
        if not autocast_adapter_dtype:
            keep_base_dtypes(self.model, adapter_name)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``model(..., adapter_names=[...])`` / ``model.generate(..., adapter_names=[...])``: each row
        with its own adapter ("__base__": none) in one batch (``sharelora_kernels.mixed_batch``); rows
        repeated as generate repeats them (``num_beams``, else ``num_return_sequences``). Checked before
        any work: the training mode (refused, as PEFT refuses it), unknown names, the rows' number."""
        names = kwargs.pop("adapter_names", None)
        if names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode (a mixed-adapter batch "
                             "is inference only): call model.eval() first")
        # generate's settings: its arguments, else the generation config it is given, else the model's
        generation = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(generation, "num_beams", None)) or 1
        returns = kwargs.get("num_return_sequences", getattr(generation, "num_return_sequences", None)) or 1
        expand = beams if beams > 1 else returns
        with mixed_batch(self.model, names, expand):  # checks everything before it changes anything
            yield

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze everything but the active adapters' stores (and PEFT's modules to save, which keep their own)."""
        known = adapter_names(model)
        keep = {id(p) for n in self.active_adapters if n in known for p in adapter_store(model, n).parameters()}
        aux = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper))
        for n, p in model.named_parameters():
            if id(p) not in keep and not n.startswith(aux):
                p.requires_grad_(False)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = adapter_name_list(adapter_name)
        check_known(self.model, names)
        # modules to save first: PEFT's wrappers refuse several adapters before anything changes
        _set_adapter(self.model, adapter_name, inference_mode=inference_mode)
        activate_adapters(self.model, names)
        if inference_mode:
            for n in names:
                adapter_store(self.model, n).requires_grad_(False)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        names = adapter_name_list(adapter_names)
        check_known(self.model, names)
        for n in names:
            adapter_store(self.model, n).requires_grad_(requires_grad)
        _peft_set_requires_grad(self.model, names, requires_grad)  # modules to save

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; this model's adapters are {list(self.peft_config)}")
        remove_adapter(self.model, adapter_name)  # refuses a merged one; an active one hands over (with a warning)
        del self.peft_config[adapter_name]
        active = active_adapters(self.model)
        _delete_auxiliary_adapter(self.model, adapter_name=adapter_name, new_active_adapters=active or None)
        self.active_adapter = active[0] if len(active) == 1 else active

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self._check_merge_allowed()
            if safe_merge:  # every module before any changes (PEFT's wrappers below included)
                check_safe_merge(self.model, adapter_names)
        for name, wrapper in [(n, m) for n, m in self.model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]:
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf,
                    wrapper.unload_and_optionally_merge_module(merge=merge, safe_merge=safe_merge,
                                                               adapter_names=adapter_names))
        unwrap_layers(self.model, merge=merge, adapter_names=adapter_names)  # safe_merge: checked above
        self.model.__dict__.pop("peft_config", None)
        return self.model

    # ------------------------------------------------------------------ state dict (PEFT's hooks)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The tensors of adapter ``adapter_name``'s store: each shared tensor once. ValueError when
        ``config`` was edited since get_peft_model (a folder saying so would not load)."""
        tuner = getattr(model, "base_model", model)
        if adapter_name in tuner.__dict__.get("_configs_as_added", {}):
            check_config_unchanged(tuner._configs_as_added[adapter_name], adapter_name, config.to_config())
        prefixes = _store_prefixes(model, adapter_name)
        return {k: v for k, v in state_dict.items() if k.startswith(prefixes)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...sharelora_adapters.<name>.<tensor>`` -> ``...sharelora_adapters.<tensor>`` (a file holds no name)."""
        if not _is_store_key(key):
            return super()._remove_adapter_name_from_key(key, adapter_name)
        parts = key.split(".")
        i = parts.index(STORE_ATTR)
        return ".".join(parts[:i + 1] + parts[i + 2:]) if parts[i + 1] == adapter_name else key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checkpoint keys -> the model's, after checking that the checkpoint holds exactly the tensors
        of the model's plan with their shapes; otherwise the adapter is taken out again (the model as
        before loading) and ValueError names the first difference."""
        prefixes = _store_prefixes(model, adapter_name)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefixes)}
        to_model = {}
        for key in shapes:
            ck = cls._remove_adapter_name_from_key(key, adapter_name)
            to_model[ck] = key
            to_model.setdefault(ck.removeprefix("base_model.model."), key)  # a checkpoint of a bare model
        own = {k for k in to_model if k.startswith("base_model.model.")} or set(to_model)
        problem = None
        for ck, mk in to_model.items():
            if ck in state_dict and tuple(state_dict[ck].shape) != shapes[mk]:
                problem = f"tensor {ck!r} has shape {tuple(state_dict[ck].shape)} in the checkpoint, {shapes[mk]} in the model"
                break
        if problem is None:
            extra = [k for k in state_dict if _is_store_key(k) and k not in to_model]
            missing = [k for k in sorted(own) if k not in state_dict and k.removeprefix("base_model.model.") not in state_dict]
            if extra:
                problem = f"the checkpoint has tensor {extra[0]!r}, which the model's plan lacks ({len(extra)} such)"
            elif missing:
                problem = f"the model's plan has tensor {missing[0]!r}, which the checkpoint lacks ({len(missing)} such)"
        if problem is not None:
            taken = _take_out(model, adapter_name)
            after = f"adapter {adapter_name!r} " + ("(added for this load) was taken out again" if taken else "keeps its tensors")
            raise ValueError(f"the adapter checkpoint does not match this model: {problem}; nothing was loaded and "
                             f"{after} (was the adapter trained on another base or with another config?)")
        return {to_model.get(k, k): v for k, v in state_dict.items()}


def _versions(store: nn.Module) -> dict[int, int]:
    """Each tensor of ``store`` (by identity) and its version counter: what an in-place change, a
    load or a replaced tensor changes."""
    return {id(p): p._version for p in store.parameters()}


def _in_a_peft_load() -> bool:
    """Whether PEFT's ``PeftModel.from_pretrained`` or ``load_adapter`` is on the call stack (PEFT's
    public loaders, found by their code objects): an adapter added inside one was made for that load."""
    loaders = {_peft_model.PeftModel.from_pretrained.__func__.__code__, _peft_model.PeftModel.load_adapter.__code__}
    frame = sys._getframe(1)
    while frame is not None and frame.f_code not in loaders:
        frame = frame.f_back
    return frame is not None


def _take_out(model: nn.Module, adapter_name: str) -> bool:
    """After a load into adapter ``adapter_name`` failed: remove it if PEFT's loader added it for that
    load (from_pretrained, load_adapter under a new name) and it is untouched and frozen since, the
    whole method when it is the only one (base modules, trainable flags and all), else that adapter;
    whether it did. An adapter the user added (add_adapter, get_peft_model), or one that trains or was
    loaded or changed since, is kept as it is (a Trainer resuming from a checkpoint of another plan)."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, ShareLoRAModel):
        return False
    store = adapter_store(tuner.model, adapter_name)
    if any(p.requires_grad for p in store.parameters()) or tuner.__dict__.get("_as_added", {}).get(
            adapter_name) != _versions(store):
        return False
    if len(tuner.peft_config) > 1:
        model.delete_adapter(adapter_name)
        return True
    tuner.unload()
    for p, requires_grad in getattr(tuner, "_requires_grad_before", []):
        p.requires_grad_(requires_grad)
    return True


def register() -> None:
    """Make PEFT know the method: ``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained`` and the
    ``AutoPeftModelFor*`` classes then read ShareLoRA adapter folders (idempotent)."""
    _tables.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = ShareLoRAPeftConfig
    _tables.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = ShareLoRAModel
    _tables.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX


register()
