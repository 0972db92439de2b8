"""The QLoRA comparison (benchmarks.qlora) writes a well-formed report. Structure only: no timing value is asserted."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from sharelora_kernels.benchmarks import qlora  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    results = qlora.main(["--quick", "--device", "cpu", "--variants", "peft_qlora,sharelora", "--threads", "1",
                          "--out", str(out)])
    return out, results


def test_report_files_and_environment(quick_run):
    out, results = quick_run
    assert json.loads((out / "qlora.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "qlora.md").read_text().startswith("# QLoRA comparison")
    assert "--quick" in results["environment"]["command"] and results["model"]["quantization"] == "nf4"
    assert results["environment"]["torch_threads"] == 1


def test_every_variant_has_its_figures(quick_run):
    variants = quick_run[1]["variants"]
    assert set(variants) == {"peft_qlora", "sharelora"}
    for row in variants.values():
        assert {"median", "q1", "q3", "min", "max", "n"} <= set(row["step_ms"]) and row["step_ms"]["n"] == 3
        assert row["step_cpu_ms"]["n"] == 3 and row["step_cpu_ms"]["min"] > 0
        assert row["tokens_per_s"] > 0
        # AdamW keeps two float32 moments per trainable parameter (and a step count per tensor)
        assert row["optimizer_state_bytes"] >= 8 * row["trainable_params"] > 0
        assert row["peak_bytes"] is None or row["peak_bytes"] >= row["step_peak_bytes"] >= 0
    assert variants["sharelora"]["trainable_params"] < variants["peft_qlora"]["trainable_params"]


def test_merge_rounding_is_reported(quick_run):
    rounding = quick_run[1]["merge_rounding"]
    assert rounding["adapters_vs_base"] > 0 and rounding["merged_vs_unmerged"] > 0


@pytest.mark.parametrize("argv", [["--variants", "peft_qlora,qlora2"], ["--threads", "0"], ["--out", __file__]])
def test_bad_options_are_refused_before_any_work(argv, capsys):
    with pytest.raises(SystemExit):
        qlora.main([*argv, "--device", "cpu"])
    assert "error:" in capsys.readouterr().err
