"""Backend selection: env parsing, auto's measured choice (injected timers: no timing is asserted),
its signatures, dispatch_table(), and the per-device JSON cache (atomic, corrupt/foreign files)."""
from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from sharelora_kernels import ops  # noqa: E402
from sharelora_kernels.layer import SharedLoRALinear  # noqa: E402
from sharelora_kernels.ops import dispatch, dispatch_cache  # noqa: E402
from test_ops_fused_lora_linear import float64_reference, make_path, rel_err  # noqa: E402


class FakeTimer:
    """Runs each candidate once (the timed call must work) and reports the configured ms."""

    def __init__(self, times: dict[str, float]):
        self.times, self.calls = times, []

    def __call__(self, candidate, run, device):
        self.calls.append(candidate)
        run()
        return self.times[candidate]


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """auto on CPU tensors with the interpreted kernels as a candidate, a private cache dir, a clean table."""
    monkeypatch.setenv("SHARELORA_BACKEND", "auto")
    monkeypatch.setenv("SHARELORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch, "TIME_INTERPRETED_KERNELS", True)
    dispatch.clear()
    previous = dispatch.set_timer(None)
    yield tmp_path
    dispatch.set_timer(previous)
    dispatch.clear()


def call(m=5, k=24, n=16, kinds=("plain", "kron"), dropout=0.0, grad=True, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(m, k, requires_grad=grad)
    weight, bias = torch.randn(n, k), torch.randn(n)
    paths = [make_path(kind, k, n, 2) for kind in kinds]
    return x, weight, bias, paths, dropout


def run(x, weight, bias, paths, dropout, training=False):
    return ops.lora_linear(x, weight, bias, paths, dropout, training)


# ---------------------------------------------------------------------------------- settings
def test_env_values_are_checked_and_named(monkeypatch):
    x, weight, bias, paths, _ = call(grad=False)
    for name, value, message in (("SHARELORA_BACKEND", "fast", "SHARELORA_BACKEND must be one of ['torch', 'compose', "
                                                                "'triton', 'auto'], got 'fast'"),
                                 ("SHARELORA_AUTOTUNE", "fastest", "SHARELORA_AUTOTUNE must be one of ['small', 'perf', "
                                                                   "'full'], got 'fastest'")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ops.lora_linear(x, weight, bias, paths)
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.lora_linear(x, weight, bias, paths, backend="cuda")
    monkeypatch.setenv("SHARELORA_BACKEND", " Compose ")
    monkeypatch.setenv("SHARELORA_AUTOTUNE", "small")
    assert ops.backend_for(x) == "compose" and dispatch.autotune_mode() == "small"
    monkeypatch.delenv("SHARELORA_BACKEND")
    assert dispatch.backend_setting(torch.device("cuda")) == "auto"
    assert dispatch.backend_setting(torch.device("cpu")) == dispatch.DEFAULT_CPU == ops.backend_for(x)


def test_set_backend_wins_over_a_bad_backend_variable(monkeypatch):
    x, weight, bias, paths, _ = call(grad=False)
    monkeypatch.setenv("SHARELORA_BACKEND", "pytorch")
    with pytest.raises(ValueError, match="SHARELORA_BACKEND must be one of"):
        ops.lora_linear(x, weight, bias, paths)
    ops.set_backend("torch")
    assert ops.backend_for(x) == "torch" and ops.lora_linear(x, weight, bias, paths).shape == (5, 16)
    ops.set_backend(None)
    with pytest.raises(ValueError, match="SHARELORA_BACKEND must be one of"):
        ops.backend_for(x)
    monkeypatch.setenv("SHARELORA_AUTOTUNE", "fastest")  # a bad autotune mode is not the backend's to override
    ops.set_backend("torch")
    with pytest.raises(ValueError, match="SHARELORA_AUTOTUNE must be one of"):
        ops.lora_linear(x, weight, bias, paths)


def test_auto_on_cpu_without_the_interpreter_flag_runs_compose_untimed(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARELORA_BACKEND", "auto")
    monkeypatch.setenv("SHARELORA_CACHE_DIR", str(tmp_path))
    timer = FakeTimer({})
    previous = dispatch.set_timer(timer)
    try:
        y = run(*call())
    finally:
        dispatch.set_timer(previous)
    assert timer.calls == [] and not list(tmp_path.iterdir()) and y.shape == (5, 16)


# ---------------------------------------------------------------------------------- measured choice
def test_auto_keeps_the_faster_and_measures_each_signature_once(auto, monkeypatch):
    fused_calls = []
    real = ops._fused_lora_linear
    monkeypatch.setattr(ops, "_fused_lora_linear", lambda *a: fused_calls.append(1) or real(*a))
    timer = FakeTimer({"triton": 2.0, "compose": 1.0})
    dispatch.set_timer(timer)
    x, weight, bias, paths, p = call()
    y = run(x, weight, bias, paths, p)
    assert sorted(timer.calls) == ["compose", "triton"] and len(fused_calls) == 2  # verified, then timed
    y_ref, _ = float64_reference(x, weight, bias, paths, torch.zeros_like(y))
    assert rel_err(y, y_ref) < 1e-4
    run(*call(m=7, seed=1))  # same bucket (M <= 8), same everything else: remembered
    assert len(timer.calls) == 2 and len(fused_calls) == 2

    timer.times = {"triton": 1.0, "compose": 3.0}
    x, weight, bias, paths, p = call(m=9)  # M bucket 16: a new signature, now the kernels win
    y = run(x, weight, bias, paths, p)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *(t for q in paths for t in q.tensors)], dy)
    y_ref, grads_ref = float64_reference(x, weight, bias, paths, dy)
    assert len(timer.calls) == 4 and len(fused_calls) == 5  # verified, timed, then the real call
    assert rel_err(y, y_ref) < 1e-4 and all(rel_err(g, r) < 1e-4 for g, r in zip(grads, grads_ref))

    table = {(e["m_bucket"], e["mode"]): e for e in ops.dispatch_table()}
    assert set(table) == {(8, "fwd+bwd"), (16, "fwd+bwd")}
    assert table[(8, "fwd+bwd")]["choice"] == "compose" and table[(16, "fwd+bwd")]["choice"] == "triton"
    entry = table[(16, "fwd+bwd")]
    assert entry["times_ms"] == {"triton": 1.0, "compose": 3.0} and entry["source"] == "measured"
    assert entry["rejected"] == {} and entry["verified_error"]["triton"] < 1e-5
    assert "triton 1 ms, compose 3 ms" in entry["reason"]
    assert entry["kinds"] == ("plain", "kron") and entry["k"] == 24 and entry["n"] == 16 and entry["rank"] == 4


def test_a_backend_that_fails_when_timed_is_left_out_with_a_warning(auto):
    class Failing(FakeTimer):
        def __call__(self, candidate, run, device):
            if candidate == "triton":
                raise RuntimeError("no kernel for this GPU")
            return super().__call__(candidate, run, device)

    dispatch.set_timer(Failing({"compose": 5.0}))
    message = r"the triton backend failed on .* \(RuntimeError: no kernel for this GPU\); using compose"
    with pytest.warns(UserWarning, match=message):
        y = run(*call())
    (row,) = ops.dispatch_table()
    assert y.shape == (5, 16) and row["choice"] == "compose" and "triton failed" in row["reason"]
    assert row["errors"] == {"triton": "RuntimeError: no kernel for this GPU"}


def test_forward_only_dropout_and_dtype_are_separate_signatures(auto):
    timer = FakeTimer({"triton": 2.0, "compose": 1.0})
    dispatch.set_timer(timer)
    with torch.no_grad():
        run(*call())
    run(*call(grad=False))  # nothing requires grad except the adapters: still a training call
    run(*call(dropout=0.2), training=True)
    run(*call(dropout=0.2), training=False)  # eval: no dropout, the first signature again
    signatures = {(e["mode"], e["dropout"]) for e in ops.dispatch_table()}
    assert signatures == {("fwd", False), ("fwd+bwd", False), ("fwd+bwd", True)} and len(timer.calls) == 6


def test_measuring_leaves_real_gradients_and_the_random_stream_alone(auto):
    dispatch.set_timer(FakeTimer({"triton": 2.0, "compose": 1.0}))
    x, weight, bias, paths, p = call()
    torch.manual_seed(123)
    y = run(x, weight, bias, paths, p)  # measures (fwd+bwd, with random output gradients)
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after)
    assert x.grad is None and all(t.grad is None for q in paths for t in q.tensors)
    y.sum().backward()
    assert x.grad is not None and all(t.grad is not None for q in paths for t in q.tensors)


def test_group_under_auto_runs_module_by_module(auto, monkeypatch):
    from test_ops_grouped import QKV, float64_group, leaves_of, make_group, mix_paths

    monkeypatch.setattr(ops, "_grouped_lora_linear", lambda *a: pytest.fail("auto must not pick the grouped kernel"))
    timer = FakeTimer({"triton": 1.0, "compose": 2.0})
    dispatch.set_timer(timer)
    x, weights, biases, _ = make_group(QKV, "plain")
    paths = mix_paths(QKV)
    ys = ops.grouped_lora_linear(x, weights, biases, paths)
    dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, leaves_of(x, paths), dys)
    ys_ref, grads_ref = float64_group(x, weights, biases, paths, dys)
    assert all(rel_err(y, r) < 1e-4 for y, r in zip(ys, ys_ref))
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, grads_ref))
    assert len(ops.dispatch_table()) == 2  # q (N=48) and k = v (N=16): two signatures


def test_compiled_auto_runs_compose_without_timing(auto):
    timer = FakeTimer({})
    dispatch.set_timer(timer)
    torch.manual_seed(5)
    layer = SharedLoRALinear(torch.nn.Linear(24, 16), r=3, alpha=6.0)
    torch.nn.init.normal_(layer.lora_paths[0].B)
    x = torch.randn(4, 24)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert timer.calls == []
    assert torch.allclose(out, ops.lora_linear(x, layer.weight, layer.bias, layer.paths(), backend="compose"), atol=1e-6)


class DoubledGrad(torch.autograd.Function):
    """Identity forward, twice the gradient backward: a backend wrong only in one adapter gradient."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.mark.parametrize("wrong", ["output", "adapter gradient"])
def test_auto_rules_out_kernels_whose_results_differ(auto, monkeypatch, wrong):
    real = ops._fused_lora_linear

    def injected(x, weight, bias, paths, dropout_p, training):
        if wrong == "output":
            return real(x, weight, bias, paths, dropout_p, training) * 1.1
        first = paths[0]._replace(tensors=(DoubledGrad.apply(paths[0].tensors[0]), *paths[0].tensors[1:]))
        return real(x, weight, bias, [first, *paths[1:]], dropout_p, training)

    monkeypatch.setattr(ops, "_fused_lora_linear", injected)
    dispatch.set_timer(FakeTimer({"triton": 1.0, "compose": 2.0}))  # the wrong kernels are faster
    grad = torch.no_grad() if wrong == "output" else contextlib.nullcontext()  # fwd, or fwd+bwd
    with warnings.catch_warnings(record=True) as caught, grad:
        warnings.simplefilter("always")
        x, weight, bias, paths, p = call()
        y = run(x, weight, bias, paths, p)
        run(*call(seed=3))  # the same signature: compose, no second warning
    mine = [str(w.message) for w in caught if "differ from compose" in str(w.message)]
    assert len(mine) == 1 and "K=24 N=16" in mine[0] and "relative error" in mine[0]
    (row,) = ops.dispatch_table()
    assert row["choice"] == "compose" and set(row["rejected"]) == {"triton"} and "ruled out" in row["reason"]
    where = "y:" if wrong == "output" else "d path0 tensor0:"
    assert where in row["rejected"]["triton"] and row["verified_error"]["triton"] > 0.05
    y_ref, _ = float64_reference(x, weight, bias, paths, torch.zeros_like(y))
    assert rel_err(y, y_ref) < 1e-4
    entry, = json.loads(dispatch.cache_file("cpu").read_text())["entries"].values()
    assert entry["choice"] == "compose" and entry["rejected"] == row["rejected"]
    dispatch.clear()  # a new process reads the rejection back
    dispatch.set_timer(FakeTimer({}))
    with grad:
        run(*call())
    (row,) = ops.dispatch_table()
    assert row["choice"] == "compose" and row["rejected"] == entry["rejected"] and "read from" in row["reason"]


# ---------------------------------------------------------------------------------- the cache file
def test_cache_file_is_written_atomically_and_read_by_a_new_process(auto):
    dispatch.set_timer(FakeTimer({"triton": 2.0, "compose": 1.0}))
    run(*call())
    path = dispatch.cache_file("cpu")
    assert path.parent == auto and path.name == "dispatch-cpu.json"
    assert [p.name for p in auto.iterdir() if not p.name.endswith(".lock")] == [path.name]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["format"] == dispatch.CACHE_FORMAT and data["device"] == "cpu" and data["versions"]["torch"]
    (entry,) = data["entries"].values()
    assert entry["choice"] == "compose" and entry["times_ms"] == {"triton": 2.0, "compose": 1.0}

    dispatch.clear()  # as a fresh process: read, not measured
    dispatch.set_timer(FakeTimer({}))
    run(*call())
    (row,) = ops.dispatch_table()
    assert row["choice"] == "compose" and row["source"] == str(path) and "read from" in row["reason"]


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"format": "something else", "version": 1}), "is not a sharelora_kernels dispatch cache"),
    (json.dumps({"format": dispatch.CACHE_FORMAT, "version": dispatch.CACHE_VERSION, "device": "NVIDIA H100",
                 "versions": {}, "entries": {}}), "belongs to device 'NVIDIA H100'"),
    (json.dumps({"format": dispatch.CACHE_FORMAT, "version": dispatch.CACHE_VERSION, "device": "cpu",
                 "versions": {"torch": "1.0"}, "entries": {}}), "was measured with"),
    (b'{"format": "sharelora_kernels dispatch cache", "device": "\xff\xfe"}', "is not UTF-8 text"),
    (b"\x00\x9c\xff" * 40, "is not UTF-8 text"),
    (json.dumps({"format": dispatch.CACHE_FORMAT, "version": dispatch.CACHE_VERSION, "device": "cpu",
                 "versions": dispatch_cache.versions(), "entries": {"a key": 5}}), "has no 'entries' table of records"),
    ("", "is not valid JSON"),
], ids=["bad JSON", "other format", "other device", "other versions", "non-UTF-8 in JSON", "binary", "bad records",
        "empty"])
def test_a_bad_cache_file_gives_one_warning_and_is_rewritten(auto, content, problem):
    """Whatever the damage (bad bytes, bad JSON, another layout): one warning, the file rewritten, and
    a later process reads the new file without a word."""
    path = dispatch.cache_file("cpu")
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    dispatch.set_timer(FakeTimer({"triton": 2.0, "compose": 1.0}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(*call())
        run(*call(m=9))
        run(*call(m=17))
    mine = [w for w in caught if "dispatch cache" in str(w.message)]
    assert len(mine) == 1 and str(path) in str(mine[0].message) and problem in str(mine[0].message)
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and len(data["entries"]) == 3
    dispatch.clear()  # a later process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(*call())
    assert ops.dispatch_table()[0]["source"] == str(path)


def test_cache_dir_fallbacks_and_an_unwritable_dir(monkeypatch, tmp_path, auto):
    monkeypatch.delenv("SHARELORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dispatch.cache_dir() == tmp_path / "xdg" / "sharelora_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dispatch.cache_dir() == tmp_path / "home" / ".cache" / "sharelora_kernels"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SHARELORA_CACHE_DIR", str(blocker / "cache"))
    dispatch.set_timer(FakeTimer({"triton": 2.0, "compose": 1.0}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = run(*call())
    assert len(caught) == 1 and "could not write its dispatch cache" in str(caught[0].message)
    assert y.shape == (5, 16) and ops.dispatch_table()[0]["choice"] == "compose"


def test_measure_times_calls_back_to_back_with_one_clock_read_per_round(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(dispatch.time, "perf_counter", lambda: next(clock) * 1e-3)  # +1 ms per read
    calls = []
    ms = dispatch.measure_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3, calls=5)
    assert len(calls) == 2 + 3 * 5 and ms == pytest.approx(1 / 5)  # two reads per round of five calls


def test_result_error_names_the_worst_tensor_and_floors_tiny_adapter_gradients():
    want = {"y": torch.ones(3), "dx": torch.ones(3), "d path0 tensor0": torch.ones(3),
            "d path0 tensor2": torch.full((3,), 1e-4)}  # a gate core's cancelling sum: tiny
    err, where = dispatch.result_error({**want, "d path0 tensor2": torch.full((3,), 1.1e-4)}, want)
    assert err == pytest.approx(1e-4) and where == "d path0 tensor2"  # 1e-5 against 0.1 x 1, not 10 %
    err, where = dispatch.result_error({**want, "d path0 tensor0": torch.full((3,), 2.0)}, want)
    assert err == pytest.approx(1.0) and where == "d path0 tensor0"
    err, where = dispatch.result_error({**want, "dx": torch.tensor([1.0, float("nan"), 1.0])}, want)
    assert err == float("inf") and where == "dx"


def test_four_threads_meeting_new_signatures_at_once(auto):
    """auto's table under threads: every call answers, every choice is kept, in memory and on disk."""
    import threading
    import time

    def timer(candidate, run, device):
        time.sleep(0.0005)  # let the other threads in between timing and recording
        return {"triton": 2.0, "compose": 1.0}[candidate]

    dispatch.set_timer(timer)
    errors = []

    def worker(t):
        try:
            for k in range(8, 8 + 15):
                x, weight, bias, paths, dropout = call(m=3, k=k + 15 * t, n=6, kinds=("plain",), grad=False, seed=k)
                assert run(x, weight, bias, paths, dropout).shape == (3, 6)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(ops.dispatch_table()) == 60 and all(r["choice"] == "compose" for r in ops.dispatch_table())
    assert len(json.loads(dispatch.cache_file("cpu").read_text())["entries"]) == 60


WRITER = """
import os, sys, time
from pathlib import Path
from sharelora_kernels.ops import dispatch_cache
name, other, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
Path(sys.argv[2] + ".ready." + name).touch()
while not Path(str(other) + ".ready." + ("b" if name == "a" else "a")).exists():
    time.sleep(0.001)
for i in range(n):
    dispatch_cache.write_cache("cpu", {f"{name}{i}": {"choice": "compose", "note": "a field dispatch does not know"}})
"""


def test_two_processes_writing_the_cache_at_once_merge(auto, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "SHARELORA_CACHE_DIR": str(auto)}
    barrier = str(tmp_path / "barrier")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name, barrier, "150"], env=env) for name in "ab"]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    entries = json.loads(dispatch.cache_file("cpu").read_text())["entries"]
    assert set(entries) == {f"{name}{i}" for name in "ab" for i in range(150)}  # no choice lost
    assert entries["a0"]["note"] == "a field dispatch does not know"  # records kept as written


def test_the_next_cache_write_removes_a_killed_writers_temporary_file(auto):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a finished process: its id is that of a writer no longer running
    path = dispatch.cache_file("cpu")
    orphan = path.parent / f".{path.name}.{proc.pid}-x1.tmp"
    orphan.write_text("{half a fi")
    dispatch.set_timer(FakeTimer({"triton": 2.0, "compose": 1.0}))
    run(*call())
    assert not orphan.exists() and json.loads(path.read_text())["entries"]
