"""A run's results as one unit: a folder never mixes two runs, a full disk after training keeps the
adapter and says where in one line, free space is checked before training, compare saves its
finished methods whatever Ctrl-C's come, and the expected failures (damaged weights, --text a
folder, Ctrl-C during imports) end in one line."""
import errno
import json
import shutil
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

import sharelora_kernels as sk
import sharelora_kernels.checkpoint as ckpt
import sharelora_kernels.export as export
import sharelora_kernels.files as files
from cli_helpers import run_cli
from sharelora_kernels.cli import finetune, outputs
from sharelora_kernels.data import default_model_dir

SMALL = ["--samples", "4", "--batch-size", "2", "--seq-len", "24", "--log-every", "1"]
TINY_COMPARE = ["--steps", "2", "--heldout", "4", "--batch-size", "2", "--seq-len", "32", "--calibration-samples", "16"]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(sk.ShareLoRAConfig(method="similarity", r=4, share_sets=[[1, 2, 3]]).to_json())
    return path


def full_disk(monkeypatch, disk: Path, writers):
    """Every atomic write under ``disk`` by ``writers`` (modules holding ``atomic_write`` or
    ``atomic_write_files``; ``files`` for those importing it when they write) fails as on a full
    disk; writes elsewhere work."""
    def full(path):
        if Path(path).resolve().is_relative_to(disk.resolve()):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def write(path, fill, original=files.atomic_write):
        full(path)
        return original(path, fill)

    def write_files(writes, remove=(), original=files.atomic_write_files):
        for path in writes:
            full(path)
        return original(writes, remove)

    for module in writers:
        for name, replacement in (("atomic_write", write), ("atomic_write_files", write_files)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, replacement)


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"python -m sharelora_kernels {command}: "), err
    return last


def leftovers(out: Path) -> list[str]:
    """Temporary folders of a run in ``out`` or beside it."""
    return sorted(p.name for folder in (out, out.parent) if folder.is_dir() for p in folder.iterdir()
                  if p.name.startswith((".sharelora-run.", f".{out.name}.")))


def test_a_new_run_replaces_all_three_results_of_an_earlier_one(plan_file, tmp_path):
    out = tmp_path / "run"
    assert run_cli(["finetune", "--plan", plan_file, "--steps", "1", *SMALL, "--out", out])[0] == 0
    (out / "notes.txt").write_text("mine")
    assert run_cli(["finetune", "--plan", plan_file, "--steps", "2", *SMALL, "--seed", "3", "--out", out])[0] == 0
    assert json.loads((out / "losses.json").read_text())["steps"] == 2
    export_config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert export_config["r"] >= 4 and (out / "notes.txt").read_text() == "mine"  # other files stay
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "losses.json", "notes.txt", "peft"]
    assert leftovers(out) == []


def test_a_full_disk_after_training_keeps_the_adapter_in_the_system_temp_dir(plan_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_cli(["finetune", "--plan", plan_file, "--steps", "1", *SMALL, "--out", out])[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    full_disk(monkeypatch, tmp_path, writers=(files, ckpt, export))
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--steps", "2", *SMALL, "--out", out])
    line = one_line_error(capsys, "finetune")
    assert code == 1
    assert f"could not write the results into {out} (No space left on device: " in line
    kept = Path(line.split("adapter/ is kept in ")[1])
    try:
        assert not kept.is_relative_to(tmp_path)
        monkeypatch.undo()
        from transformers import AutoModelForCausalLM

        model = sk.load(AutoModelForCausalLM.from_pretrained(default_model_dir(), local_files_only=True), kept)
        b = [t for n, t in sk.model.adapter_tensors(model).items() if model.sharelora_plan.tensors[n].init == "zeros"]
        assert b and all(t.abs().sum() > 0 for t in b)  # trained, not the fresh zeros
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier run, untouched
    assert leftovers(out) == []


def test_a_disk_filling_during_the_export_keeps_the_adapter_in_out(plan_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    full_disk(monkeypatch, tmp_path, writers=(export,))
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--steps", "2", *SMALL, "--out", out])
    line = one_line_error(capsys, "finetune")
    assert code == 1
    kept = Path(line.split("adapter/ is kept in ")[1])
    assert kept.parent.parent == out and kept.parent.name.startswith("sharelora-kept-")
    assert list(out.iterdir()) == [kept.parent] and sorted(p.name for p in kept.parent.iterdir()) == ["adapter"]
    weights = (kept / ckpt.WEIGHTS_NAME).read_bytes()
    monkeypatch.undo()  # the next run into the same folder (its clean-up of killed writers' folders) keeps it
    assert run_cli(["finetune", "--plan", plan_file, "--steps", "1", *SMALL, "--out", out])[0] == 0
    assert (kept / ckpt.WEIGHTS_NAME).read_bytes() == weights and load_file(kept / ckpt.WEIGHTS_NAME)
    assert leftovers(out) == []


def test_a_real_full_disk_in_safetensors_keeps_the_adapter_and_says_where(plan_file, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError: the same one line, exit 1, no temporary folder."""
    from safetensors import SafetensorError

    original = ckpt.save_file

    def save_file(tensors, filename, metadata=None):
        if Path(filename).is_relative_to(tmp_path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    out = tmp_path / "run"
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--steps", "1", *SMALL, "--out", out])
    line = one_line_error(capsys, "finetune")
    assert code == 1 and f"could not write the results into {out} (No space left on device: " in line
    kept = Path(line.split("adapter/ is kept in ")[1])
    try:
        assert (kept / ckpt.WEIGHTS_NAME).is_file() and not kept.is_relative_to(tmp_path)
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)
    assert not out.exists() and leftovers(out) == []


def test_a_move_in_failing_halfway_leaves_the_previous_results_whole(plan_file, tmp_path, capsys, monkeypatch):
    """The earlier peft/ cannot be moved out once adapter/ was: adapter/ is moved back, the new results named."""
    import os

    out = tmp_path / "run"
    assert run_cli(["finetune", "--plan", plan_file, "--steps", "1", *SMALL, "--out", out])[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    original = os.replace

    def stuck_peft(source, target):
        if Path(source) == out / "peft":
            raise PermissionError(errno.EACCES, "Permission denied", str(source))
        return original(source, target)

    monkeypatch.setattr(outputs.os, "replace", stuck_peft)
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--steps", "2", *SMALL, "--seed", "3", "--out", out])
    line = one_line_error(capsys, "finetune")
    assert code == 1 and f"(Permission denied: {out / 'peft'})" in line
    kept = Path(line.split("adapter/ is kept in ")[1])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and kept.parent not in p.parents} == before
    assert sorted(p.name for p in kept.parent.iterdir()) == ["adapter", "losses.json", "peft"]
    assert json.loads((kept.parent / "losses.json").read_text())["steps"] == 2
    assert kept.parent.name.startswith("sharelora-kept-") and leftovers(out) == []  # no temporary folder left


def test_an_out_folder_in_a_read_only_folder_is_written(plan_file, tmp_path, monkeypatch):
    """Only --out must be writable: nothing is written beside it (here, the folder holding it refuses)."""
    import tempfile

    out = tmp_path / "run"
    out.mkdir()
    original = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkdtemp", mkdtemp)
    assert run_cli(["finetune", "--plan", plan_file, "--steps", "1", *SMALL, "--out", out])[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "losses.json", "peft"]


def test_an_earlier_output_folder_that_cannot_be_replaced_is_refused_up_front(plan_file, tmp_path, capsys, monkeypatch):
    import os

    from cli_helpers import forbid_model_loading

    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    original = os.access
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != out / "adapter" and original(path, mode))
    forbid_model_loading(monkeypatch)
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--steps", "1", *SMALL, "--out", out])
    line = one_line_error(capsys, "finetune")
    assert code == 2 and line.endswith(f"error: --out {out}: {out / 'adapter'} cannot be replaced: no write permission in it")
    assert leftovers(out) == []


def test_free_space_is_checked_before_training(plan_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    from sharelora_kernels.cli import training

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("trained before checking the free space"))
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--steps", "2", *SMALL, "--out", tmp_path / "run"])
    line = one_line_error(capsys, "finetune")
    assert code == 2 and "error: not enough free space for the results in" in line and "0.0 MiB free" in line
    assert finetune.outputs_bytes.__doc__  # the estimate is documented


def test_outputs_estimate_covers_what_finetune_writes(plan_file, tmp_path):
    out = tmp_path / "run"
    assert run_cli(["finetune", "--plan", plan_file, "--steps", "1", *SMALL, "--out", out])[0] == 0
    from transformers import AutoModelForCausalLM

    model = sk.load(AutoModelForCausalLM.from_pretrained(default_model_dir(), local_files_only=True), out / "adapter")
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert written <= finetune.outputs_bytes(model) + 2**20 <= 4 * written + 2**20


def test_plan_on_a_full_disk_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "plan"
    full_disk(monkeypatch, tmp_path, writers=(files,))
    code, _, _ = run_cli(["plan", "--samples", "8", "--out", out])
    line = one_line_error(capsys, "plan")
    assert code == 1 and "could not write the results into" in line
    kept = Path(line.split("plan.json is kept in ")[1])
    try:
        assert sk.ShareLoRAConfig.from_json(kept.read_text()).method == "similarity"
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)
    assert not out.exists() or list(out.iterdir()) == []
    assert leftovers(out) == []


def test_compare_on_a_full_disk_keeps_its_results_and_says_where(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    full_disk(monkeypatch, tmp_path, writers=(files,))
    code, _, _ = run_cli(["compare", *TINY_COMPARE, "--methods", "lora", "--out", out])
    line = one_line_error(capsys, "compare")
    assert code == 1
    kept = Path(line.split("compare.json is kept in ")[1])
    try:
        assert list(json.loads(kept.read_text())["methods"]) == ["lora"]
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)


@pytest.mark.parametrize("times", [1, 2], ids=["Ctrl-C", "Ctrl-C twice"])
@pytest.mark.parametrize("phase", ["second method's training", "first method's held-out loss", "first method's save"])
def test_compare_ctrl_c_keeps_every_finished_method(phase, times, tmp_path, capsys, monkeypatch):
    from sharelora_kernels.cli import compare, training

    def sigint_in(owner, attr, call, after=False):
        original, calls = getattr(owner, attr), {"n": 0}

        def wrapped(*args, **kwargs):
            calls["n"] += 1
            hit = calls["n"] == call
            for _ in range(times if hit and not after else 0):
                signal.raise_signal(signal.SIGINT)
            result = original(*args, **kwargs)
            for _ in range(times if hit and after else 0):
                signal.raise_signal(signal.SIGINT)
            return result
        monkeypatch.setattr(owner, attr, wrapped)

    if phase == "second method's training":
        sigint_in(training.Windows, "__call__", 4)  # 2 steps of lora, then the second method's second step
    elif phase == "first method's held-out loss":
        sigint_in(training, "heldout_loss", 2)  # the first is the base model's
    else:
        sigint_in(compare, "write_json", 1)
    code, _, _ = run_cli(["compare", *TINY_COMPARE, "--methods", "lora,bishare_slice", "--out", tmp_path])
    line = one_line_error(capsys, "compare")
    assert code == 130
    assert line.endswith(f"interrupted after 1 finished method of 2; {tmp_path / 'compare.json'} holds them")
    result = json.loads((tmp_path / "compare.json").read_text())
    assert list(result["methods"]) == ["lora"] and not result["finished"]
    assert len(result["methods"]["lora"]["train_losses"]) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------ expected failures: one line
def test_text_given_a_directory_says_so(plan_file, tmp_path, capsys):
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--text", tmp_path, "--out", tmp_path / "o"])
    line = one_line_error(capsys, "finetune")
    assert code == 2 and line.endswith(f"error: text file {tmp_path} is a directory, not a file")


def test_truncated_model_weights_are_one_line(plan_file, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(default_model_dir(), model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, _ = run_cli(["finetune", "--plan", plan_file, "--model", model_dir, *SMALL, "--out", tmp_path / "o"])
    line = one_line_error(capsys, "finetune")
    assert code == 2 and f"cannot load the weights in {model_dir}: a damaged or truncated file?" in line


def test_ctrl_c_while_the_command_modules_import_is_one_line(capsys, monkeypatch):
    import importlib

    from sharelora_kernels.__main__ import main

    def interrupted(name, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["plan"]) == 130
    assert capsys.readouterr().err == "sharelora_kernels: interrupted\n"


def test_ctrl_c_a_library_swallowed_is_still_one_line(capsys, monkeypatch):
    """A library that catches the KeyboardInterrupt and fails later because of it (as transformers'
    lazy import does: 'Could not import module ...'): the Ctrl-C is reported, not the later error."""
    import importlib

    from sharelora_kernels.__main__ import main

    def swallowing(name, *args):
        try:
            signal.raise_signal(signal.SIGINT)  # the real Ctrl-C, through the installed handler
        except KeyboardInterrupt:
            pass
        raise ModuleNotFoundError("Could not import module 'LlamaConfig'")

    monkeypatch.setattr(importlib, "import_module", swallowing)
    assert main(["plan"]) == 130
    assert capsys.readouterr().err == "sharelora_kernels: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_without_ctrl_c_is_not_called_an_interrupt(monkeypatch):
    import importlib

    from sharelora_kernels.__main__ import main

    def broken(name, *args):
        raise ModuleNotFoundError("no such module")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="no such module"):
        main(["plan"])


def test_ctrl_c_to_a_starting_process_is_one_line(plan_file, tmp_path):
    """The real thing: SIGINT to `python -m sharelora_kernels finetune` while it imports torch and transformers."""
    import os
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "sharelora_kernels", "finetune", "--plan", str(plan_file), *SMALL,
                             "--out", str(tmp_path / "o")], cwd=root, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the interpreter is up; the command is importing what it needs
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130, or killed by SIGINT itself: a KeyboardInterrupt that ends code an extension module runs
    # through CPython's C API (PyRun_String, at import) marks the interpreter, which then ends by
    # SIGINT after main() returned 130, as for an uncaught Ctrl-C. A shell reports both as 130.
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("interrupted"), err


def test_ctrl_c_while_the_process_shuts_down_is_ignored(tmp_path):
    """Once the command is done, a Ctrl-C during interpreter shutdown (torch's exit callbacks run then)
    neither prints a traceback nor kills the process: its exit status stays the command's."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    child = ("import atexit, os, signal, sys, time\n"
             "from sharelora_kernels.__main__ import main\n"
             "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2), print('shut down')))\n"
             "sys.argv = ['sharelora', 'plan', '--eps', '2']\n"
             "sys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "shut down\n", proc.stderr
    assert proc.stderr.strip().splitlines() == ["sharelora plan: error: --eps must be in [0, 1], got 2.0"]


def test_ctrl_c_between_two_renames_of_the_move_in_leaves_the_previous_results_whole(tmp_path, monkeypatch):
    import os

    out = tmp_path / "run"
    run = outputs.RunOutputs(out, ["a.json", "b/"])
    run.write([("a.json", lambda p: p.write_text("old a")), ("b", lambda p: (p.mkdir(), (p / "x").write_text("old b")))])
    original, calls = os.replace, []

    def interrupted(source, target):
        calls.append(source)
        if len(calls) == 3:  # both old results moved out, the new ones not yet in
            raise KeyboardInterrupt
        return original(source, target)

    monkeypatch.setattr(outputs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.write([("a.json", lambda p: p.write_text("new a")), ("b", lambda p: (p.mkdir(), (p / "x").write_text("new b")))])
    assert (out / "a.json").read_text() == "old a" and (out / "b" / "x").read_text() == "old b"
    assert leftovers(out) == []


def test_a_killed_writers_temporary_folders_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for name in (f".sharelora-run.{dead}-abc.tmp", f".sharelora-run.{dead}-def.old.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "adapter.safetensors").write_bytes(b"partial")
    outputs.RunOutputs(out, ["a.json"]).write([("a.json", lambda p: p.write_text("a"))])
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]


def test_an_out_that_is_a_dangling_link_is_refused_up_front(tmp_path):
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    with pytest.raises(sk.cli.CommandError, match=r"--out .*broken is a link to .*nowhere, which does not exist"):
        outputs.check_out_dir(tmp_path / "broken", ["plan.json"])


def test_a_loss_turning_nan_stops_training_with_an_error():
    import torch

    from sharelora_kernels.cli import Diverged
    from sharelora_kernels.cli.training import adapter_optimizer, train

    class Diverging(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, labels):
            step = self.__dict__.setdefault("calls", [0])
            step[0] += 1
            loss = self.w.sum() * (float("nan") if step[0] == 3 else 1.0)
            return type("Out", (), {"loss": loss})()

    model = Diverging()
    with pytest.raises(Diverged, match=r"the training loss is nan at step 3 of 5: the run diverged"):
        train(model, adapter_optimizer(model, 1e-3), lambda: torch.zeros(1, 2, dtype=torch.long), 5)


def test_compare_with_every_method_skipped_writes_what_it_says(tmp_path):
    out = tmp_path / "cmp"
    code, stdout, _ = run_cli(["compare", *TINY_COMPARE, "--methods", "sharelora", "--eps", "0.9999", "--out", out])
    assert code == 0 and f"wrote {out / 'compare.json'}\n" in stdout
    result = json.loads((out / "compare.json").read_text())
    assert result["methods"] == {} and list(result["skipped"]) == ["sharelora"]
