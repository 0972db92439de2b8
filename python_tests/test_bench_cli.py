"""bench as a user meets it: a new results folder per run (never overwriting), smoke runs marked as such,
every plot labelled with what was timed. Structure only: no timing value is asserted."""
import datetime
import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from sharelora_kernels.benchmarks import host, report, suite

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "cpu-2026-11-25" / "results.json"  # a full (not --quick) CPU run


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures saved while the test runs."""
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1])
    return figures


def test_default_output_is_a_new_folder_per_run(tmp_path, monkeypatch, drawn):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(suite, "run_default_backend_check", lambda *a, **k: None)  # keep it cheap: the similarity op alone
    real_host = host.run_host
    monkeypatch.setattr(host, "run_host", lambda quick: real_host(quick, kinds=("plain",)))
    argv = ["bench", "--quick", "--device", "cpu", "--ops", "similarity", "--no-e2e"]
    assert run_cli(argv)[0] == 0
    first = tmp_path / "sharelora-bench" / f"cpu-{datetime.date.today().isoformat()}"
    before = (first / "results.json").read_bytes()
    assert run_cli(argv)[0] == 0
    second = first.with_name(first.name + "-2")
    assert sorted(p.name for p in second.iterdir()) == sorted(report.OUTPUTS + report.HOST_OUTPUTS)  # a CPU run: host too
    assert (first / "results.json").read_bytes() == before  # the earlier result is untouched
    assert not (tmp_path / "bench").exists()

    data = json.loads((second / "results.json").read_text())
    assert data["config"]["smoke_run"] is True
    text = (second / "results.md").read_text()
    assert "SMOKE RUN (--quick)" in text.split("\n## ")[0]  # above every table
    assert "| similarity | 16x256x8 | torch |" in text and "(fwd) |" in text
    figure = drawn[-2]  # the ops' plot (the host plot follows it)
    assert "SMOKE RUN (--quick)" in figure._suptitle.get_text()
    (ax,) = figure.axes
    assert ax.get_title() == "similarity: angular_distance, forward only"
    assert ax.get_ylabel() == "forward time / plain torch formula's time"
    assert all(bar.get_hatch() == "//" for bar in ax.patches)


def test_a_full_run_is_not_marked_and_each_panel_says_what_was_timed(tmp_path, drawn):
    data = json.loads(COMMITTED.read_text())
    assert not report.is_smoke_run(data)
    assert "SMOKE RUN" not in report.markdown(data)
    report.plot_ratios(data, tmp_path / "ratio_vs_base.png")
    figure = drawn[-1]
    assert "SMOKE RUN" not in figure._suptitle.get_text()
    lora, similarity = figure.axes
    assert (lora.get_title(), lora.get_ylabel()) == ("LoRA ops, forward + backward (median of repeats)",
                                                    "fwd+bwd time / base F.linear fwd+bwd time")
    assert similarity.get_title() == "similarity: angular_distance, forward only"
    assert "similarity" not in " ".join(t.get_text() for t in lora.get_xticklabels())
    assert (tmp_path / "ratio_vs_base.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode, option", [("--host", ["--ops", "plain"]), ("--host", ["--threads", "2"]),
                                          ("--host", ["--device", "cpu"]), ("--serving", ["--repeats", "7"]),
                                          ("--serving", ["--no-e2e"]), ("--host", ["--serving"])])
def test_options_a_mode_does_not_read_are_refused(tmp_path, capsys, mode, option):
    status = run_cli(["bench", mode, "--quick", *option, "--out", str(tmp_path / "out")])[0]
    err = capsys.readouterr().err
    assert status == 2 and (f"{option[0]} does not apply to bench {mode}" in err or "one at a time" in err), err
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_refused_before_anything_is_timed(tmp_path, capsys, monkeypatch):
    from sharelora_kernels import ops

    monkeypatch.setenv("SHARELORA_BACKEND", "bogus")
    ops.refresh_settings()
    try:
        status = run_cli(["bench", "--quick", "--out", str(tmp_path / "out")])[0]
    finally:
        monkeypatch.delenv("SHARELORA_BACKEND")
        ops.refresh_settings()
    err = capsys.readouterr().err
    assert status == 2 and "SHARELORA_BACKEND must be one of" in err
    assert not (tmp_path / "out").exists()


def test_host_bench_writes_json_table_and_plot(tmp_path, drawn):
    out = tmp_path / "host"
    assert run_cli(["bench", "--host", "--quick", "--out", str(out)])[0] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(report.HOST_OUTPUTS)
    data = json.loads((out / "host.json").read_text())
    assert data["environment"]["command"].startswith("python -m sharelora_kernels bench") and data["host"]["smoke_run"]
    kinds = {c["kind"]: c for c in data["host"]["cases"]}
    assert set(kinds) == set(host.KINDS)
    for kind in ("plain", "bishare3", "grouped_qkv", "4bit_qlora"):
        for mode in host.MODES:
            assert set(kinds[kind]["modes"][mode]) == set(host.VARIANTS)
            assert kinds[kind]["modes"][mode]["peft"]["ratio_vs_peft"] == 1.0
    assert set(data["host"]["llama_step"]["variants"]) == {"peft_lora", "lora", "similarity", "bishare_slice",
                                                           "bishare_gate", "bishare_kron"}
    text = (out / "host.md").read_text()
    assert "SMOKE RUN" in text and "| plain | fwd+bwd |" in text and "| similarity |" in text
    assert [ax.get_title() for ax in drawn[-1].axes] == list(host.MODES)


@pytest.mark.parametrize("kind", ["plain", "grouped_qkv", "4bit"])
def test_host_bench_times_peft_layer_itself(kind):
    """The per-layer baseline is PEFT's LoRA layer as a model calls it, not wrapped in a PeftModel
    (whose forward a model pays once, not per layer); the base alone is timed frozen."""
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    if kind == "4bit":
        pytest.importorskip("bitsandbytes")
    calls, skipped = host.kind_calls(kind)
    assert not skipped
    peft = calls["peft"]
    layers = [peft] if isinstance(peft, torch.nn.Module) else []
    if kind == "grouped_qkv":  # a call of the three layers: find them in its closure
        layers = [m for cell in peft.__closure__ for m in cell.cell_contents]
    assert layers and all(isinstance(m, LoraLayer) for m in layers)
    if kind != "grouped_qkv":  # the base alone is frozen, as under a LoRA layer
        assert not any(p.requires_grad for p in calls["linear"].parameters())
    x = torch.randn(3, host.K)
    outs = calls["peft"](x)
    assert all(o.shape == (3, host.N) for o in (outs if isinstance(outs, list) else [outs]))
