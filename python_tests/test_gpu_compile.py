"""Every Triton kernel compiles for an H100 (sm_90) through Triton's real GPU pipeline, on the CPU.

The interpreter cannot see tl.dot shape/dtype rules, pointer casts or shared memory; the GPU compiler
can, and runs without a GPU. This compiles each kernel's largest autotune config (and the fixed
config of the table-mode gradient kernel) for the default training setup: bfloat16 base, float32
adapters, with and without dropout and Kronecker rows, specialised as the launcher specialises them. ``python -m sharelora_kernels.ops.compile_check`` does every
dtype pair.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import json, sys
from sharelora_kernels.ops.compile_check import run
print(json.dumps(run(90, dtype_cases=[("bf16", "fp32", "tf32")])))
"""


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    compiled = {(r["kernel"], json.dumps(r["variant"], sort_keys=True), r["layout"]) for r in results}
    assert {k for k, _, _ in compiled} == {"fused_linear", "grouped_linear", "lowrank_project", "lowrank_grad"}
    assert len(compiled) == 11  # constexpr variants x launch layouts: 2x2 + 2 + 2 + 3
    assert all(0 < r["shared_bytes"] <= 232448 for r in results)
    assert all(r["registers"] is None or 0 < r["registers"] <= 255 for r in results)


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    from sharelora_kernels.ops import compile_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        compile_check.run()
