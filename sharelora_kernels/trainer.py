"""TrainerCallback: every Transformers Trainer (or TRL SFTTrainer) checkpoint is also a ShareLoRA checkpoint.

The Trainer saves the model's state_dict, which holds the adapters (the store is a child of the
model), and the optimizer, scheduler and RNG states, so ``resume_from_checkpoint`` continues
training exactly; this callback adds ``sharelora_kernels.save``'s files (adapters, modules to
save, config and plan) to each ``checkpoint-N`` directory, so ``load(fresh_model, "out/checkpoint-N")``
works. With ``adapter_only=True`` the Trainer's own weights file holds only the adapters and the
modules to save, not the frozen base (and resuming still works: the base comes from the model).
A checkpoint of another share plan is refused when the Trainer loads it (``AdapterStore``).
"""
from __future__ import annotations

import logging
import os

import transformers

from .checkpoint import check_no_peft_wrappers, save, saved_state
from .model import (ADAPTER_ONLY_ATTR, SavePretrainedWithAdapters, adapter_folders, adapter_names, adapter_store,
                    get_plan)

TRAINER_LOGGER = "transformers.trainer"  # where the Trainer warns of keys missing from a checkpoint it loads


class TrainerCallback(transformers.TrainerCallback):
    """``Trainer(..., callbacks=[sharelora_kernels.TrainerCallback()])``.

    adapter_only: the checkpoints' ``model.safetensors`` leave the frozen base out: a save into
    one of the Trainer's checkpoint folders (``<output_dir>/checkpoint-N``, whatever the save
    strategy) puts the base's keys into the model's ``_keys_to_ignore_on_save`` for that write
    (``model.left_out_of``); any other save writes the whole model (a ``save_pretrained`` of
    yours, after training or an interrupted one). Every adapter's tensors are kept, whichever is
    active when the Trainer saves. Loading such a checkpoint (resume, ``load_best_model_at_end``)
    finds exactly the base missing, by design: the Trainer's warning of it is dropped. Without it
    the Trainer saves the whole model, as usual.
    """

    def __init__(self, adapter_only: bool = False):
        if not isinstance(adapter_only, bool):
            raise ValueError(f"adapter_only must be true or false, got {adapter_only!r}")
        self.adapter_only = adapter_only
        self._quiet: logging.Filter | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._start(args, model)  # before a resume_from_checkpoint reads the weights file

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start(args, model)  # for a callback added after the Trainer was made

    def _start(self, args, model) -> None:
        if not adapter_names(model):  # several adapters may train together (set_adapter); each is saved
            get_plan(model)  # a model without adapters fails here, not at the first checkpoint
        check_no_peft_wrappers(model, "TrainerCallback's save")  # nor one whose heads save would lack
        if not self.adapter_only:
            return
        if not isinstance(model, transformers.PreTrainedModel):
            raise ValueError(f"adapter_only saves need a Transformers model (its save_pretrained leaves keys out), "
                             f"not a {type(model).__name__}")
        keys = base_keys(model)
        model.__dict__[ADAPTER_ONLY_ATTR] = (args.output_dir, frozenset(keys))  # read by its save_pretrained,
        if not isinstance(model.__dict__.get("save_pretrained"), SavePretrainedWithAdapters):
            model.save_pretrained = SavePretrainedWithAdapters(model)  # which a hand-wrapped model gets here
        if self._quiet is None:
            self._quiet = _QuietLoadOfBase([k for k in model.state_dict() if k in keys])
            logging.getLogger(TRAINER_LOGGER).addFilter(self._quiet)

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            # every adapter where save_pretrained puts it ("default" in the folder, the others in subfolders)
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            for name, where in (adapter_folders(model, folder) or {None: folder}).items():
                save(model, where, name)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._quiet is not None:
            logging.getLogger(TRAINER_LOGGER).removeFilter(self._quiet)
            self._quiet = None


def base_keys(model) -> set[str]:
    """The state_dict keys of everything but the adapters (every named adapter's tensors, trained or
    not, or a hand-wrapped model's trainable ones) and the modules to save."""
    names = adapter_names(model)
    if names:
        ours = {id(p) for n in names for p in adapter_store(model, n).parameters()}
        keep = {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ours}
        keep |= {k for n in names for k in saved_state(model, model.sharelora_plans[n])}
    else:
        keep = {n for n, p in model.named_parameters() if p.requires_grad} | set(saved_state(model, get_plan(model)))
    return {k for k in model.state_dict() if k not in keep}


class _QuietLoadOfBase(logging.Filter):
    """Drops the Trainer's warning that a checkpoint it loaded lacks exactly ``keys`` (an adapter_only
    checkpoint leaves the frozen base out by design); any other missing keys are still reported."""

    def __init__(self, keys: list[str]):
        super().__init__()
        self.message = f"There were missing keys in the checkpoint model loaded: {keys}."

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message
