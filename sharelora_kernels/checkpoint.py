"""save / load adapter checkpoints: one safetensors file, shared tensors stored once, no pickle.

``adapter.safetensors`` holds every plan tensor under its plan name, the state of each module
trained in full (``modules_to_save``) under ``modules_to_save/<module>.<tensor>``, and in its
metadata the config and the share plan (the authoritative copy, so weights and plan can never
disagree). A readable ``sharelora_config.json`` is written beside it. A module holding hand-wrapped
``SharedLoRALinear`` layers has no config: its checkpoint holds the plan read off the layers
(config ``null``, no JSON file; one left by an earlier save is removed) and loads into a module
wrapped the same way. The config written is the one ``apply`` read: a config edited since is refused
by name (``model.applied_config``), since the layers do not follow the edit.

A save changes the folder as one unit (``files.atomic_write_files``): both files are written in
full to temporary names beside their targets first, so a save that fails or is interrupted while
writing (a full disk, Ctrl-C) leaves the previous checkpoint intact; then they are renamed in
together, and a failing rename puts the previous files back. A full disk is an OSError (ENOSPC).
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ShareLoRAConfig
from .files import atomic_write_files
from .model import (ADAPTER_WRITERS, DEFAULT_ADAPTER, active_adapters, adapter_names, adapter_tensors, apply_plan,
                    applied_config, check_not_compiled, get_plan, is_applied, peft_wrappers, plan_model,
                    resolve_adapter, shared_layers)
from .plan import SharePlan

WEIGHTS_NAME = "adapter.safetensors"
SAVED_PREFIX = "modules_to_save/"
CONFIG_NAME = "sharelora_config.json"
FORMAT_VERSION = "1"


def save(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the model's adapter ``adapter_name`` (None: the active one) and modules to save into
    ``directory`` (any directory, e.g. a Trainer checkpoint's; created if needed); returns the
    weights path. The checkpoint holds no name: ``load`` gives it the name it is loaded under.
    A PeftModel keeping modules to save in PEFT's wrappers is refused (``check_no_peft_wrappers``)."""
    check_no_peft_wrappers(model, "save")
    if adapter_names(model):
        adapter_name = resolve_adapter(model, adapter_name)
        config: ShareLoRAConfig | None = applied_config(model, adapter_name)
    else:
        config = None
    plan = get_plan(model, adapter_name)
    adapters, saved = adapter_tensors(model, adapter_name), saved_state(model, plan)
    meta = sorted(name for name, t in (*adapters.items(), *saved.items()) if t.is_meta)
    if meta:
        raise ValueError(f"{len(meta)} tensor(s) to save are on the meta device (no values), e.g. {meta[0]!r}: "
                         "materialise the model first (model.to_empty(device=...) and its weights loaded)")
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in adapters.items()}
    tensors.update({SAVED_PREFIX + name: t.detach().to("cpu").contiguous() for name, t in saved.items()})
    metadata = {"format": "sharelora", "format_version": FORMAT_VERSION,
                "config": "null" if config is None else config.to_json(), "plan": json.dumps(plan.to_dict())}
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "save writes a folder, and a file is in its place", str(out))
    out.mkdir(parents=True, exist_ok=True)  # only once everything to write is made: no empty folder on an error
    writes = {out / WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata=metadata)}
    if config is not None:
        writes[out / CONFIG_NAME] = lambda tmp: Path(tmp).write_text(config.to_json() + "\n")
    atomic_write_files(writes, remove=[out / CONFIG_NAME])  # removed where it is not written: no config
    return out / WEIGHTS_NAME


def check_no_peft_wrappers(model: nn.Module, what: str) -> None:
    """ValueError naming the modules a PeftModel of the method keeps in PEFT's modules-to-save
    wrappers (``AuxiliaryTrainingWrapper``): ``what`` writes the modules to save of ``apply``'s plan,
    not PEFT's copies, so its file would lack them."""
    wrapped = [n for n, _ in peft_wrappers(model)]
    if wrapped:
        raise ValueError(f"this PeftModel keeps modules to save in PEFT's wrappers ({wrapped}), which {what} does "
                         "not write (its file would lack them): save it with save_pretrained")


def saved_state(model: nn.Module, plan: SharePlan) -> dict[str, torch.Tensor]:
    """``"<module>.<tensor>"`` -> tensor of every module trained in full (its state_dict, buffers included)."""
    return {f"{name}.{key}": t for name in plan.modules_to_save
            for key, t in model.get_submodule(name).state_dict().items()}


def read_checkpoint(directory: str | os.PathLike) -> tuple[ShareLoRAConfig | None, SharePlan, Path]:
    """Config (None for hand-wrapped layers) and plan stored in a checkpoint directory; ValueError
    naming the file (and the metadata field) if it is missing, damaged or hand-edited into something
    ``save`` does not write, or of a newer format version than this package reads."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"no ShareLoRA checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != "sharelora":
        raise ValueError(f"{path} is not a ShareLoRA checkpoint (no 'format: sharelora' in its metadata)")
    version = meta.get("format_version", FORMAT_VERSION)
    if not (version.isdigit() and len(version) <= 9 and int(version) >= 1):
        shown = repr(version[:20]) + ("..." if len(version) > 20 else "")
        raise ValueError(f"{path} has a damaged format_version {shown} (this version of sharelora_kernels writes "
                         f"{FORMAT_VERSION!r})")
    if int(version) > int(FORMAT_VERSION):
        raise ValueError(f"{path} has checkpoint format version {version}, newer than the version {FORMAT_VERSION} "
                         "this sharelora_kernels reads: upgrade sharelora_kernels to load it")
    for field in ("config", "plan"):
        if field not in meta:
            raise ValueError(f"{path} has damaged metadata: no {field!r}")
    try:
        config = None if meta["config"] == "null" else ShareLoRAConfig.from_json(meta["config"])
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} has damaged metadata: its 'config' is not a valid ShareLoRAConfig ({e})") from e
    try:
        plan = SharePlan.from_dict(json.loads(meta["plan"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} has damaged metadata: its 'plan' is not a valid share plan ({e})") from e
    return config, plan, path


@dataclass
class CheckedCheckpoint:
    """A checkpoint found to fit a model by ``check_checkpoint``: what ``load`` applies, with nothing left to fail.

    config / plan: the saved config (None for hand-wrapped layers) and the plan to load into;
    apply: the model has no adapter of that name yet, ``apply_plan(model, config, plan, adapter_name)``
    comes first; adapter_name: the adapter loaded into (None: a model of hand-wrapped layers);
    tensors: every tensor to load (plan names and ``modules_to_save/...`` names), on the CPU, each
    floating point and of its target's shape.
    """

    path: Path
    config: ShareLoRAConfig | None
    plan: SharePlan
    apply: bool
    adapter_name: str | None
    tensors: dict[str, torch.Tensor]


def check_checkpoint(model: nn.Module, directory: str | os.PathLike,
                     adapter_name: str | None = None) -> CheckedCheckpoint:
    """Everything ``load`` checks, without changing ``model``: the file and its format version, the
    plan against the model's (or the one ``apply`` would build), merged adapters, and every tensor
    read whole, present, of the right shape, none extra, the adapter tensors floating point and
    finite (a module to save's state of the model's kind). ValueError naming the first problem."""
    config, saved_plan, path = read_checkpoint(directory)
    names, given = adapter_names(model), adapter_name
    if adapter_name is None:
        adapter_name = resolve_adapter(model, None) if active_adapters(model) else DEFAULT_ADAPTER
    apply = adapter_name not in names and (is_applied(model) or not shared_layers(model))
    if apply:
        if config is None:
            raise ValueError(f"{path} holds hand-wrapped SharedLoRALinear layers (no config): wrap the same modules "
                             "of this model with SharedLoRALinear before load()")
        plan = plan_model(model, config, adapter_name)
        shapes = {name: tuple(spec.shape) for name, spec in plan.tensors.items()}
    else:
        adapter_name = adapter_name if names else None
        plan = get_plan(model, adapter_name if names else given)  # hand-wrapped: a name given is checked
        shapes = {name: tuple(p.shape) for name, p in adapter_tensors(model, adapter_name).items()}
    plan_mismatch(saved_plan, plan, str(path))
    _check_not_on_meta(model, plan, [] if apply else adapter_tensors(model, adapter_name).values())
    if any(m.merged for m in shared_layers(model)):
        raise ValueError("the model's adapters are merged into its weights: call unmerge(model) before load(), "
                         "or the merged weights would keep the old adapters")
    saved = {SAVED_PREFIX + name: t for name, t in saved_state(model, saved_plan).items()}
    shapes.update({name: tuple(t.shape) for name, t in saved.items()})
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            extra = sorted(stored - set(shapes))
            if extra:
                raise ValueError(f"{path} holds tensor {extra[0]!r}, which neither its plan nor the model has "
                                 f"({len(extra)} such): a hand-edited or foreign file")
            for name, shape in shapes.items():
                if name not in stored:
                    raise ValueError(f"{path} lacks tensor {name!r} of the model (shape {shape})")
                t = f.get_tensor(name)
                if name in saved:  # a module to save's own state: integer counters, masks of -inf are its own
                    if t.is_floating_point() != saved[name].is_floating_point():
                        raise ValueError(f"{path}: tensor {name!r} is {t.dtype}, the model's {saved[name].dtype}")
                elif not t.dtype.is_floating_point:
                    raise ValueError(f"{path}: tensor {name!r} is {t.dtype}; adapter tensors are floating point")
                if tuple(t.shape) != shape:
                    raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the model's {shape}")
                if name not in saved and not torch.isfinite(t).all():
                    raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values (the training that saved "
                                     "it diverged?)")
                tensors[name] = t
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path} could not be read completely ({e}); the file may be truncated") from e
    return CheckedCheckpoint(path, config, plan, apply, adapter_name, tensors)


def _check_not_on_meta(model: nn.Module, plan: SharePlan, adapters) -> None:
    """ValueError if what a load copies into is on the meta device (a model built under
    ``torch.device("meta")``), where a copy keeps no value: the target modules (whose device the
    adapters a load applies take), the modules to save, or the existing ``adapters`` (tensors)."""
    modules = [model.get_submodule(name) for name in (*plan.modules, *plan.modules_to_save)]
    if any(t.is_meta for t in (*(p for m in modules for p in m.parameters()), *adapters)):
        raise ValueError("the model's target modules or adapters are on the meta device, where loading keeps no "
                         "value: materialise the model first (model.to_empty(device=...) and its base weights "
                         "loaded), then load the adapters")


def load(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load adapters saved by ``save`` (or a Trainer checkpoint directory made with
    ``TrainerCallback``) into ``model`` as adapter ``adapter_name`` (None: the active one, or
    "default" on a model without adapters); applies the saved config first if the model has no
    adapter of that name (a second named adapter is added inactive, as ``apply`` adds it).

    Raises ValueError naming the first difference if the model's method, target modules, shapes,
    share plan or modules to save differ from the checkpoint's, if its adapters are merged, if a
    tensor is missing, extra, of the wrong shape, not floating point or not finite, if the checkpoint's format is newer
    than this package's, or if the file is truncated or corrupted. Everything is checked
    (``check_checkpoint``) before the model changes: a refused load leaves it as it was.
    """
    check_not_compiled(model, "load")
    checked = check_checkpoint(model, directory, adapter_name)
    if checked.apply:
        apply_plan(model, checked.config, checked.plan, adapter_name=checked.adapter_name)
    params = {**adapter_tensors(model, checked.adapter_name),
              **{SAVED_PREFIX + name: t for name, t in saved_state(model, checked.plan).items()}}
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(checked.tensors[name].to(param.dtype))
    return model


def plan_mismatch(saved: SharePlan, current: SharePlan, where: str) -> None:
    """Raise ValueError naming the first difference between two share plans."""
    def fail(what: str, a, b) -> None:
        raise ValueError(f"checkpoint {where} does not match the model: {what}: checkpoint has {a!r}, model has {b!r}")

    if saved.method != current.method:
        fail("method", saved.method, current.method)
    if saved.num_layers != current.num_layers:
        fail("number of layers", saved.num_layers, current.num_layers)
    if list(saved.modules) != list(current.modules):
        only_saved = sorted(set(saved.modules) - set(current.modules))
        only_model = sorted(set(current.modules) - set(saved.modules))
        counts = f"{len(saved.modules)} target modules in the checkpoint, {len(current.modules)} in the model"
        if only_saved:
            raise ValueError(f"checkpoint {where} does not match the model: the checkpoint has module {only_saved[0]!r}, "
                             f"which the model lacks ({len(only_saved)} such; {counts})")
        if only_model:
            raise ValueError(f"checkpoint {where} does not match the model: the model has module {only_model[0]!r}, "
                             f"which the checkpoint lacks ({len(only_model)} such; {counts})")
        fail("order of target modules", list(saved.modules), list(current.modules))
    if saved.modules_to_save != current.modules_to_save:
        fail("modules_to_save", saved.modules_to_save, current.modules_to_save)
    for name, m in saved.modules.items():  # shapes first: a module's paths follow from every module's shape
        if m.info != current.modules[name].info:
            fail(f"module {name}", m.info, current.modules[name].info)
    for name, m in saved.modules.items():
        c = current.modules[name]
        if len(m.paths) != len(c.paths):
            fail(f"number of paths of module {name}", len(m.paths), len(c.paths))
        for i, (p, q) in enumerate(zip(m.paths, c.paths)):
            fields = asdict(p)  # the rank before the scale, which follows from it (alpha / r)
            for field, value in sorted(fields.items(), key=lambda item: item[0] == "scale"):
                if value != getattr(q, field):
                    fail(f"{field} of path {i} ({p.kind}, {p.part}) of module {name}", value, getattr(q, field))
    for name, t in saved.tensors.items():
        if name not in current.tensors:
            fail("tensor set", name, "no such tensor")
        if t.shape != current.tensors[name].shape:
            fail(f"shape of tensor {name}", t.shape, current.tensors[name].shape)


ADAPTER_WRITERS.append(lambda model, folder, name: save(model, folder, name))  # a Transformers model's save_pretrained
