"""TrainerCallback: Trainer checkpoints are ShareLoRA checkpoints; resume_from_checkpoint continues bit-exactly."""
import pytest
import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainingArguments

import sharelora_kernels as sk
from sharelora_kernels.model import adapter_tensors
from tiny_models import TARGETS, TokenWindows, tiny_model, token_batch

CONFIG = dict(method="similarity", r=3, share_sets=[[1, 2, 3]], target_modules=TARGETS, dropout=0.1)



class StopAfter(TrainerCallback):
    """Ends training after ``step`` steps (a run killed after its checkpoint), schedule unchanged."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def trainer(out, max_steps, *callbacks):
    torch.manual_seed(0)
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(**CONFIG)).train()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps, learning_rate=1e-2,
                             report_to=[], save_steps=2, logging_steps=1, use_cpu=True, seed=0, data_seed=0)
    return Trainer(model=model, args=args, train_dataset=TokenWindows(12), callbacks=list(callbacks))


def weights(model):
    return {k: v.detach().clone() for k, v in adapter_tensors(model).items()}


@pytest.mark.parametrize("adapter_only", [False, True])
def test_checkpoints_load_and_resume_bit_exactly(adapter_only, tmp_path):
    straight = trainer(tmp_path / "straight", 4, sk.TrainerCallback(adapter_only=adapter_only))
    straight.train()
    final = weights(straight.model)

    first = trainer(tmp_path / "resumed", 4, sk.TrainerCallback(adapter_only=adapter_only), StopAfter(2))
    first.train()
    ckpt = tmp_path / "resumed" / "checkpoint-2"
    assert (ckpt / "adapter.safetensors").is_file() and (ckpt / "sharelora_config.json").is_file()
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    adapter_keys = [k for k in keys if k.startswith("sharelora_adapters.")]
    assert len(adapter_keys) == len(first.model.sharelora_plan.tensors)
    assert (len(keys) == len(adapter_keys)) == adapter_only  # adapter_only: no frozen base in the Trainer's file
    # load(fresh_model, checkpoint dir) gives the trained model's logits
    ids = token_batch(seed=3)
    first.model.eval()
    with torch.no_grad():
        assert torch.equal(sk.load(tiny_model(), ckpt)(ids).logits, first.model(ids).logits)
    # a fresh process would build the model again and resume: same weights, bit for bit
    resumed = trainer(tmp_path / "resumed", 4, sk.TrainerCallback(adapter_only=adapter_only))
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = weights(resumed.model)
    assert all(torch.equal(got[k], final[k]) for k in final)
    assert not all(torch.equal(got[k], weights(first.model)[k]) for k in got)  # and it did train on


def test_callback_refuses_a_model_without_adapters(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="no ShareLoRA adapters"):
        Trainer(model=tiny_model(), args=args, train_dataset=TokenWindows(12), callbacks=[sk.TrainerCallback()])
    with pytest.raises(ValueError, match="adapter_only must be true or false"):
        sk.TrainerCallback(adapter_only="yes")


def test_callback_refuses_a_peft_model_whose_heads_save_would_lack_at_init(tmp_path):
    """A PeftModel of the method keeping a task head in PEFT's wrappers: refused when the Trainer is
    made, not at its first checkpoint (after steps that would be lost)."""
    from peft import get_peft_model
    from tiny_models import tiny_family

    model = get_peft_model(tiny_family("bert", head="seq_cls", num_labels=3), sk.ShareLoRAPeftConfig(r=2, task_type="SEQ_CLS"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"modules to save in PEFT's wrappers \(\['classifier'\]\), which "
                                         r"TrainerCallback's save does not write"):
        Trainer(model=model, args=args, train_dataset=TokenWindows(12), callbacks=[sk.TrainerCallback()])
