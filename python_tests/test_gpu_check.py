"""gpu-check --tiny (every phase on tiny shapes through the Triton interpreter): the JSON's structure,
its rewrite after every measurement, the budget, bad options, and a non-zero exit on a failed check.
Structure only: no timing value is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from sharelora_kernels.__main__ import main  # noqa: E402
from sharelora_kernels.benchmarks import correctness, performance  # noqa: E402
from sharelora_kernels.cli import gpu_check  # noqa: E402

PHASES = ("a_ceilings", "b_correctness", "c_performance", "d_angular")
LORA_VARIANTS = {"base", "triton_gemm", "fused", "compose", "auto", "unsloth_order", "peft"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    saves = []
    real_save = gpu_check.Report.save

    def counting_save(self):
        saves.append(sum(len(p["items"]) for p in self.data["phases"].values()))
        real_save(self)

    gpu_check.Report.save = counting_save
    try:
        status = main(["gpu-check", "--tiny", "--out", str(out)])
    finally:
        gpu_check.Report.save = real_save
    return status, json.loads((out / "gpu_check.json").read_text()), saves, out


def test_every_phase_runs_and_passes(tiny_run):
    status, data, _, _ = tiny_run
    assert status == 0 and data["failures"] == [] and data["stopped"] is None and data["tiny"]
    for key in PHASES:
        assert data["phases"][key]["status"] == "done", key
    assert "gpu-check --tiny" in data["environment"]["command"]


def test_ceilings_and_angular_distance_are_measured(tiny_run):
    data = tiny_run[1]
    gemm, copy = data["phases"]["a_ceilings"]["items"]
    assert gemm["tflops"] > 0 and copy["gbps"] > 0 and gemm["n"] == 256
    (angular,) = data["phases"]["d_angular"]["items"]
    assert "skipped" in angular or (angular["gbps"] > 0 and angular["max_abs_difference_vs_float64"] < 1e-6)


def test_correctness_covers_every_variant(tiny_run):
    rows = tiny_run[1]["phases"]["b_correctness"]["items"]
    assert len(rows) == len(correctness.checks(correctness.TINY, "cpu")) and all(r["passed"] for r in rows)
    names = {(r["backend"], r["name"]) for r in rows}
    for backend in ("triton", "compose"):
        for name in ("all kinds, fp16 base, fp32 adapters", "all kinds, fp32 base, bf16 adapters", "all kinds, M = 1",
                     "all kinds, transposed x, fp32", "dropout: forward mask = backward mask",
                     "grouped q/k/v (GQA) vs per-module float64", "bitwise repeatable fwd+bwd"):
            assert (backend, name) in names
    assert {kind for _, name in names for kind in ("plain", "slice", "gate", "kron") if name.startswith(kind + " ")} == \
        {"plain", "slice", "gate", "kron"}
    int64 = next(r for r in rows if r["name"].startswith("forced int64"))
    assert int64["patched"]
    masks = [r for r in rows if "mask" in r["name"]]
    assert masks and all(r["masks_agree"] for r in masks)


def test_performance_cases_time_every_variant(tiny_run):
    data = tiny_run[1]
    cases = data["phases"]["c_performance"]["items"]
    assert [c["name"] for c in cases] == [performance.case_name(s) for s in performance.case_list(performance.TINY, True)]
    for case in cases[:-1]:
        assert set(case["variants"]) == LORA_VARIANTS, case["name"]
        for name, row in case["variants"].items():
            assert {"median", "q1", "q3", "min", "max", "n"} <= set(row["fwd_ms"]) and "fwd+bwd_ms" in row
            assert set(case["ratio_vs_base"][name]) == {"fwd", "fwd+bwd"}
        assert len(case["goals"]) == 5
    assert set(cases[-1]["variants"]) == {"base", "grouped", "per_module", "compose", "auto", "peft"}
    table = data["dispatch_table"]
    assert table and all(set(row["times_ms"]) == {"triton", "compose"} and row["reason"] for row in table)
    assert all(row["configs"] == 1 for row in data["compile_counts"])


def test_json_is_rewritten_after_every_measurement(tiny_run):
    _, data, saves, out = tiny_run
    total = sum(len(p["items"]) for p in data["phases"].values())
    assert set(range(1, total + 1)) <= set(saves)  # a save after each new item
    assert [p.name for p in out.iterdir() if p.suffix == ".tmp"] == []


def test_a_failed_check_exits_non_zero_and_peft_missing_is_a_skip(tmp_path, monkeypatch, capsys):
    from sharelora_kernels.benchmarks import ops as bench_ops
    from sharelora_kernels.ops import compose

    real, all_checks = compose.lora_linear, correctness.checks
    monkeypatch.setattr(compose, "lora_linear", lambda *a, **k: real(*a, **k) * 1.1)  # a wrong compose backend
    monkeypatch.setattr(correctness, "checks", lambda sizes, device: [
        c for c in all_checks(sizes, device) if c.backend == "compose"][:2])
    monkeypatch.setattr(performance, "case_list", lambda shapes, tiny=False: [dict(op="plain", k=32, n=32, r=4)])

    def no_peft(*args, **kwargs):
        raise ImportError("No module named 'peft'")

    monkeypatch.setattr(bench_ops, "peft_layer", no_peft)
    assert main(["gpu-check", "--tiny", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(data["failures"]) == 2 and all(f.startswith("(b) compose") for f in data["failures"])
    assert "peft is not installed" in data["phases"]["c_performance"]["items"][0]["variants"]["peft"]["skipped"]
    assert "FAILED (b) compose" in capsys.readouterr().out


def test_budget_stops_cleanly(tmp_path):
    assert main(["gpu-check", "--tiny", "--budget", "1e-9", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["stopped"] == "budget" and data["phases"]["a_ceilings"]["status"].startswith("stopped: --budget")
    assert "b_correctness" not in data["phases"]


@pytest.mark.parametrize("argv, message", [(["--budget", "0"], "--budget must be a positive number, got 0.0"),
                                           (["--budget", "-5"], "--budget must be a positive number"),
                                           ([], "needs a CUDA GPU")])
def test_bad_options_are_named(argv, message, capsys, tmp_path):
    assert main(["gpu-check", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_out_naming_a_file_and_the_bench_script(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("")
    assert main(["gpu-check", "--tiny", "--out", str(target)]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}  # this checkout's package
    done = subprocess.run([sys.executable, str(script), "--budget", "0"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "--budget must be a positive number" in done.stderr
