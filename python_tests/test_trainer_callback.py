"""TrainerCallback: Trainer checkpoints are ShareLoRA checkpoints; resume_from_checkpoint continues bit-exactly."""
import logging

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


class Records(logging.Handler):
    """The messages the Trainer's logger lets through (its filters applied)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_adapter_only_resume_loads_quietly_and_keeps_the_adapter_that_trains(tmp_path):
    """The adapter made active after the Trainer was built is the one its checkpoints keep; resuming
    from them finds exactly the frozen base missing, by design: no warning listing it."""
    torch.manual_seed(0)
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(r=2, target_modules=TARGETS), adapter_name="first")
    sk.apply(model, sk.ShareLoRAConfig(r=3, target_modules=["q_proj"]), adapter_name="second")
    def args(steps):
        return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps, report_to=[],
                                 save_steps=2, use_cpu=True, seed=0)

    run = Trainer(model=model.train(), args=args(2), train_dataset=TokenWindows(12),
                  callbacks=[sk.TrainerCallback(adapter_only=True)])
    sk.set_adapter(model, "second")
    run.train()
    with safe_open(str(tmp_path / "checkpoint-2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {k for k in model.state_dict() if "sharelora_adapters" in k} == keys  # both adapters, nothing else
    records = Records()
    logging.getLogger("transformers.trainer").addHandler(records)
    try:
        again = Trainer(model=model, args=args(3), train_dataset=TokenWindows(12),
                        callbacks=[sk.TrainerCallback(adapter_only=True)])
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    finally:
        logging.getLogger("transformers.trainer").removeHandler(records)
    assert not [m for m in records.messages if "missing keys" in m]


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["interrupted", "never_trained", "trained"])
def test_adapter_only_leaves_the_model_saving_whole_outside_the_trainers_checkpoints(how, tmp_path):
    """Whatever ends the Trainer's use (an interrupt, no train() at all, the end of training), the
    model's own save_pretrained writes the base too."""
    run = trainer(tmp_path / "out", 4, sk.TrainerCallback(adapter_only=True),
                  *([Interrupt()] if how == "interrupted" else []))
    if how == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            run.train()
    elif how == "trained":
        run.train()
    run.model.save_pretrained(tmp_path / "mine")
    with safe_open(str(tmp_path / "mine" / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in set(f.keys())



class FailingEvaluation(TrainerCallback):
    def on_evaluate(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


@pytest.mark.parametrize("strategy", ["steps", "best"])
def test_adapter_only_checkpoints_of_every_save_strategy_and_a_failed_evaluation(strategy, tmp_path):
    """save_strategy "best" decides to save after evaluating, and an evaluation can fail right before a
    save: the checkpoints still leave the base out, and the model's own save_pretrained after the
    failure writes it."""
    torch.manual_seed(0)
    model = sk.apply(tiny_model(), sk.ShareLoRAConfig(**CONFIG)).train()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4,
                             report_to=[], save_strategy=strategy, eval_strategy="steps", eval_steps=2, save_steps=2,
                             metric_for_best_model="eval_loss", use_cpu=True, seed=0)
    run = Trainer(model=model, args=args, train_dataset=TokenWindows(12), eval_dataset=TokenWindows(4),
                  callbacks=[sk.TrainerCallback(adapter_only=True)])
    run.train()
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints
    for folder in checkpoints:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert all("sharelora_adapters" in k for k in f.keys()), folder.name
    failing = Trainer(model=model, args=args, train_dataset=TokenWindows(12), eval_dataset=TokenWindows(4),
                      callbacks=[sk.TrainerCallback(adapter_only=True), FailingEvaluation()])
    with pytest.raises(KeyboardInterrupt):
        failing.train()  # at step 2: its evaluation, then its save
    model.save_pretrained(tmp_path / "mine")
    with safe_open(str(tmp_path / "mine" / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in set(f.keys())


def test_resuming_a_checkpoint_of_another_plan_is_refused_by_name(tmp_path):
    """Transformers loads a Trainer checkpoint non-strictly: another plan's adapters would load nothing and the
    optimizer would step the other plan's states (a crash); the store refuses them first."""
    first = trainer(tmp_path / "a", 2, sk.TrainerCallback())
    first.train()
    torch.manual_seed(0)
    other = sk.apply(tiny_model(), sk.ShareLoRAConfig(method="share_b", r=3, target_modules=TARGETS)).train()
    args = TrainingArguments(output_dir=str(tmp_path / "b"), per_device_train_batch_size=2, max_steps=4,
                             report_to=[], use_cpu=True)
    run = Trainer(model=other, args=args, train_dataset=TokenWindows(12), callbacks=[sk.TrainerCallback()])
    with pytest.raises(RuntimeError, match="adapter tensors under 'sharelora_adapters.default.' are not this model's"):
        run.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    base = tiny_model().state_dict()  # the base alone still loads into an applied model, as before
    other.load_state_dict(base, strict=False)


@pytest.mark.parametrize("training", [["other"], ["default", "other"]], ids=["other", "both"])
@pytest.mark.parametrize("adapter_only", [False, True])
def test_checkpoints_keep_each_named_adapter_in_its_place_whichever_trains(training, adapter_only, tmp_path):
    """With adapter "other" training (or both: the callback refused two active adapters), a checkpoint
    still holds "default" in its folder and "other" in its subfolder (save_pretrained's layout): the
    callback does not write the active one over "default"."""
    from tiny_models import logits, randomize_adapters

    model = tiny_model()
    sk.apply(model, sk.ShareLoRAConfig(target_modules=["q_proj"], r=2))
    sk.apply(model, sk.ShareLoRAConfig(method="share_a", target_modules=["q_proj", "v_proj"], r=3), adapter_name="other")
    randomize_adapters(model)
    sk.set_adapter(model, "other")
    randomize_adapters(model, seed=5)
    sk.set_adapter(model, training)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, save_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, learning_rate=0.0)
    Trainer(model=model.train(), args=args, train_dataset=TokenWindows(4),
            callbacks=[sk.TrainerCallback(adapter_only)]).train()
    ids = token_batch()
    checkpoint = tmp_path / "checkpoint-1"
    for name, folder in (("default", checkpoint), ("other", checkpoint / "other")):
        sk.set_adapter(model, name)
        assert torch.equal(logits(sk.load(tiny_model(), folder), ids), logits(model, ids)), name
