"""Ctrl-C during finetune loses no finished step: the adapter saved is that of the last finished step, and loads."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sharelora_kernels as sk
from cli_helpers import run_cli
from sharelora_kernels.cli import training
from sharelora_kernels.data import default_model_dir

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--samples", "4", "--batch-size", "2", "--seq-len", "24", "--log-every", "1"]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(sk.ShareLoRAConfig(method="similarity", r=4, share_sets=[[1, 2, 3]]).to_json())
    return path


@pytest.fixture(scope="module")
def two_steps(plan_file, tmp_path_factory):
    """The adapter tensors after two uninterrupted steps."""
    out = tmp_path_factory.mktemp("two")
    assert run_cli(["finetune", "--plan", plan_file, "--steps", "2", *SMALL, "--out", out])[0] == 0
    return load_file(out / "adapter" / "adapter.safetensors")


def interrupt_at(monkeypatch, where: str, call: int) -> None:
    """Ctrl-C on the ``call``-th batch draw (before that step's forward) or inside the ``call``-th optimizer step."""
    calls = {"n": 0}

    def count_then(original):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if where == "batch" and calls["n"] == call:
                raise KeyboardInterrupt
            result = original(*args, **kwargs)
            if where == "optimizer" and calls["n"] == call:
                signal.raise_signal(signal.SIGINT)  # a real SIGINT, arriving mid-update
            return result
        return wrapped

    if where == "batch":
        monkeypatch.setattr(training.Windows, "__call__", count_then(training.Windows.__call__))
    else:
        monkeypatch.setattr(torch.optim.AdamW, "step", count_then(torch.optim.AdamW.step))


@pytest.mark.parametrize("where, call", [("batch", 3), ("optimizer", 2)])
def test_interrupted_finetune_saves_every_finished_step(where, call, plan_file, two_steps, tmp_path, capsys, monkeypatch):
    interrupt_at(monkeypatch, where, call)
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--steps", "50", *SMALL, "--out", tmp_path])
    assert code == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("python -m sharelora_kernels finetune: interrupted after 2 finished steps of 50; saved them to ")
    log = json.loads((tmp_path / "losses.json").read_text())
    assert (log["finished_steps"], log["interrupted"], len(log["losses"])) == (2, True, 2)
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert saved.keys() == two_steps.keys()
    for name, tensor in saved.items():  # bitwise the weights of two uninterrupted steps: nothing lost, nothing half-done
        assert torch.equal(tensor, two_steps[name]), name
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_ctrl_c_to_a_running_process_leaves_a_loadable_adapter(plan_file, tmp_path):
    """The real thing: SIGINT to `python -m sharelora_kernels finetune` once it has logged two steps."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sharelora_kernels", "finetune", "--plan", str(plan_file),
                             "--steps", "100000", *SMALL, "--out", str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step") and int(line.split()[1]) >= 2:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "finetune: interrupted after" in err and "Traceback" not in err
    log = json.loads((tmp_path / "losses.json").read_text())
    assert log["interrupted"] and log["finished_steps"] >= 2 and len(log["losses"]) == log["finished_steps"]
    from transformers import AutoModelForCausalLM

    model = sk.load(AutoModelForCausalLM.from_pretrained(default_model_dir(), local_files_only=True), tmp_path / "adapter")
    from sharelora_kernels.model import adapter_tensors

    zero_at_init = [name for name, spec in model.sharelora_plan.tensors.items() if spec.init == "zeros"]  # every B
    assert zero_at_init and all(adapter_tensors(model)[name].abs().sum() > 0 for name in zero_at_init)  # trained


# ------------------------------------------------ Ctrl-C (once or twice) at every phase boundary
def sigint_at(monkeypatch, owner, attr, call: int, times: int, after: bool = False, armed=lambda: True):
    """Raise ``times`` real SIGINTs in the ``call``-th call of ``owner.attr`` made while ``armed()``,
    before (or ``after``) the original runs."""
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        if armed():
            calls["n"] += 1
        hit = armed() and calls["n"] == call
        if hit and not after:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        result = original(*args, **kwargs)
        if hit and after:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(owner, attr, wrapped)


def after_steps(monkeypatch, n: int):
    """A predicate that turns true once ``n`` optimizer steps have finished."""
    done = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        done["n"] += 1
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return lambda: done["n"] >= n


def _phase(name, monkeypatch, times):
    """Arrange Ctrl-C's at phase ``name`` of a run whose third step never finishes (or of a 2-step run)."""
    import sharelora_kernels.checkpoint as ckpt
    import sharelora_kernels.export as export
    from sharelora_kernels.cli import outputs

    if name == "batch draw (between steps)":
        sigint_at(monkeypatch, training.Windows, "__call__", 3, times)
    elif name == "forward":
        sigint_at(monkeypatch, torch.nn.functional, "cross_entropy", 3, times)
    elif name == "backward":
        sigint_at(monkeypatch, torch.Tensor, "backward", 3, times, after=True)
    elif name == "optimizer step":
        sigint_at(monkeypatch, torch.optim.AdamW, "step", 2, times, after=True)
    elif name == "after the last step":  # the model.eval() after the loop
        from transformers import PreTrainedModel

        sigint_at(monkeypatch, PreTrainedModel, "eval", 1, times, armed=after_steps(monkeypatch, 2))
    elif name == "checkpoint save":
        sigint_at(monkeypatch, ckpt, "save_file", 1, times)
    elif name == "PEFT export":
        sigint_at(monkeypatch, export, "save_file", 1, times)
    elif name == "losses.json":
        sigint_at(monkeypatch, outputs, "write_text", 1, times)
    elif name == "moving the results in":
        sigint_at(monkeypatch, outputs.os, "replace", 1, times,
                  armed=lambda: any(f.function == "_move_in" for f in __import__("inspect").stack()[1:3]))


PHASES = ["batch draw (between steps)", "forward", "backward", "optimizer step", "after the last step",
          "checkpoint save", "PEFT export", "losses.json", "moving the results in"]


@pytest.mark.parametrize("times", [1, 2], ids=["Ctrl-C", "Ctrl-C twice"])
@pytest.mark.parametrize("phase", PHASES)
def test_ctrl_c_at_every_phase_saves_the_last_finished_step(phase, times, plan_file, two_steps, tmp_path, capsys,
                                                            monkeypatch):
    steps = "2" if PHASES.index(phase) >= PHASES.index("after the last step") else "50"
    _phase(phase, monkeypatch, times)
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--steps", steps, *SMALL, "--out", tmp_path])
    err = capsys.readouterr().err
    assert code == 130, err
    assert err.splitlines()[-1].startswith(f"python -m sharelora_kernels finetune: interrupted after 2 finished steps "
                                           f"of {steps}; saved them to ")
    assert "Traceback" not in err
    log = json.loads((tmp_path / "losses.json").read_text())
    assert (log["finished_steps"], log["interrupted"], len(log["losses"])) == (2, steps == "50", 2)
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert saved.keys() == two_steps.keys() and all(torch.equal(t, two_steps[n]) for n, t in saved.items())
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "losses.json", "peft"]
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_ctrl_c_while_the_progress_bar_goes_is_one_line_and_saves(plan_file, tmp_path, capsys, monkeypatch):
    """A Ctrl-C landing in the progress bar's clean-up (tqdm's __del__) once training ended: saved, exit 130,
    one line, not an "Exception ignored in tqdm.__del__" traceback after "wrote"."""
    from tqdm import std

    original = std.tqdm.__del__

    def interrupted_del(self):
        if getattr(self, "desc", "") == "finetune":
            signal.raise_signal(signal.SIGINT)
        original(self)

    monkeypatch.setattr(std.tqdm, "__del__", interrupted_del)
    code, out, _ = run_cli(["finetune", "--plan", plan_file, "--steps", "2", *SMALL, "--out", tmp_path])
    err = capsys.readouterr().err
    assert code == 130 and "Exception ignored" not in err and "wrote " not in out
    assert err.splitlines()[-1].startswith("python -m sharelora_kernels finetune: interrupted after 2 finished steps "
                                           "of 2; saved them to ")
    assert json.loads((tmp_path / "losses.json").read_text())["finished_steps"] == 2
