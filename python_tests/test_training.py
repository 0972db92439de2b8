"""Training stacks: transformers.Trainer with gradient checkpointing, and bitwise determinism."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

import sharelora_kernels as sk
from sharelora_kernels.model import adapter_tensors
from tiny_models import (METHOD_CONFIGS, TARGETS, TokenWindows, enable_checkpointing, randomize_adapters, tiny_model,
                         token_batch)



def test_apply_detects_checkpointing_already_on_without_deprecation_warnings(monkeypatch):
    """apply() reads the installed Transformers' checkpointing attribute (no deprecated alias: warnings
    are errors here) and, when checkpointing is on, lets gradient into reentrant blocks."""
    import warnings

    from sharelora_kernels.model import activation_checkpointing_on

    calls = []
    for on in (False, True):
        model = tiny_model()
        if on:
            enable_checkpointing(model, reentrant=True)
        assert activation_checkpointing_on(model) is on
        monkeypatch.setattr(model, "enable_input_require_grads", lambda: calls.append(on))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sk.apply(model, sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["lora"]))
    assert calls == [True]


def trained_with_trainer(tmp_path, checkpointing):
    model = tiny_model()
    if checkpointing:  # before apply, which then lets gradient into reentrant blocks (any Transformers version)
        enable_checkpointing(model, checkpointing == "reentrant")
    model = sk.apply(model, sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["similarity"]))
    randomize_adapters(model, std=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to=[], save_steps=2, logging_steps=1, use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenWindows())
    before = {k: v.detach().clone() for k, v in adapter_tensors(model).items()}
    trainer.train()
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(optimized) == len({id(p) for p in optimized}) == len(model.sharelora_plan.tensors)
    assert any((tmp_path / d).is_dir() for d in ("checkpoint-2", "checkpoint-3"))  # checkpoints save
    after = adapter_tensors(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    return {k: v.detach().clone() for k, v in after.items()}


def test_trainer_with_and_without_gradient_checkpointing(tmp_path):
    """Only adapters train; the optimizer sees each shared tensor once; both checkpointing modes give
    the same weights as none."""
    plain = trained_with_trainer(tmp_path / "plain", None)
    for mode in ("reentrant", "non_reentrant"):
        other = trained_with_trainer(tmp_path / mode, mode)
        for k in plain:
            torch.testing.assert_close(other[k], plain[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bishare_slice", "share_ab"])
def test_deterministic_runs_are_bitwise_equal(name):
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=TARGETS, dropout=0.1,
                                                              **METHOD_CONFIGS[name])).train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            for step in range(3):
                opt.zero_grad()
                ids = token_batch(seed=step)
                model(ids, labels=ids).loss.backward()
                opt.step()
            runs.append(adapter_tensors(model))
        assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", ["compose", "triton"])
def test_an_adapter_gradient_holds_no_more_memory_than_its_own(backend):
    """A Bi-Share module's paths share one stacked dA (R, K): a local A's .grad was a view of its rows,
    keeping the whole buffer alive until zero_grad (19x its size on the built-in model)."""
    model = sk.apply(tiny_model(layers=2), sk.ShareLoRAConfig(**METHOD_CONFIGS["bishare_slice"], target_modules=TARGETS))
    randomize_adapters(model)
    sk.ops.set_backend(backend)
    try:
        ids = token_batch()
        model.train()(input_ids=ids, labels=ids).loss.backward()
    finally:
        sk.ops.set_backend(None)
    grads = [p.grad for p in adapter_tensors(model).values()]
    storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
    assert sum(storages.values()) == sum(g.numel() * g.element_size() for g in grads)
