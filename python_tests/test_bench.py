"""The quick CPU benchmark writes a well-formed report. Structure only: no timing value is asserted."""
from __future__ import annotations

import json

import pytest

from sharelora_kernels.__main__ import main as cli_main
from sharelora_kernels.benchmarks import main
from sharelora_kernels.benchmarks import report as bench_report
from sharelora_kernels.benchmarks.ops import LORA_OPS, OPS

pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    written = main(["--quick", "--device", "cpu", "--out", str(out)])
    return out, written, json.loads((out / "results.json").read_text())


def test_writes_json_and_markdown(quick_run):
    out, written, _ = quick_run
    assert written["json"] == str(out / "results.json")
    assert (out / "results.md").read_text().startswith("# sharelora_kernels benchmark")


def test_environment_is_recorded(quick_run):
    env = quick_run[2]["environment"]
    for key in ("device_name", "torch", "triton", "cuda", "python", "cpu_model", "command", "loadavg_before",
                "loadavg_after", "date"):
        assert key in env
    assert "--quick" in env["command"]


def test_every_lora_op_has_every_variant_and_a_fused_skip(quick_run):
    data = quick_run[2]
    cases = {c["op"]: c for c in data["ops"]}
    assert set(cases) == set(OPS)
    for op in [*LORA_OPS, "grouped_qkv"]:
        variants = cases[op]["variants"]
        assert set(variants) == {"base", "peft", "torch", "compose", "auto", "unsloth_order", "fused"}
        for v in ("base", "peft", "torch", "compose", "auto", "unsloth_order"):
            assert {"fwd_ms", "bwd_ms", "fwd+bwd_ms", "saved_for_backward_bytes"} <= set(variants[v])
            assert {"median", "q1", "q3", "min", "max", "n"} <= set(variants[v]["fwd+bwd_ms"])
            assert set(cases[op]["ratio_vs_base"][v]) == {"fwd", "bwd", "fwd+bwd"}
        assert "CUDA" in variants["fused"]["skipped"]
    assert any("fused" in s["what"] for s in data["skipped"])


def test_default_backend_check_and_e2e_sections(quick_run):
    data = quick_run[2]
    check = data["default_backend_check"]
    assert check["shape"] == {"M": 2048, "K": 1024, "N": 1024} and check["r"] == 16
    assert set(check["ratio_vs_base"]) == {"base", "peft", "torch", "compose"}
    assert check["default_backend"] in ("torch", "compose")
    assert check["target_met"] is None  # a smoke run (--quick) judges no target
    assert "Met: not judged (smoke run" in bench_report.markdown(data)
    assert set(data["e2e"]["variants"]) == {"peft_lora", "sharelora", "bishare"}
    for row in data["e2e"]["variants"].values():
        assert {"step_ms", "tokens_per_s", "trainable_params", "cuda_peak_bytes"} <= set(row)
    e2e = data["e2e"]["variants"]
    assert e2e["sharelora"]["trainable_params"] < e2e["peft_lora"]["trainable_params"]


def test_grouped_case_compares_one_output_per_module(quick_run):
    case = next(c for c in quick_run[2]["ops"] if c["op"] == "grouped_qkv")
    assert case["params"]["modules"] == 3 and case["params"]["paths"] == ["plain", "slice", "slice"]


@pytest.mark.parametrize("argv, message", [(["--ops", "plain,nope"], "unknown op(s) ['nope']"),
                                           (["--repeats", "0"], "--repeats must be a positive number")])
def test_bad_arguments_are_named(argv, message, capsys):
    assert cli_main(["bench", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def _bench_script(script: str):
    """The module of ``bench/<script>``."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["bench_fused_lora.py", "bench_grouped.py", "bench_multi_adapter.py"])
def test_gpu_scripts_run_on_cpu(script, tmp_path):
    """The standalone GPU benchmark scripts run (--device cpu --quick) and record their command."""
    module = _bench_script(script)
    out = tmp_path / "out.json"
    module.main(["--device", "cpu", "--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["environment"]["command"] == f"python bench/{script} --device cpu --quick --out {out}"



@pytest.mark.parametrize("script, argv, message", [
    ("bench_angular_distance.py", ["--repeats", "0"], "--repeats: must be at least 1, got 0"),
    ("bench_compose_cpu.py", ["--repeats", "-1"], "--repeats: must be at least 1, got -1"),
    ("bench_multi_adapter.py", ["--tokens", "0"], "--tokens: must be at least 1, got 0"),
    ("bench_fused_lora.py", ["--out", "{tmp}"], "is a folder; give the JSON file to write"),
    ("bench_grouped.py", ["--out", "{tmp}/missing/out.json"], "missing does not exist")])
def test_standalone_scripts_refuse_bad_options_before_timing(script, argv, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.json")]
    with pytest.raises(SystemExit) as stopped:
        _bench_script(script).main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_fused_lora_bench_on_cpu_names_its_figures_after_the_backend_that_ran(tmp_path):
    """The fused kernels do not run on the CPU: no figure there is called fused."""
    out = tmp_path / "out.json"
    (row,) = _bench_script("bench_fused_lora.py").main(["--device", "cpu", "--quick", "--out", str(out)])["results"]
    backend = row["backend"]
    assert backend != "triton" and not [key for key in row if key.startswith("fused_")]
    assert {f"{backend}_{kind}_fwd_bwd_ms" for kind in ("plain", "kron", "gate")} <= set(row)
    assert f"{backend}_plain_fwd_bwd_over_peft" in row


@pytest.mark.parametrize("method", ["sharelora", "bishare_kron"])
def test_multi_adapter_bench_variants_compute_the_same_layers(method):
    """The multi-adapter bench's three variants (ours, each adapter's rows alone, PEFT's masked loop
    over exported LoRA) give the same outputs for a mixed batch: its ratios compare one computation."""
    import torch

    bench = _bench_script("bench_multi_adapter.py")
    torch.manual_seed(0)
    with torch.inference_mode():
        modules, own, exported = bench.build(method, 8, 2, torch.device("cpu"), torch.float32)
        batch = bench.adapter_batch([i % 8 for i in range(bench.ROWS)], 8, 2)
        groups = [(a, batch.order[s:s + c]) for a, s, c in batch.segments]
        xs = {k: torch.randn(bench.ROWS * 2, k) for k in (bench.HIDDEN, bench.MLP)}
        ours = bench.run_ours(xs, modules, batch, False)
        for variant in (bench.run_per_adapter(xs, modules, groups), bench.run_peft_masked(xs, modules, groups)):
            for y, ref in zip(variant, ours):
                torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert own < exported  # a shared adapter is smaller than its export


@pytest.mark.parametrize("op", list(LORA_OPS))
def test_our_variants_compute_the_same_layer(op):
    """torch, compose, auto and unsloth_order of one case are one function (fp32, tiny shape): a
    baseline that computed something else would make every ratio meaningless."""
    import torch

    from sharelora_kernels.benchmarks.ops import lora_case

    torch.manual_seed(0)
    case = lora_case(op, 8, 32, 32, torch.device("cpu"), torch.float32)
    ref = case.forwards["torch"]()
    for variant in ("compose", "auto", "unsloth_order"):
        torch.testing.assert_close(case.forwards[variant](), ref, rtol=1e-5, atol=1e-5, msg=variant)
