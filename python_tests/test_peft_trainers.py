"""The PEFT method under Transformers' Trainer (bf16 on a bitsandbytes 4-bit base) and TRL's
SFTTrainer(peft_config=...): training, the adapter folders in checkpoints, bit-exact resume (CPU)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments  # noqa: E402

import sharelora_kernels as sk  # noqa: E402
from tiny_models import TARGETS, TokenWindows, tiny_model, token_batch  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
CONFIG = dict(method="bishare", local_r=1, intra_r=2, inter_r=3, target_modules=TARGETS, task_type="CAUSAL_LM")


def adapter_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "sharelora_adapters" in n}


@pytest.fixture(scope="module")
def nf4(tmp_path_factory):
    """A tiny LLaMA saved in float32 and loaded in bitsandbytes nf4 (compute dtype bfloat16)."""
    folder = tmp_path_factory.mktemp("base")
    tiny_model(layers=2).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")


def trainer(model, out, max_steps, **kw):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps, learning_rate=5e-2,
                             report_to=[], save_steps=2, logging_steps=1, use_cpu=True, seed=0, data_seed=0, bf16=True,
                             **kw)
    return Trainer(model=model, args=args, train_dataset=TokenWindows(8))


def test_trainer_bf16_on_a_4bit_base_checkpoints_and_resumes_bit_exactly(nf4, tmp_path):
    torch.manual_seed(0)
    straight = trainer(get_peft_model(copy.deepcopy(nf4), sk.ShareLoRAPeftConfig(**CONFIG)), tmp_path / "a", 4)
    straight.train()
    final = adapter_weights(straight.model)
    assert any(t.abs().max() > 0 for n, t in final.items() if n.endswith("/B"))  # it trained
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    torch.manual_seed(0)
    resumed = trainer(get_peft_model(copy.deepcopy(nf4), sk.ShareLoRAPeftConfig(**CONFIG)), tmp_path / "b", 4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert adapter_weights(resumed.model).keys() == final.keys()
    assert all(torch.equal(adapter_weights(resumed.model)[k], v) for k, v in final.items())
    loaded = PeftModel.from_pretrained(copy.deepcopy(nf4), tmp_path / "a" / "checkpoint-4").train()
    ids = token_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(loaded(ids).logits, straight.model.train()(ids).logits)


def test_sft_trainer_with_peft_config_trains_saves_and_resumes(tmp_path):
    """On the built-in tiny LLaMA and its tokenizer, text in, as a TRL user runs it."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    from sharelora_kernels.data import calibration_texts, default_model_dir

    data = Dataset.from_dict({"text": calibration_texts(8)})

    def sft(out, max_steps):
        torch.manual_seed(0)
        args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps, learning_rate=5e-2,
                             report_to=[], save_steps=2, logging_steps=1, use_cpu=True, seed=0, data_seed=0,
                             max_length=32)
        return trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(default_model_dir()), args=args,
                              train_dataset=data, processing_class=AutoTokenizer.from_pretrained(default_model_dir()),
                              peft_config=sk.ShareLoRAPeftConfig(method="share_a", r=4, task_type="CAUSAL_LM"))
    straight = sft(tmp_path / "a", 4)
    assert isinstance(straight.model, PeftModel)
    straight.train()
    final = adapter_weights(straight.model)
    assert any(t.abs().max() > 0 for n, t in final.items() if n.endswith("/B"))
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed = sft(tmp_path / "b", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert all(torch.equal(adapter_weights(resumed.model)[k], v) for k, v in final.items())


def test_dpo_trainer_given_a_pretrained_adapter_uses_a_copy_of_it_as_reference(tmp_path):
    """TRL's preference trainers, given a PeftModel with a trained adapter and no ref_model, add an
    adapter "ref" and copy every tensor named ``.default.`` into its ``.ref.`` twin: the reference is
    the adapter as it was, not the bare base."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.trainer.utils import use_adapter

    from sharelora_kernels.data import default_model_dir

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(default_model_dir()),
                           sk.ShareLoRAPeftConfig(method="bishare", local_r=1, intra_r=2, inter_r=3, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # a trained adapter, as an SFT run leaves it
    ids = token_batch()
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert not torch.allclose(tuned, base, atol=1e-3)
    data = Dataset.from_dict({"prompt": ["the cat", "a dog"], "chosen": [" sat down", " ran off"],
                              "rejected": [" flew up", " sang loud"]})
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                         use_cpu=True, max_length=16, learning_rate=1e-2)
    dpo = trl.DPOTrainer(model=model, args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(default_model_dir()))
    assert "ref" in model.peft_config
    with torch.no_grad(), use_adapter(model, "ref"):
        reference = model(ids).logits
    torch.testing.assert_close(reference, tuned, rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    dpo.train()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n.replace(".default.", ".ref.")], t) for n, t in before.items())  # the reference stays
    assert any(not torch.equal(after[n], t) for n, t in before.items())  # the adapter trains
