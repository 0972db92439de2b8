"""TrainerCallback: every Transformers Trainer (or TRL SFTTrainer) checkpoint is also a ShareLoRA checkpoint.

The Trainer saves the model's state_dict, which holds the adapters (the store is a child of the
model), and the optimizer, scheduler and RNG states, so ``resume_from_checkpoint`` continues
training exactly; this callback adds ``sharelora_kernels.save``'s files (adapters, modules to
save, config and plan) to each ``checkpoint-N`` directory, so ``load(fresh_model, "out/checkpoint-N")``
works. With ``adapter_only=True`` the Trainer's own weights file holds only the adapters and the
modules to save, not the frozen base (and resuming still works: the base comes from the model).
"""
from __future__ import annotations

import os

import transformers

from .checkpoint import check_no_peft_wrappers, save, saved_state
from .model import get_plan


class TrainerCallback(transformers.TrainerCallback):
    """``Trainer(..., callbacks=[sharelora_kernels.TrainerCallback()])``.

    adapter_only: the checkpoints' ``model.safetensors`` leave the frozen base out (for a
    Transformers model: the keys go to its ``_keys_to_ignore_on_save`` during training, as the
    model's own ignored keys do). Without it the Trainer saves the whole model, as usual.
    """

    def __init__(self, adapter_only: bool = False):
        if not isinstance(adapter_only, bool):
            raise ValueError(f"adapter_only must be true or false, got {adapter_only!r}")
        self.adapter_only = adapter_only
        self._ignored_before = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._start(model)  # before a resume_from_checkpoint reads the weights file

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._start(model)  # for a callback added after the Trainer was made

    def _start(self, model) -> None:
        plan = get_plan(model)  # a model without adapters fails here, not at the first checkpoint
        check_no_peft_wrappers(model, "TrainerCallback's save")  # nor one whose heads save would lack
        if self.adapter_only and self._ignored_before is None:
            if not isinstance(model, transformers.PreTrainedModel):
                raise ValueError(f"adapter_only saves need a Transformers model (its save_pretrained leaves keys out), "
                                 f"not a {type(model).__name__}")
            keep = {n for n, p in model.named_parameters() if p.requires_grad} | set(saved_state(model, plan))
            self._ignored_before = (model._keys_to_ignore_on_save,)
            model._keys_to_ignore_on_save = {k for k in model.state_dict() if k not in keep}

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            save(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._ignored_before is not None:
            model._keys_to_ignore_on_save = self._ignored_before[0]
            self._ignored_before = None
