"""save / load: round trip, shared tensors stored once, atomic writes, every mismatch named."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

import sharelora_kernels as sk
import sharelora_kernels.checkpoint as ckpt
from sharelora_kernels.model import adapter_tensors
from tiny_models import METHOD_CONFIGS, TARGETS, randomize_adapters, tiny_model, token_batch


def trained(name="bishare_gate", arch="llama", **overrides):
    model = sk.apply(tiny_model(arch), sk.ShareLoRAConfig(target_modules=TARGETS, **{**METHOD_CONFIGS[name], **overrides}))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("name", ["similarity", "share_ab", "bishare_slice", "bishare_kron"])
def test_round_trip_into_fresh_model(name, tmp_path):
    model = trained(name)
    sk.save(model, tmp_path)
    with safe_open(str(tmp_path / ckpt.WEIGHTS_NAME), "pt") as f:
        assert sorted(f.keys()) == sorted(model.sharelora_plan.tensors)  # each shared tensor once
    loaded = sk.load(tiny_model(), tmp_path)  # applies the saved config itself
    ids = token_batch()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert sk.ShareLoRAConfig.from_json((tmp_path / ckpt.CONFIG_NAME).read_text()) == model.sharelora_config



def test_a_model_on_the_meta_device_is_refused_then_loads_once_materialised(tmp_path):
    """Copying into meta tensors keeps nothing: a model built under torch.device("meta") is refused
    (with or without its adapters applied there), and loads exactly once materialised."""
    model = trained("bishare_kron")
    sk.save(model, tmp_path)
    with torch.device("meta"):
        meta = tiny_model()
    with pytest.raises(ValueError, match="on the meta device, where loading keeps no value: materialise the model"):
        sk.load(meta, tmp_path)
    assert not hasattr(meta, "sharelora_plans")  # refused before the config was applied
    sk.apply(meta, model.sharelora_config)
    with pytest.raises(ValueError, match="on the meta device"):
        sk.load(meta, tmp_path)
    with pytest.raises(ValueError, match=r"tensor\(s\) to save are on the meta device \(no values\)"):
        sk.save(meta, tmp_path / "from_meta")
    assert not (tmp_path / "from_meta").exists()
    meta.to_empty(device="cpu")
    meta.load_state_dict(model.state_dict())  # the base weights
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # rotary tables are not in a state dict
            meta.get_buffer(name).copy_(buffer)
        for p in adapter_tensors(meta).values():
            p.fill_(float("nan"))  # what the load must overwrite
    sk.load(meta, tmp_path)
    ids = token_batch()
    torch.testing.assert_close(meta(ids).logits, model(ids).logits, rtol=0, atol=0)

@pytest.mark.parametrize("share_sets", [[[3, 1]], [[np.int64(0), np.int64(1)]]])
def test_share_sets_assigned_after_construction_round_trip(share_sets, tmp_path):
    config = sk.ShareLoRAConfig(method="similarity", r=2, target_modules=["q_proj"])
    config.share_sets = share_sets
    model = sk.apply(tiny_model(), config)
    randomize_adapters(model)
    sk.save(model, tmp_path)
    ids = token_batch()
    torch.testing.assert_close(sk.load(tiny_model(), tmp_path)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_config_edited_after_apply_is_refused_before_any_file(tmp_path):
    """The layers follow the config as apply read it: a checkpoint of the edited one would not load
    (or would build other layers), so save names the change and writes nothing."""
    model = trained("similarity")
    r = model.sharelora_config.r
    model.sharelora_config.r = r + 2
    with pytest.raises(ValueError, match=f"config of adapter 'default' was changed after apply \\(r: {r} -> {r + 2}\\)"):
        sk.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.sharelora_config.r = r  # set back: saves, and loads into the same model
    sk.save(model, tmp_path / "out")
    ids = token_batch()
    torch.testing.assert_close(sk.load(tiny_model(), tmp_path / "out")(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_config_edited_and_applied_again_leaves_the_first_model_as_applied(tmp_path):
    """apply keeps its own copy of the config: the caller's, edited and applied to a second model (what
    the refusal above advises), no longer changed the first model's, whose save was then refused."""
    config = sk.ShareLoRAConfig(method="lora", r=4, target_modules=["q_proj"])
    first = sk.apply(tiny_model(), config)
    config.r = 2
    second = sk.apply(tiny_model(), config)
    assert (first.sharelora_config.r, second.sharelora_config.r) == (4, 2)
    randomize_adapters(first)
    sk.save(first, tmp_path)
    ids = token_batch()
    torch.testing.assert_close(sk.load(tiny_model(), tmp_path)(ids).logits, first(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("other, match", [
    (dict(name="lora"), "method"),
    (dict(name="bishare_gate", gate_dims=(8, 16)), "shape|paths"),
    (dict(name="bishare_gate", target_modules=["q_proj", "v_proj"]), "target modules"),
    (dict(name="similarity", share_sets=[[0, 1]]), "tensors of path 0 .plain, lora. of module"),
])
def test_mismatched_model_is_named(other, match, tmp_path):
    sk.save(trained("bishare_gate") if other["name"] != "similarity" else trained("similarity"), tmp_path)
    name = other.pop("name")
    target = sk.apply(tiny_model(), sk.ShareLoRAConfig(**{**METHOD_CONFIGS[name], "target_modules": TARGETS, **other}))
    with pytest.raises(ValueError, match=match):
        sk.load(target, tmp_path)


def test_a_module_of_another_shape_is_named_not_the_slice_offsets_it_moves(tmp_path):
    """A wider MLP moves every shared slice window (offsets centre on the widest module): the error
    names the module whose shape differs, not a q_proj offset that follows from it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sk.save(trained("bishare_slice"), tmp_path)
    wide = LlamaForCausalLM(LlamaConfig(**{**tiny_model().config.to_dict(), "intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"module model\.layers\.0\.mlp\.up_proj: checkpoint has .*out_features=48.*"
                                         r"model has .*out_features=64"):
        sk.load(sk.apply(wide, sk.ShareLoRAConfig(target_modules=TARGETS, **METHOD_CONFIGS["bishare_slice"])), tmp_path)


def test_other_architecture_is_named(tmp_path):
    sk.save(trained("lora"), tmp_path)
    with pytest.raises(ValueError, match="number of layers"):
        sk.load(tiny_model(layers=3), tmp_path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    sk.save(trained(), tmp_path)
    path = tmp_path / ckpt.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|readable"):
        sk.load(tiny_model(), tmp_path)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        sk.load(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match="no ShareLoRA checkpoint"):
        sk.load(tiny_model(), tmp_path / "missing")


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = trained()
    sk.save(first, tmp_path)
    before = (tmp_path / ckpt.WEIGHTS_NAME).read_bytes()
    second = trained()
    randomize_adapters(second, seed=7)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed midway")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        sk.save(second, tmp_path)
    assert (tmp_path / ckpt.WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.WEIGHTS_NAME, ckpt.CONFIG_NAME]
    monkeypatch.undo()
    ids = token_batch()
    torch.testing.assert_close(sk.load(tiny_model(), tmp_path)(ids).logits, first(ids).logits, rtol=0, atol=0)


def checkpoint_files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_save_failing_on_its_second_file_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """Weights and sharelora_config.json change together: a full disk on the second file keeps both old ones."""
    import errno

    import sharelora_kernels.files as files

    sk.save(trained("lora"), tmp_path)
    before = checkpoint_files(tmp_path)
    original = files._written_temp

    def full_on_config(path, write):
        if path.name == ckpt.CONFIG_NAME:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, write)

    monkeypatch.setattr(files, "_written_temp", full_on_config)
    with pytest.raises(OSError, match="No space left"):
        sk.save(trained("bishare_slice"), tmp_path)
    assert checkpoint_files(tmp_path) == before


def test_a_failing_rename_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    import os

    import sharelora_kernels.files as files

    sk.save(trained("lora"), tmp_path)
    before = checkpoint_files(tmp_path)
    original = os.replace

    def refuse_config(source, target):
        if str(source).endswith(".tmp") and os.path.basename(target) == ckpt.CONFIG_NAME and "aside" not in str(source):
            raise PermissionError(1, "Operation not permitted", str(target))
        return original(source, target)

    monkeypatch.setattr(files.os, "replace", refuse_config)
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "aside")  # tells the second names apart
    with pytest.raises(PermissionError):
        sk.save(trained("bishare_slice"), tmp_path)  # the weights are renamed in first, then put back
    assert checkpoint_files(tmp_path) == before


def test_a_config_less_save_removes_the_config_of_an_earlier_save(tmp_path):
    """Hand-wrapped layers have no config: a sharelora_config.json left would describe another adapter."""
    import torch.nn as nn

    sk.save(trained("lora"), tmp_path)
    wrapped = nn.Sequential(sk.SharedLoRALinear(nn.Linear(8, 8), r=2, alpha=4))
    sk.save(wrapped, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.WEIGHTS_NAME]
    assert ckpt.read_checkpoint(tmp_path)[0] is None


@pytest.mark.parametrize("what", ["save", "export_peft"])
def test_a_full_disk_in_safetensors_is_an_oserror_naming_the_file(what, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError "... (os error 28)": save and export_peft raise it
    as the OSError any other write gives (ENOSPC, the file), and the previous files stay."""
    import errno

    from safetensors import SafetensorError

    import sharelora_kernels.export as export

    model = trained("lora")
    write = sk.save if what == "save" else sk.export_peft
    write(model, tmp_path)
    before = checkpoint_files(tmp_path)

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt if what == "save" else export, "save_file", full)
    with pytest.raises(OSError) as raised:
        write(model, tmp_path)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename.startswith(str(tmp_path))
    assert checkpoint_files(tmp_path) == before


def test_scale_mismatch_names_the_field(tmp_path):
    """Paths that differ only in alpha (the scale) name that field and both values."""
    sk.save(trained("lora"), tmp_path)
    target = sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=TARGETS, **{**METHOD_CONFIGS["lora"], "alpha": 7.0}))
    with pytest.raises(ValueError, match=r"scale of path 0 \(plain, lora\) of module .*q_proj: checkpoint has 5.33.*"
                                         r"model has 2.33"):
        sk.load(target, tmp_path)


def test_load_keeps_eval_mode_and_refuses_merged_adapters(tmp_path):
    model = trained("bishare_slice", dropout=0.3)
    sk.save(model, tmp_path)
    loaded = sk.load(tiny_model(), tmp_path)  # tiny_model() is in eval mode: dropout must stay off
    assert not any(m.training for m in loaded.modules())
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, loaded(ids).logits)
    base_weight = loaded.model.layers[0].self_attn.q_proj.weight.clone()
    sk.merge(loaded)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        sk.load(loaded, tmp_path)
    sk.unmerge(loaded)
    torch.testing.assert_close(loaded.model.layers[0].self_attn.q_proj.weight, base_weight)


def test_failed_load_leaves_the_model_untouched(tmp_path):
    sk.save(trained("lora"), tmp_path)
    model = tiny_model(layers=3)
    with pytest.raises(ValueError, match="number of layers"):
        sk.load(model, tmp_path)
    assert getattr(model, "sharelora_plan", None) is None
    assert not any(isinstance(m, sk.SharedLoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_written_files_get_the_usual_permissions(tmp_path):
    """Checkpoint and export files are readable by a serving process of another user, as a plain
    open() would make them (umask applied), not mkstemp's owner-only 0600."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        sk.save(trained("lora"), tmp_path / "ckpt")
        sk.export_peft(trained("lora"), tmp_path / "peft")
    finally:
        os.umask(old)
    for path in [*(tmp_path / "ckpt").iterdir(), *(tmp_path / "peft").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_checkpoint_from_before_the_targeting_fields_still_loads(tmp_path):
    """A checkpoint whose config lacks exclude_modules & co. and whose plan lacks stacks and
    modules_to_save (the format before them) loads with the same outputs."""
    import json

    from safetensors.torch import load_file, save_file

    model = trained("similarity")
    sk.save(model, tmp_path)
    path = tmp_path / ckpt.WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    config = {k: v for k, v in json.loads(meta["config"]).items()
              if k not in ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "rank_pattern",
                           "alpha_pattern")}
    config["target_modules"] = TARGETS
    plan = json.loads(meta["plan"])
    del plan["modules_to_save"]
    for m in plan["modules"].values():
        del m["info"]["stack"]
    save_file(load_file(str(path)), str(path), metadata={**meta, "config": json.dumps(config), "plan": json.dumps(plan)})
    ids = token_batch()
    torch.testing.assert_close(sk.load(tiny_model(), tmp_path)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_modules_to_save_mismatch_is_named(tmp_path):
    from tiny_models import tiny_family

    model = sk.apply(tiny_family("llama", "seq_cls", num_labels=2, pad_token_id=0),
                     sk.ShareLoRAConfig(r=2, target_modules=["q_proj"]))
    sk.save(model, tmp_path)
    other = sk.apply(tiny_family("llama", "seq_cls", num_labels=2, pad_token_id=0),
                     sk.ShareLoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=[]))
    with pytest.raises(ValueError, match=r"modules_to_save: checkpoint has \['score'\], model has \[\]"):
        sk.load(other, tmp_path)
    with pytest.raises(ValueError, match="serves LoRA adapters only, not modules trained in full"):
        sk.export_peft(model, tmp_path / "served", serving="vllm")


# ------------------------------------------------------------------ a refused load changes nothing
def snapshot(model):
    """Everything a load could change: state dict (values), module tree, attributes, grad flags, modes."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "tree": [(n, type(m).__name__) for n, m in model.named_modules()],
            "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
            "plan": getattr(model, "sharelora_plan", None),
            "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "training": [m.training for m in model.modules()]}


def assert_unchanged(before, model):
    after = snapshot(model)
    assert after["tree"] == before["tree"] and after["attrs"] == before["attrs"]
    assert after["plan"] is before["plan"] and after["grad"] == before["grad"] and after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name


def rewrite(directory, tensors=lambda t: t, metadata=lambda m: m):
    """Rewrite a saved checkpoint's weights file with its tensors / metadata changed."""
    from safetensors.torch import load_file, save_file

    path = directory / ckpt.WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors(load_file(str(path))), str(path), metadata=metadata(dict(meta)))


def other_trained(name="bishare_gate"):
    """Adapters of the same plan, other values than ``trained``'s: a load that copies any tensor shows."""
    model = trained(name)
    randomize_adapters(model, seed=7)
    return model


def last_tensor(tensors):
    return sorted(tensors)[-1]


def reshaped(tensors):
    name = last_tensor(tensors)
    return {**tensors, name: torch.randn(tensors[name].shape[0] + 1, *tensors[name].shape[1:])}


def edited(field, **changes):
    """A metadata change: the JSON of ``field`` ("config" / "plan") with ``changes``."""
    import json

    return lambda m: {**m, field: json.dumps({**json.loads(m[field]), **changes})}


REFUSALS = {
    "wrong shape": (dict(tensors=reshaped), r"tensor '.*' has shape"),
    "missing tensor": (dict(tensors=lambda t: {k: v for k, v in t.items() if k != last_tensor(t)}), r"lacks tensor '"),
    "int32 tensor": (dict(tensors=lambda t: {**t, last_tensor(t): (t[last_tensor(t)] * 1000).to(torch.int32)}),
                     r"tensor '.*' is torch.int32; adapter tensors are floating point"),
    "bool tensor": (dict(tensors=lambda t: {**t, last_tensor(t): t[last_tensor(t)] > 0}),
                    r"tensor '.*' is torch.bool"),
    "newer format": (dict(metadata=lambda m: {**m, "format_version": "2"}),
                     r"format version 2, newer than the version 1"),
    "damaged format version": (dict(metadata=lambda m: {**m, "format_version": "x"}), r"damaged format_version"),
    "format version 0": (dict(metadata=lambda m: {**m, "format_version": "0"}), r"damaged format_version '0'"),
    "huge format version": (dict(metadata=lambda m: {**m, "format_version": "9" * 5000}),
                            r"damaged format_version '9{20}'\.\.\. \(this version"),
    "non-finite tensor": (dict(tensors=lambda t: {**t, last_tensor(t): t[last_tensor(t)].index_fill(0, torch.tensor([0]),
                                                                                                   float("nan"))}),
                          r"tensor '.*' holds NaN or infinite values"),
    "extra tensor": (dict(tensors=lambda t: {**t, "zzz.extra": torch.ones(2)}),
                     r"holds tensor 'zzz.extra', which neither its plan nor the model has \(1 such\)"),
    "plan tensors a list": (dict(metadata=edited("plan", tensors=[])),
                            r"adapter.safetensors has damaged metadata: its 'plan' is not a valid share plan \(plan "
                            r"field 'tensors' must be a JSON object, got list\)"),
    "plan modules a list": (dict(metadata=edited("plan", modules=["x"])),
                            r"adapter.safetensors has damaged metadata: its 'plan' .*'modules' must be a JSON object"),
    "plan without method": (dict(metadata=lambda m: {**m, "plan": m["plan"].replace('"method"', '"m"')}),
                            r"its 'plan' is not a valid share plan \(plan lacks field 'method'\)"),
    "plan of an unknown field": (dict(metadata=edited("plan", bogus=1)),
                                 r"its 'plan' is not a valid share plan \(plan has unknown field\(s\) \['bogus'\]\)"),
    "plan of an unknown method": (dict(metadata=edited("plan", method="dora")),
                                  r"not a valid share plan \(plan method 'dora' is not one of"),
    "plan path of a missing tensor": (dict(metadata=lambda m: {**m, "plan": m["plan"].replace('"A": "', '"A": "zz', 1)}),
                                      r"not a valid share plan \(plan module .* reads tensor 'zz.*', which the plan lacks"),
    "config of a bad value": (dict(metadata=edited("config", r=-3)),
                              r"adapter.safetensors has damaged metadata: its 'config' is not a valid ShareLoRAConfig "
                              r"\(r must be >= 1, got -3\)"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
@pytest.mark.parametrize("into", ["fresh model", "applied model"])
def test_a_refused_load_leaves_the_model_exactly_as_it_was(kind, into, tmp_path):
    changes, message = REFUSALS[kind]
    sk.save(trained("bishare_gate"), tmp_path)
    rewrite(tmp_path, **changes)
    model = tiny_model() if into == "fresh model" else other_trained()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        sk.load(model, tmp_path)
    assert_unchanged(before, model)


def test_a_truncated_tensor_is_refused_before_any_change(tmp_path, monkeypatch):
    """A read that fails on the last tensor (damaged data past an intact header) changes nothing."""
    sk.save(trained("bishare_gate"), tmp_path)
    model = other_trained()
    before = snapshot(model)
    real = safe_open

    class FailingLast:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            self.last = sorted(self.f.keys())[-1]
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_tensor(self, name):
            if name == self.last:
                raise OSError("unexpected end of file")
            return self.f.get_tensor(name)

    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **k: FailingLast(*a, **k))
    with pytest.raises(ValueError, match="could not be read completely"):
        sk.load(model, tmp_path)
    assert_unchanged(before, model)


def test_check_checkpoint_reads_everything_and_changes_nothing(tmp_path):
    sk.save(trained("similarity"), tmp_path)
    model = tiny_model()
    before = snapshot(model)
    checked = ckpt.check_checkpoint(model, tmp_path)
    assert checked.apply and set(checked.tensors) == set(checked.plan.tensors)
    assert_unchanged(before, model)


def test_a_killed_save_leaves_temporary_files_that_the_next_save_removes(tmp_path):
    """A saver killed midway (kill -9) leaves its temporary file; the next save of the same file removes it."""
    import subprocess
    import sys

    sk.save(trained("lora"), tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    orphan = tmp_path / f".{ckpt.WEIGHTS_NAME}.{proc.pid}-abc.tmp"
    orphan.write_bytes(b"partial")
    proc.kill()
    proc.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".{ckpt.WEIGHTS_NAME}.{live.pid}-def.tmp"  # a save in progress in another process
        running.write_bytes(b"in progress")
        sk.save(trained("lora"), tmp_path)
        assert not orphan.exists() and running.exists()
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.WEIGHTS_NAME, ckpt.CONFIG_NAME, running.name])


def test_a_module_to_save_with_an_integer_counter_and_an_infinite_mask_round_trips(tmp_path):
    """A module to save's own state loads as it is: BatchNorm's int64 counter, a buffer of -inf."""
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj, self.norm, self.head = nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)
            self.norm.register_buffer("mask", torch.tensor([0.0, float("-inf")] * 8))

        def forward(self, x):
            return self.head(self.norm(self.proj(x)) + self.norm.mask.clamp_min(-1))

    def applied():
        return sk.apply(Net(), sk.ShareLoRAConfig(target_modules=["proj"], r=2, modules_to_save=["norm"]))

    model = applied().train()
    model(torch.randn(8, 16))  # the counter moves
    sk.save(model.eval(), tmp_path)
    loaded = sk.load(applied().eval(), tmp_path)
    assert all(torch.equal(loaded.norm.state_dict()[k], v) for k, v in model.norm.state_dict().items())
    assert int(loaded.norm.num_batches_tracked) == 1


def test_a_file_where_the_checkpoint_folder_goes_is_refused(tmp_path):
    model = sk.apply(tiny_model(layers=1), sk.ShareLoRAConfig(r=2))
    (tmp_path / "out").write_text("mine")
    with pytest.raises(NotADirectoryError, match="save writes a folder, and a file is in its place"):
        sk.save(model, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "mine"


def test_a_folder_where_the_weights_file_goes_is_refused_and_left_in_place(tmp_path):
    model = sk.apply(tiny_model(layers=1), sk.ShareLoRAConfig(r=2))
    (tmp_path / ckpt.WEIGHTS_NAME).mkdir()
    (tmp_path / ckpt.WEIGHTS_NAME / "keep.txt").write_text("mine")
    with pytest.raises(IsADirectoryError, match="a folder is where this file goes"):
        sk.save(model, tmp_path)
    assert (tmp_path / ckpt.WEIGHTS_NAME / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.WEIGHTS_NAME]


def test_hand_wrapped_layers_refuse_an_adapter_name_they_do_not_compute(tmp_path):
    import torch.nn as nn

    model = nn.Sequential(sk.SharedLoRALinear(nn.Linear(16, 8), r=4, alpha=8))
    sk.save(model, tmp_path / "saved", adapter_name="default")
    sk.load(model, tmp_path / "saved", adapter_name="default")
    for call in (lambda: sk.save(model, tmp_path / "other", adapter_name="nope"),
                 lambda: sk.load(model, tmp_path / "saved", adapter_name="nope")):
        with pytest.raises(ValueError, match=r"hand-wrapped layers compute adapter\(s\) \['default'\], not 'nope'"):
            call()
    assert not (tmp_path / "other").exists()
