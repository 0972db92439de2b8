"""Every command checks its command line first: each bad option, model directory and output path fails in
seconds, with one line naming it, exit status 2, before any model is loaded or any timing starts."""
import argparse
import json
import os

import pytest
import torch

from cli_helpers import bert_dir, forbid_model_loading, run_cli
from sharelora_kernels.__main__ import COMMANDS, main
from tiny_models import TARGETS, tiny_model

FAST_S = 5.0  # "under a few seconds": the checks read config.json and a tokenizer, never weights


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Inputs the bad command lines point at: a plan, an encoder, files that are not what they should be."""
    root = tmp_path_factory.mktemp("inputs")
    import sharelora_kernels as sk

    (root / "plan.json").write_text(sk.ShareLoRAConfig(method="similarity", share_sets=[[1, 2]]).to_json())
    (root / "far_layers.json").write_text(sk.ShareLoRAConfig(method="similarity", share_sets=[[8, 12]]).to_json())
    (root / "bad_kron.json").write_text(sk.ShareLoRAConfig(method="bishare", shape_transform="kron", kron_dim=48).to_json())
    (root / "not_json.json").write_text("{method: lora")
    (root / "a_file").write_text("not a folder")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    (root / "alien").mkdir()
    (root / "alien" / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    (root / "empty.txt").write_text("\n\n  \n")
    (root / "two.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (root / "taken").mkdir()
    (root / "taken" / "plan.json").mkdir()  # a folder where plan writes a file
    (root / "taken" / "compare.json").mkdir()
    bert_dir(root / "bert")
    from transformers import GPT2Config

    from sharelora_kernels.data import default_model_dir

    GPT2Config(n_positions=16, n_embd=32, n_layer=2, n_head=2, vocab_size=260).save_pretrained(root / "gpt2")
    llama = json.loads((default_model_dir() / "config.json").read_text())
    for name, changes in {"zero_heads": {"num_attention_heads": 0, "num_key_value_heads": 0},
                          "str_hidden": {"hidden_size": "32"}, "other_shape": {"hidden_size": 64}}.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**llama, **changes}))
    (root / "other_shape" / "model.safetensors").symlink_to(default_model_dir() / "model.safetensors")
    return root


FINETUNE = ["finetune", "--plan", "{d}/plan.json"]
CASES = [
    # plan: numbers, then the model directory, the targets and the Bi-Share dims, then files
    (["plan", "--samples", "0"], "--samples must be a positive number, got 0"),
    (["plan", "--max-length", "0"], "--max-length must be a positive number, got 0"),
    (["plan", "--batch-size", "0"], "--batch-size must be a positive number, got 0"),
    (["plan", "--r", "0"], "--r must be a positive number, got 0"),
    (["plan", "--alpha", "nan"], "--alpha must be a positive number, got nan"),
    (["plan", "--kron-dim", "-4"], "--kron-dim must be a positive number, got -4"),
    (["plan", "--eps", "1.5"], "--eps must be in [0, 1], got 1.5"),
    (["plan", "--device", "nonsense"], "--device nonsense is not usable: "),
    (["plan", "--samples", "500"], "--samples 500 asks for more paragraphs than the built-in corpus holds (121)"),
    (["plan", "--model", "{d}/missing"], "model directory {d}/missing does not exist"),
    (["plan", "--model", "{d}/notes"], "{d}/notes is not a Transformers model directory (no config.json)"),
    (["plan", "--model", "{d}/alien"], "{d}/alien is not a Transformers model directory (no usable config.json)"),
    (["plan", "--target-modules", "qq_proj"], "--target-modules: target_modules entry 'qq_proj' matches no module "),
    (["plan", "--model", "{d}/bert", "--target-modules", "query", "q_proj"],
     "--target-modules: target_modules entry 'q_proj' matches no module of this model ({d}/bert)"),
    (["plan", "--kron-dim", "48"], "Bi-Share kron: kron_dim=48 does not divide in_features=128 of module"),
    (["plan", "--text", "{d}/missing.txt"], "text file {d}/missing.txt does not exist"),
    (["plan", "--text", "{d}/empty.txt"], "text file {d}/empty.txt holds no paragraph"),
    (["plan", "--text", "{d}/two.txt", "--samples", "3"], "--samples 3 asks for more paragraphs than {d}/two.txt holds (2)"),
    (["plan", "--out", "{d}/a_file"], "--out {d}/a_file is an existing file, not a folder"),
    (["plan", "--out", "{d}/a_file/sub"], "--out {d}/a_file/sub cannot be made: {d}/a_file is a file, not a folder"),
    (["plan", "--out", "{d}/taken"], "--out {d}/taken: {d}/taken/plan.json is a folder, but this command writes a file there"),
    (["plan", "--device", "meta"], "--device meta holds shapes, no values: a model cannot run there"),
    (["plan", "--model", "{d}/gpt2", "--max-length", "17"],
     "--max-length 17 is longer than the model of {d}/gpt2 takes: at most 16 tokens"),
    (["plan", "--model", "{d}/zero_heads"],
     "{d}/zero_heads/config.json holds an invalid value: integer modulo by zero (a size or count of 0"),
    (["plan", "--model", "{d}/str_hidden"], "{d}/str_hidden/config.json holds an invalid value: Validation error for "
                                            "field 'hidden_size': TypeError: Field 'hidden_size' expected int, got str"),
    (["plan", "--model", "{d}/other_shape"], "the weights in {d}/other_shape/model.safetensors do not fit "
                                             "{d}/other_shape/config.json: tensor model.embed_tokens.weight is (260, 128) "
                                             "there, (260, 64) in the model config.json describes"),
    # finetune: numbers, the plan, the model (a causal LM), the text, the output
    (FINETUNE + ["--samples", "0"], "--samples must be a positive number, got 0"),
    (FINETUNE + ["--samples", "-3"], "--samples must be a positive number, got -3"),
    (FINETUNE + ["--steps", "0"], "--steps must be a positive number, got 0"),
    (FINETUNE + ["--batch-size", "0"], "--batch-size must be a positive number, got 0"),
    (FINETUNE + ["--lr", "-0.01"], "--lr must be a positive number, got -0.01"),
    (FINETUNE + ["--lr", "inf"], "--lr must be a positive number, got inf"),
    (FINETUNE + ["--lr", "1e39"], "--lr must be in [0, 3.4028234663852886e+38], got 1e+39"),
    (FINETUNE + ["--log-every", "0"], "--log-every must be a positive number, got 0"),
    (FINETUNE + ["--seq-len", "1"], "--seq-len must be >= 2, got 1"),
    (["finetune", "--plan", "{d}/missing.json"], "plan file {d}/missing.json does not exist"),
    (["finetune", "--plan", "{d}"], "plan file {d} is a folder: give the plan.json in it"),
    (["finetune", "--plan", "{d}/not_json.json"], "{d}/not_json.json is not a valid ShareLoRAConfig JSON"),
    (["finetune", "--plan", "{d}/far_layers.json"], "plan {d}/far_layers.json does not fit "),
    (["finetune", "--plan", "{d}/bad_kron.json"], "plan {d}/bad_kron.json does not fit "),
    (FINETUNE + ["--model", "{d}/bert"], "{d}/bert holds a BertModel (bert) with no causal-LM head; fine-tuning "
                                        "(finetune, compare) needs a causal language model: a decoder saved as a *ForCausalLM class"),
    (FINETUNE + ["--samples", "1", "--seq-len", "500"], "the text has 216 tokens, too few for windows of 500 tokens: lower --seq-len"),
    (FINETUNE + ["--out", "{d}/a_file"], "--out {d}/a_file is an existing file, not a folder"),
    (FINETUNE + ["--device", "nonsense"], "--device nonsense is not usable: "),
    (FINETUNE + ["--device", "meta"], "--device meta holds shapes, no values: a model cannot run there"),
    (FINETUNE + ["--seed", "4294967296"], "--seed must be in [0, 4294967295], got 4294967296"),
    (FINETUNE + ["--batch-size", "99999999999999999"],
     "--batch-size 99999999999999999 with --seq-len 128: the logits of one batch alone take "),
    (FINETUNE + ["--samples", "1000000000"], "--samples 1000000000: the built-in task makes at most 100,000 paragraphs"),
    (FINETUNE + ["--model", "{d}/gpt2", "--seq-len", "17"],
     "--seq-len 17 is longer than the model of {d}/gpt2 takes: at most 16 tokens"),
    (FINETUNE + ["--model", "{d}/zero_heads"], "{d}/zero_heads/config.json holds an invalid value: "),
    (FINETUNE + ["--model", "{d}/other_shape"], "the weights in {d}/other_shape/model.safetensors do not fit "),
    # compare
    (["compare", "--steps", "0"], "--steps must be a positive number, got 0"),
    (["compare", "--heldout", "0"], "--heldout must be a positive number, got 0"),
    (["compare", "--eps", "-1"], "--eps must be in [0, 1], got -1"),
    (["compare", "--seq-len", "1"], "--seq-len must be >= 2, got 1"),
    (["compare", "--methods", "lora,dora"], "--methods: unknown ['dora']; known: lora,sharelora,"),
    (["compare", "--methods", "lora,lora"], "--methods: repeated names"),
    (["compare", "--calibration-samples", "500"], "--calibration-samples 500: the built-in corpus holds 121 paragraphs"),
    (["compare", "--plan", "{d}/missing.json"], "plan file {d}/missing.json does not exist"),
    (["compare", "--plan", "{d}/plan.json", "--eps", "0.85"],
     "--eps applies only to the share sets compare finds, not to those of --plan"),
    (["compare", "--plan", "{d}/plan.json", "--eps", "0.3", "--calibration-samples", "5"],
     "--eps and --calibration-samples apply only to the share sets compare finds, not to those of --plan"),
    (["compare", "--plan", "{d}/far_layers.json"], "--plan {d}/far_layers.json: share_sets[0] [8, 12] holds layer 12, outside [0, 10)"),
    (["compare", "--model", "{d}/bert"], "{d}/bert holds a BertModel (bert) with no causal-LM head"),
    (["compare", "--text", "{d}/two.txt", "--heldout", "2"], "--heldout 2 leaves no training paragraph: {d}/two.txt holds 2"),
    (["compare", "--out", "{d}/taken"], "--out {d}/taken: {d}/taken/compare.json is a folder"),
    (["compare", "--heldout", "3000000"], "--heldout 3000000: the built-in task has only 55 paragraphs of lines it "
                                          "does not train on"),
    (["compare", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["compare", "--model", "{d}/gpt2", "--seq-len", "17"],
     "--seq-len 17 is longer than the model of {d}/gpt2 takes: at most 16 tokens"),
    (["compare", "--model", "{d}/other_shape"], "the weights in {d}/other_shape/model.safetensors do not fit "),
    # bench
    (["bench", "--device", "cpu", "--ops", "plain,nope"], "--ops: unknown op(s) ['nope']"),
    (["bench", "--device", "cpu", "--repeats", "0"], "--repeats must be a positive number, got 0"),
    (["bench", "--device", "cpu", "--out", "{d}/a_file"], "--out {d}/a_file is an existing file, not a folder"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_command_line_is_one_line_before_any_work(argv, message, dirs, tmp_path, capsys, monkeypatch):
    forbid_model_loading(monkeypatch)
    from sharelora_kernels.benchmarks import suite

    monkeypatch.setattr(suite, "run_ops", lambda *a, **k: pytest.fail("bench started timing before its checks"))
    argv = [a.format(d=dirs) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, seconds = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"python -m sharelora_kernels {argv[0]}: error: {message.format(d=dirs)}"), err
    assert seconds < FAST_S
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["plan"], FINETUNE, ["compare"], ["bench"]])
def test_cuda_device_without_cuda_is_a_clear_error(command, dirs, tmp_path, capsys, monkeypatch):
    forbid_model_loading(monkeypatch)
    argv = [a.format(d=dirs) for a in command] + ["--device", "cuda", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{command[0]}: error: --device cuda is not usable" in err and "Traceback" not in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_out_that_cannot_be_made_is_refused_even_for_root(tmp_path, capsys, monkeypatch):
    """Permissions say yes to root everywhere; making a folder in /proc fails all the same."""
    forbid_model_loading(monkeypatch)
    code, _, _ = run_cli(["plan", "--out", "/proc/sharelora_out"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith(
        "python -m sharelora_kernels plan: error: --out /proc/sharelora_out cannot be written: "), err
    # a writable --out passes, and the check leaves nothing in it
    (tmp_path / "out").mkdir()
    code, _, _ = run_cli(["plan", "--text", tmp_path / "missing.txt", "--out", tmp_path / "out"])
    assert code == 2 and "error: text file" in capsys.readouterr().err and list((tmp_path / "out").iterdir()) == []


def test_existing_results_are_replaced_only_with_a_note(dirs, tmp_path, capsys, monkeypatch):
    """An --out that already holds results is named before the run starts (here the run then stops at a bad plan)."""
    forbid_model_loading(monkeypatch)
    (tmp_path / "losses.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    code, printed, _ = run_cli(["finetune", "--plan", dirs / "far_layers.json", "--out", tmp_path])
    assert code == 2
    assert f"note: --out {tmp_path} already holds adapter/, losses.json: they will be replaced" in printed
    assert (tmp_path / "losses.json").read_text() == "{}"


def test_every_option_has_help_that_shows_its_default():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    import importlib

    for name, module_name in COMMANDS.items():
        p = sub.add_parser(name)
        importlib.import_module(module_name).add_arguments(p)
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            assert action.required or "(default" in action.help, f"{name} {action.option_strings}: {action.help}"


def test_bench_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "main(argv)" not in text  # no developer docstring
    for expected in ("./sharelora-bench/<device>-<date>/", "never overwriting", "smoke run", "examples:", "(default:"):
        assert expected in text


def test_load_mismatch_names_the_side_that_lacks_the_module(tmp_path):
    import sharelora_kernels as sk

    sk.save(sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=["q_proj"])), tmp_path)
    wider = sk.apply(tiny_model(), sk.ShareLoRAConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"the model has module 'model\.layers\.0\.mlp\.down_proj', which the checkpoint "
                                         r"lacks \(16 such; 4 target modules in the checkpoint, 20 in the model\)"):
        sk.load(wider, tmp_path)


def test_a_folder_without_tokenizer_files_names_what_is_missing(tmp_path, capsys):
    """Transformers' message introduces its list with a colon on the first line: the list is kept."""
    folder = tmp_path / "notok"
    tiny_model(layers=1).save_pretrained(folder)
    code = run_cli(["plan", "--model", folder, "--out", tmp_path / "out"])[0]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"cannot load a tokenizer from {folder}: " in last and not last.endswith(":"), last
