"""gpu-check --tiny (every phase on tiny shapes through the Triton interpreter): the JSON's structure,
its rewrite after every measurement, the budget, bad options, and a non-zero exit on a failed check.
Structure only: no timing value is asserted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from sharelora_kernels.__main__ import main  # noqa: E402
from sharelora_kernels.benchmarks import correctness, perf_correctness, performance  # noqa: E402
from sharelora_kernels.cli import gpu_check  # noqa: E402

PHASES = ("a_ceilings", "b_correctness", "b_perf_configs", "c_performance", "d_angular")
LORA_VARIANTS = {"base", "triton_gemm", "fused", "compose", "auto", "unsloth_order", "peft"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The real command: each phase in its own child process."""
    out = tmp_path_factory.mktemp("gpu_check")
    status = main(["gpu-check", "--tiny", "--out", str(out)])
    return status, json.loads((out / "gpu_check.json").read_text()), out


def test_every_phase_runs_and_passes(tiny_run):
    status, data, _ = tiny_run
    assert status == 0 and data["failures"] == [] and data["stopped"] is None and data["tiny"]
    for key in PHASES:
        assert data["phases"][key]["status"] == "done", key
    assert "gpu-check --tiny" in data["environment"]["command"]


def test_perf_configs_are_verified_at_the_timed_shapes(tiny_run):
    rows = tiny_run[1]["phases"]["b_perf_configs"]["items"]
    assert rows and all(r["passed"] and r["non_finite_elements"] == 0 for r in rows)
    names = " | ".join(r["name"] for r in rows)
    for part in ("TMA plain", "pointer plain", "dropout 0.1", "Kronecker", "gate", "grouped 3", "grouped 5"):
        assert part in names


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
        assert case["goals"] == {} and "CPU smoke run" in case["goals_not_judged"]  # never "NOT met" here
    assert set(cases[-1]["variants"]) == {"base", "grouped", "per_module", "compose", "auto", "peft"}
    table = data["dispatch_table"]
    assert table and all(set(row["times_ms"]) == {"triton", "compose"} and row["reason"] for row in table)
    assert all(row["configs"] == 1 for row in data["compile_counts"])


def test_each_phase_ran_in_its_own_process_and_left_its_file(tiny_run):
    _, data, out = tiny_run
    for key in PHASES:
        child = json.loads((out / f"phase-{key}.json").read_text())
        assert child["phases"][key]["items"] == data["phases"][key]["items"]
        assert 0 < data["phases"][key]["wall_s"] <= data["phases"][key]["limit_s"]
        assert data["phases"][key]["begun_at_s"] + data["phases"][key]["limit_s"] <= data["budget_s"] + 0.2
    assert [p.name for p in out.iterdir() if p.suffix == ".tmp"] == []


def test_a_failed_check_exits_non_zero_and_peft_missing_is_a_skip(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "ISOLATE", False)  # the patches below live in this process
    from sharelora_kernels.benchmarks import ops as bench_ops
    from sharelora_kernels.ops import compose

    real, all_checks = compose.lora_linear, correctness.checks
    monkeypatch.setattr(compose, "lora_linear", lambda *a, **k: real(*a, **k) * 1.1)  # a wrong compose backend
    monkeypatch.setattr(correctness, "checks", lambda sizes, device: [
        c for c in all_checks(sizes, device) if c.backend == "compose"][:2])
    monkeypatch.setattr(performance, "case_list", lambda shapes, tiny=False: [dict(op="plain", k=32, n=32, r=4)])
    monkeypatch.setattr(perf_correctness, "checks", lambda shapes, device, cap: [])

    def no_peft(*args, **kwargs):
        raise ImportError("No module named 'peft'")

    monkeypatch.setattr(bench_ops, "peft_layer", no_peft)
    assert main(["gpu-check", "--tiny", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(data["failures"]) == 2 and all(f.startswith("(b) compose") for f in data["failures"])
    assert "peft is not installed" in data["phases"]["c_performance"]["items"][0]["variants"]["peft"]["skipped"]
    assert "FAILED (b) compose" in capsys.readouterr().out


def _child_item(payload: dict, status: str = "running") -> None:
    Path(payload["out"]).write_text(json.dumps({"phases": {payload["phase"]: {"status": status, "items": [
        {"name": "first item", "passed": True}]}}}))


def child_segfault(payload):
    _child_item(payload)
    os.kill(os.getpid(), signal.SIGSEGV)


def child_cuda_error(payload):
    _child_item(payload)
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def child_hang(payload):
    _child_item(payload)
    time.sleep(600)


def child_ok(payload):
    _child_item(payload, "done")


@pytest.mark.parametrize("target, status", [
    ("child_segfault", "fault: killed by SIGSEGV"),
    ("child_cuda_error", "fault: exit status 1: RuntimeError: CUDA error: an illegal memory access"),
    ("child_hang", "stopped: stopped at its time limit of 15 s")])
def test_a_fault_or_a_hang_costs_one_phase(tmp_path, monkeypatch, target, status):
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    data = {"phases": {}, "stopped": None, "dispatch_table": [], "compile_counts": []}
    report = gpu_check.Report(tmp_path / "gpu_check.json", 60.0, data)
    start = time.monotonic()
    gpu_check.run_phase(report, "b_correctness", True, tmp_path, 15.0, f"test_gpu_check:{target}")
    assert time.monotonic() - start < 20  # a hang is stopped at its limit
    gpu_check.run_phase(report, "c_performance", True, tmp_path, 60.0, "test_gpu_check:child_ok")
    faulted, next_phase = data["phases"]["b_correctness"], data["phases"]["c_performance"]
    assert faulted["status"].startswith(status) and faulted["items"] == [{"name": "first item", "passed": True}]
    assert next_phase["status"] == "done" and len(next_phase["items"]) == 1
    assert json.loads((tmp_path / "gpu_check.json").read_text())["phases"]["b_correctness"]["items"]
    lines = gpu_check.failures({**data, "phases": {"b_correctness": faulted}})
    assert lines == [f"(b) phase {faulted['status']}"]  # a hang fails the run too



def child_pid_hang(payload):
    Path(payload["pid_file"]).write_text(str(os.getpid()))
    time.sleep(600)


def _gone(pid: int, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_command_leaves_no_phase_process_working_on(tmp_path, stop):
    """The command stopped (SIGTERM: its cleanups run; SIGKILL: the kernel's parent-death signal) while
    a phase runs: the phase's process ends too, instead of working on (holding the GPU)."""
    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    pid_file = tmp_path / "pid"
    code = ("from pathlib import Path\n"
            "from sharelora_kernels.cli.isolated import run_isolated, sigterm_as_exit\n"
            "with sigterm_as_exit():\n"
            f"    run_isolated('test_gpu_check:child_pid_hang', {{'pid_file': {str(pid_file)!r}}}, 600, "
            f"Path({str(tmp_path / 'phase.log')!r}))\n")
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    child = int(pid_file.read_text())
    parent.send_signal(stop)
    assert parent.wait(timeout=60) == (128 + stop if stop == signal.SIGTERM else -stop)
    assert _gone(child)


def test_bad_settings_are_refused_before_any_phase(tmp_path, capsys, monkeypatch):
    from sharelora_kernels import ops

    monkeypatch.setenv("SHARELORA_AUTOTUNE", "fastest")
    ops.refresh_settings()
    try:
        assert main(["gpu-check", "--tiny", "--out", str(tmp_path)]) == 2
    finally:
        monkeypatch.delenv("SHARELORA_AUTOTUNE")
        ops.refresh_settings()
    assert "SHARELORA_AUTOTUNE must be one of" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()


def test_budget_below_the_minimum_is_refused(tmp_path, capsys):
    assert main(["gpu-check", "--tiny", "--budget", "100", "--out", str(tmp_path)]) == 2
    assert f"--budget 100 s is too small: gpu-check needs at least {gpu_check.MIN_BUDGET:g} s" in capsys.readouterr().err
    assert gpu_check.DEFAULT_BUDGET + 60 <= 600  # one 10-minute command with a minute to spare


def test_phase_limits_share_what_is_left():
    keys = list(gpu_check.PHASES)
    limits, left = [], gpu_check.DEFAULT_BUDGET
    for i in range(len(keys)):
        limits.append(gpu_check.phase_limits(left, keys[i:]))
        left -= limits[-1] / 2  # each phase uses half its limit: the rest passes on
    assert limits[0] == pytest.approx(gpu_check.PHASE_SHARES[keys[0]] * gpu_check.DEFAULT_BUDGET)
    assert limits[-1] > limits[0]
    assert min(limits) >= gpu_check.MIN_PHASE_S


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


def test_perf_config_check_catches_an_unwritten_tile(monkeypatch):
    """A kernel that leaves part of y unwritten fails: allocations are NaN-poisoned in the check."""
    import torch

    from sharelora_kernels import ops
    from sharelora_kernels.benchmarks import perf_correctness

    real = ops._fused_lora_linear

    def half_written(x, weight, bias, paths, dropout_p, training):
        y = real(x, weight, bias, paths, dropout_p, training)
        out = torch.empty_like(y)  # poisoned inside the check
        out[: y.shape[0] // 2] = y[: y.shape[0] // 2]
        return out

    monkeypatch.setattr(ops, "_fused_lora_linear", half_written)
    shapes = perf_correctness.Shapes(12, 16, 16, 2, 4)
    row = perf_correctness.case_check(shapes, "cpu", (16,), dtype=torch.float32)
    assert not row["passed"] and row["non_finite_elements"] > 0
    monkeypatch.setattr(ops, "_fused_lora_linear", real)
    row = perf_correctness.case_check(shapes, "cpu", (16,), dtype=torch.float32)
    assert row["passed"] and row["non_finite_elements"] == 0 and row["vs_float64_sampled"]["y"] < 1e-4
