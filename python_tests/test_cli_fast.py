"""The command line answers at once: --help of every command and every option error come back without
importing torch or transformers, a mistyped option or command gets one line naming the command, with a
suggestion, and help text wraps at word boundaries."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("plan", "finetune", "compare", "bench", "gpu-check")
PROG = "python -m sharelora_kernels"

# argv -> (exit status, a piece of stderr or stdout it must hold)
CASES = {
    **{(c, "--help"): (0, f"usage: {PROG} {c}") for c in COMMANDS},
    ("--help",): (0, f"usage: {PROG}"),
    ("plna",): (2, "did you mean plan?"),
    ("plan", "--epss", "0.9"): (2, "did you mean --eps?"),
    ("finetune", "--plan", "p.json", "--step", "3", "--ste-ps", "3"): (2, "did you mean --steps?"),
    ("compare", "--methods", "lora", "--heldot", "3"): (2, "did you mean --heldout?"),
    ("bench", "--repeat=3", "--quik"): (2, "did you mean --quick?"),
    ("gpu-check", "--budjet", "3"): (2, "did you mean --budget?"),
    ("plan", "--method", "anchr"): (2, "did you mean anchor?"),
    ("plan", "--eps", "2"): (2, "--eps must be in [0, 1], got 2.0"),
    ("plan", "--threads", "0"): (2, "--threads must be >= 1"),
    ("finetune", "--plan", "p.json", "--steps", "0"): (2, "--steps must be a positive number"),
    ("compare", "--seq-len", "1"): (2, "--seq-len must be >= 2"),
    ("finetune", "--plan", "p.json", "--seed", "-1"): (2, "--seed must be in [0, 4294967295], got -1"),
    ("compare", "--methods", "lora,sharelor"): (2, "--methods: unknown ['sharelor']"),
    ("bench", "--ops", "plain,foo"): (2, "--ops: unknown op(s) ['foo']"),
    ("bench", "--threads", "-1"): (2, "--threads must be >= 1"),
    ("gpu-check", "--budget", "0"): (2, "--budget must be a positive number"),
    ("plan", "--eps", "x"): (2, "invalid float value: 'x'"),
}

CHILD = r"""
import contextlib, io, json, sys, time
from sharelora_kernels.__main__ import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    heavy = [m for m in ("torch", "transformers", "numpy", "matplotlib") if m in sys.modules]
    results.append({"argv": argv, "code": code, "text": out.getvalue() + err.getvalue(),
                    "seconds": time.perf_counter() - start, "heavy": heavy})
print(json.dumps(results))
"""


def run_child(cases, columns: int = 100) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": str(columns)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([list(a) for a in cases])], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_help_and_option_errors_import_nothing_heavy():
    for r in run_child(CASES):
        code, piece = CASES[tuple(r["argv"])]
        assert r["heavy"] == [], f"{r['argv']} imported {r['heavy']}"
        assert r["code"] == code, (r["argv"], r["text"])
        assert piece in r["text"], (r["argv"], r["text"])
        assert r["seconds"] < 5, f"{r['argv']} took {r['seconds']:.1f} s"  # generous: it takes milliseconds


def test_an_error_argparse_reports_is_one_line_naming_the_command_and_option():
    """Unknown option, bad type, bad choice, missing option, unknown command: one line, no usage block."""
    cases = {("plan", "--epss", "0.9"): f"{PROG} plan: error: unrecognized arguments: --epss 0.9 (did you mean --eps?)",
             ("plan", "--eps", "x"): f"{PROG} plan: error: argument --eps: invalid float value: 'x'",
             ("plan", "--method", "anchr"): f"{PROG} plan: error: argument --method: invalid choice: 'anchr'",
             ("finetune",): f"{PROG} finetune: error: the following arguments are required: --plan",
             ("plna",): f"{PROG}: error: unknown command 'plna' (did you mean plan?)"}
    for r in run_child(cases):
        argv = tuple(r["argv"])
        command = f"{PROG} {argv[0]}" if argv[0] in COMMANDS else PROG
        assert r["code"] == 2 and r["text"].count("\n") == 1, r
        assert r["text"].startswith(cases[argv]) and r["text"].endswith(f"; see {command} --help\n"), r


def test_help_wraps_at_word_boundaries():
    for columns in (60, 100):
        for r in run_child([(c, "--help") for c in COMMANDS], columns):
            lines = r["text"].splitlines()
            prose = [line for line in lines if not line.startswith(" ")]  # indented file lists and examples stay as written
            assert max(len(line) for line in prose) <= columns, r["argv"]
            broken = [line for line in lines if re.search(r"[A-Za-z]-$", line.rstrip())]
            assert broken == [], (r["argv"], broken)  # e.g. "--target-" with "modules" on the next line
            options = set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", " ".join(lines)))
            assert {o for o in options if re.search(re.escape(o) + r"(?![a-z0-9-])", r["text"]) is None} == set()


def test_bench_names_every_op_it_builds():
    from sharelora_kernels.benchmarks import OPS
    from sharelora_kernels.benchmarks.ops import OPS as BUILDERS

    assert OPS == tuple(BUILDERS)


def test_load_warning_when_other_work_shared_the_cores():
    from sharelora_kernels.benchmarks.environment import load_warning

    quiet = {"cpu_count": 2, "loadavg_before": [0.5, 0.4, 0.3], "loadavg_after": [1.9, 1.0, 0.5]}
    busy = {**quiet, "loadavg_after": [6.2, 5.0, 3.0]}
    assert load_warning(quiet) is None
    warning = load_warning(busy)
    assert "6.2" in warning and "2 cores" in warning and "not comparable" in warning and "\n" not in warning
    assert warning.endswith("(rerun on a quiet machine, or with --threads 1)")
    assert load_warning({**busy, "torch_threads": 1}).endswith("(rerun on a quiet machine)")  # it ran with one
    assert load_warning({"cpu_count": 2, "loadavg_before": None, "loadavg_after": None}) is None


def test_finetune_says_what_a_bishare_plan_shares():
    from sharelora_kernels.cli.fitting import structure
    from sharelora_kernels.config import ShareLoRAConfig

    line = structure(ShareLoRAConfig(method="bishare", shape_transform="kron", kron_dim=64))
    assert "local r=2" in line and "intra r=4" in line and "inter r=16" in line and "Kronecker" in line and "d_s=64" in line
    assert "share sets []" not in line
    assert "share sets [[1, 2]]" in structure(ShareLoRAConfig(method="similarity", share_sets=[[1, 2]]))
    assert "no share set" in structure(ShareLoRAConfig(method="similarity"))
