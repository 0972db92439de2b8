"""Check every GPU claim of sharelora_kernels in one process that fits a short GPU window.

    python -m sharelora_kernels gpu-check [--out DIR] [--budget SECONDS] [--tiny]

Phases, in order:
  (a) environment and ceilings: GPU, versions, bf16 GEMM TFLOP/s (cuBLAS, 8192^3), copy GB/s;
  (b) correctness of every kernel variant against float64 (SHARELORA_AUTOTUNE=small, and every
      autotuned kernel pinned to its smallest config: one compile per variant, ragged shapes);
  (b2) what (c) times, verified: each config (c) may pick, forced one at a time, at (c)'s shapes,
      fwd+bwd, outputs NaN-poisoned, vs compose and float64 on sampled rows (``perf_correctness``);
  (c) performance, bf16, M = 8192: base, triton_gemm, fused, compose, auto, unsloth_order, peft at
      (K, N) = (4096, 4096), (4096, 14336), (14336, 4096), r = 16 and 64, fwd and fwd+bwd, device
      time (calls back to back between CUDA events) and host µs per call, variants interleaved;
      dropout 0.1, Kronecker and gate; one LLaMA-7B layer grouped
      vs per-module (most important first; at most PERF_AUTOTUNE_CAP configs autotuned per kernel);
  (d) the CUDA angular-distance kernel's bytes/s against the copy bandwidth (n=65536, L=33, d=4096).
Each phase runs in its own child process (``cli.isolated``) with its own time limit, its share of
what is left of --budget: a CUDA fault, a hang or an out-of-memory ends that child only, is
reported by name, and the next phase starts on a fresh context. --budget is a hard limit for the
whole command, compiles included (a child past its share is stopped; what it measured is kept).
A child writes DIR/phase-<name>.json after every measurement; DIR/gpu_check.json is rewritten
(temp file + rename) after every phase. A summary table is printed at the end. Exit status 1 if a
correctness check failed, a phase faulted or hung or one of our backends failed in (c), else 0. --tiny:
the same phases on tiny shapes on the CPU through Triton's interpreter (a smoke run whose numbers
mean nothing: its performance goals are not judged).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..files import atomic_write
from . import CommandError, check_settings, require_positive
from .isolated import Outcome, call, die_with_parent, run_isolated, sigterm_as_exit

if TYPE_CHECKING:
    import torch

HELP = "every GPU claim checked in one run: ceilings, correctness, performance, angular distance"
# One 10-minute command with a minute to spare: machine-side start-up is outside, compiles inside.
DEFAULT_BUDGET = 540.0
# Each phase's share of what is left of the budget when it starts (a phase that ends early leaves
# its time to the next), and the fewest seconds a phase needs (a child's start and imports included).
PHASE_SHARES = {"a_ceilings": 0.08, "b_correctness": 0.17, "b_perf_configs": 0.30, "c_performance": 0.37,
                "d_angular": 0.08}
LABELS = {"a_ceilings": "a", "b_correctness": "b", "b_perf_configs": "b2", "c_performance": "c", "d_angular": "d"}
MIN_PHASE_S = 15.0
MIN_BUDGET = MIN_PHASE_S / min(PHASE_SHARES.values())
STOP_MARGIN = 0.15  # a child starts no new item in the last 15 % of its limit (an item may take that long)
ISOLATE = True  # False: phases run in this process (tests that patch the package need that)
PERF_AUTOTUNE_CAP = 3  # configs autotuned per kernel in (c): the compile plan in README fits 9 minutes
OUR_VARIANTS = ("fused", "compose", "auto", "grouped", "per_module")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="folder for gpu_check.json and the dispatch cache "
                        "(default: a new ./sharelora-bench/gpu-check-<device>-<date>[-N]/)")
    p.add_argument("--budget", metavar="SECONDS", type=float, default=DEFAULT_BUDGET,
                   help=f"hard limit for the whole command, in seconds, compiles included, at least {MIN_BUDGET:g} "
                        f"(default: {DEFAULT_BUDGET:g})")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes on the CPU through the Triton interpreter: a smoke run, its numbers mean "
                        "nothing (default: off, the real check on a CUDA GPU)")


class Report:
    """The JSON of one run, rewritten atomically after every measurement, and the budget clock."""

    def __init__(self, path: Path, budget: float, data: dict, start: float | None = None):
        """start: the ``time.monotonic()`` the budget counts from (default: now)."""
        self.path, self.budget, self.data = path, budget, data
        self.start = time.monotonic() if start is None else start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() >= self.budget

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        text = json.dumps(self.data, indent=1, default=str)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def phase(self, key: str) -> dict:
        return self.data["phases"].setdefault(key, {"status": "running", "started_at_s": round(self.elapsed(), 1),
                                                    "items": []})

    def add(self, key: str, item: dict) -> None:
        """Append a measurement (stamped with the run's clock) and rewrite the JSON."""
        self.phase(key)["items"].append({**item, "finished_at_s": round(self.elapsed(), 1)})
        self.save()

    def done(self, key: str) -> None:
        phase = self.phase(key)
        phase["status"], phase["elapsed_s"] = "done", round(self.elapsed() - phase["started_at_s"], 1)
        self.save()

    def stop_here(self, key: str) -> bool:
        """True (and the phase marked stopped) when the budget is spent."""
        if not self.over_budget():
            return False
        self.phase(key)["status"] = f"stopped: its {self.budget:.0f} s spent (the phase's share of --budget)"
        self.data["stopped"] = "budget"
        self.save()
        return True


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set env vars for the run, restoring the previous values after (the package reads its
    settings again both times: ``ops.refresh_settings``)."""
    from ..ops.dispatch import refresh_settings

    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    refresh_settings()
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        refresh_settings()


def _tuned_kernels() -> list:
    """Every autotuned kernel of the package (``ops.autotune.TUNED_KERNELS``: the GEMMs; the
    memory-bound kernels run fixed configs by shape)."""
    from ..ops.autotune import TUNED_KERNELS

    return list(TUNED_KERNELS)


def _config_size(config) -> int:
    size = config.num_stages
    for key, value in config.kwargs.items():
        if key.startswith("BLOCK") and isinstance(value, int):
            size *= value
    return size


@contextlib.contextmanager
def autotune_limited(mode: str, keep) -> Iterator[None]:
    """SHARELORA_AUTOTUNE=mode, and each autotuned kernel's spaces cut to ``keep(configs)`` for the
    phase (restored after): the compile count of a run is bounded whatever the kernels' lists hold."""
    with contextlib.ExitStack() as stack:
        for kernel in _tuned_kernels():
            stack.enter_context(kernel.restricted(keep))
        stack.enter_context(environ(SHARELORA_AUTOTUNE=mode))
        yield


def smallest_config(configs: list) -> list:
    """The config with the smallest tiles and fewest stages: it fits every dtype and shared-memory size."""
    return [min(configs, key=_config_size)]


def first_configs(configs: list) -> list:
    """The first ``PERF_AUTOTUNE_CAP`` configs (each list starts with its large-GEMM tiles)."""
    return configs[:PERF_AUTOTUNE_CAP]


def compile_counts() -> list[dict]:
    """Per autotuned kernel: the size of its space in the current mode and the binaries compiled so
    far (where Triton says)."""
    from ..ops.autotune import mode

    rows = []
    for t in _tuned_kernels():
        try:  # Triton's JITFunction keeps (kernel cache, ...) per device; the interpreter none
            compiled = sum(len(c[0]) for c in t.fn.device_caches.values())
        except (AttributeError, TypeError, IndexError, KeyError):
            compiled = None
        rows.append({"kernel": getattr(t.fn, "__name__", str(t.fn)), "configs": len(t.spaces[mode()]),
                     "compiled": compiled})
    return rows


# ----------------------------------------------------------------------------- phases
def phase_a(report: Report, device: torch.device, tiny: bool, payload: dict) -> None:
    from ..benchmarks import ceilings
    sizes = ceilings.TINY if tiny else ceilings.GPU
    report.phase("a_ceilings")["device"] = ceilings.device_info(device)
    gemm = ceilings.gemm_rate(sizes, device)
    report.add("a_ceilings", gemm)
    copy = ceilings.copy_bandwidth(sizes, device)
    report.add("a_ceilings", copy)
    report.done("a_ceilings")


def phase_b(report: Report, device: torch.device, tiny: bool, payload: dict) -> None:
    from ..benchmarks import correctness
    sizes = correctness.TINY if tiny else correctness.GPU
    with autotune_limited("small", smallest_config):
        for check in correctness.checks(sizes, device):
            if report.stop_here("b_correctness"):
                return
            report.add("b_correctness", correctness.run_check(check))
    report.done("b_correctness")


def phase_b_perf(report: Report, device: torch.device, tiny: bool, payload: dict) -> None:
    """What (c) times, verified: its configs forced one at a time at its shapes (``perf_correctness``)."""
    from ..benchmarks import correctness, perf_correctness
    for check in perf_correctness.checks(perf_correctness.TINY if tiny else perf_correctness.GPU, device,
                                         PERF_AUTOTUNE_CAP):
        if report.stop_here("b_perf_configs"):
            return
        report.add("b_perf_configs", correctness.run_check(check))
    report.done("b_perf_configs")


def phase_c(report: Report, device: torch.device, tiny: bool, payload: dict) -> None:
    import torch

    from ..benchmarks import performance
    shapes = performance.TINY if tiny else performance.GPU
    report.phase("c_performance")["autotune_cap"] = PERF_AUTOTUNE_CAP
    with autotune_limited(os.environ.get("SHARELORA_AUTOTUNE") or "perf", first_configs):
        for spec in performance.case_list(shapes, tiny):
            if report.stop_here("c_performance"):
                return
            try:
                row = performance.run_case(spec, shapes, device, torch.bfloat16)
                row["goals"] = performance.goals(row) if spec["op"] != "layer" and not tiny else {}
                if tiny:
                    row["goals_not_judged"] = "CPU smoke run through the Triton interpreter"
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row = {"name": performance.case_name(spec), "spec": spec, "error": f"{type(e).__name__}: {e}"}
            report.add("c_performance", row)
    report.done("c_performance")


def phase_d(report: Report, device: torch.device, tiny: bool, payload: dict) -> None:
    from ..benchmarks import ceilings
    if report.stop_here("d_angular"):
        return
    try:
        row = ceilings.angular(ceilings.TINY if tiny else ceilings.GPU, device, payload.get("copy_gbps"))
    except Exception as e:  # noqa: BLE001
        row = {"error": f"{type(e).__name__}: {e}"}
    report.add("d_angular", row)
    report.done("d_angular")


PHASES = {"a_ceilings": phase_a, "b_correctness": phase_b, "b_perf_configs": phase_b_perf, "c_performance": phase_c,
          "d_angular": phase_d}


def phase_child(payload: dict) -> None:
    """One phase, as a child process (or in this process) runs it: its items in ``payload["out"]``
    (rewritten after each), then this process's dispatch table and compile counts beside them."""
    import torch

    from ..ops import dispatch

    key, tiny = payload["phase"], payload["tiny"]
    device = torch.device("cpu" if tiny else "cuda")
    report = Report(Path(payload["out"]), payload["stop_after_s"], {"phases": {}})
    once = lambda name, fn, dev: dispatch.measure_ms(fn, dev, warmup=0, repeats=1, calls=1)  # --tiny: interpreted
    timer = dispatch.set_timer(once if tiny else None)
    interpreted = dispatch.TIME_INTERPRETED_KERNELS
    dispatch.TIME_INTERPRETED_KERNELS = tiny
    dispatch.clear()
    try:
        with environ(SHARELORA_CACHE_DIR=payload["cache_dir"]):
            PHASES[key](report, device, tiny, payload)
    finally:
        report.data["dispatch_table"] = dispatch.dispatch_table()
        report.data["compile_counts"] = compile_counts()
        report.save()
        dispatch.set_timer(timer)
        dispatch.TIME_INTERPRETED_KERNELS = interpreted
        dispatch.clear()  # the phase's choices were measured for the run's own cache dir (and, --tiny, timer)


def run_phase(report: Report, key: str, tiny: bool, out: Path, limit_s: float,
              target: str = f"{__name__}:phase_child") -> None:
    """Run phase ``key`` (``target``, "module:function", on the phase's payload) in a child
    (``ISOLATE``) with ``limit_s`` seconds, then merge what it wrote into ``report``: its items, its
    status (a fault or a stop at the limit named), its dispatch table and compile counts."""
    partial = out / f"phase-{key}.json"
    copy = [i.get("gbps") for i in report.data["phases"].get("a_ceilings", {}).get("items", []) if "gbps" in i]
    payload = {"phase": key, "tiny": tiny, "out": str(partial), "stop_after_s": limit_s * (1 - STOP_MARGIN),
               "cache_dir": str(out / "dispatch_cache"), "copy_gbps": copy[0] if copy else None}
    partial.unlink(missing_ok=True)
    begun = report.elapsed()
    if ISOLATE:
        outcome = run_isolated(target, payload, limit_s, out / f"phase-{key}.log")
    else:
        start = time.monotonic()
        call(target, payload)
        outcome = Outcome("ok", "", time.monotonic() - start)
    try:
        child = json.loads(partial.read_text())
    except (OSError, ValueError):
        child = {"phases": {}}
    phase = child["phases"].get(key) or {"status": "running", "items": []}
    phase["limit_s"], phase["wall_s"], phase["begun_at_s"] = round(limit_s, 1), round(outcome.seconds, 1), round(begun, 1)
    if outcome.status == "fault":
        phase["status"] = f"fault: {outcome.detail} (log: {out / f'phase-{key}.log'})"
    elif outcome.status == "timeout":  # a hang: the child did not stop itself within its limit
        phase["status"] = f"stopped: {outcome.detail} (its share of --budget {report.budget:g} s)"
        phase["timed_out"] = True
    report.data["phases"][key] = phase
    report.data["stopped"] = report.data["stopped"] or child.get("stopped")
    report.data["dispatch_table"] += child.get("dispatch_table", [])
    report.data["compile_counts"] += [{**row, "phase": key} for row in child.get("compile_counts", [])]
    report.save()


def phase_limits(remaining_s: float, keys: list[str]) -> float:
    """The first phase of ``keys``' limit: its share of ``remaining_s`` among the phases still to run."""
    return remaining_s * PHASE_SHARES[keys[0]] / sum(PHASE_SHARES[k] for k in keys)


# ----------------------------------------------------------------------------- outcome
def failures(data: dict) -> list[str]:
    """Phases that faulted or hung (stopped at their time limit), failed correctness checks and our
    backends' failures in (c), one line each."""
    out = [f"({LABELS.get(key, key)}) phase {phase['status']}" for key, phase in data["phases"].items()
           if str(phase.get("status", "")).startswith("fault") or phase.get("timed_out")]
    for key in ("b_correctness", "b_perf_configs"):
        for row in data["phases"].get(key, {}).get("items", []):
            if not row["passed"]:
                why = row.get("error") or f"max rel err {row.get('max_rel_err', float('nan')):.3g}, tol {row.get('tol')}"
                out.append(f"({LABELS[key]}) {row['backend']}: {row['name']}: {why}")
    for row in data["phases"].get("c_performance", {}).get("items", []):
        if "error" in row:
            out.append(f"(c) {row['name']}: {row['error']}")
        for name, v in row.get("variants", {}).items():
            if name in OUR_VARIANTS and str(v.get("skipped", "")).startswith("failed"):
                out.append(f"(c) {row['name']} {name}: {v['skipped']}")
    return out


def _case_lines(case: dict) -> list[str]:
    """One performance case as table rows: medians (ms) and ratios to base, skips, goals."""
    lines = [f"    | {case['name']} | error: {case['error']} | | | |"] if "error" in case else []
    for name, row in case.get("variants", {}).items():
        if "skipped" in row:
            lines.append(f"    | {case['name']} | {name} | {row['skipped']} | | | |")
            continue
        ratio = case["ratio_vs_base"][name]
        host = " | ".join(f"{row[f'{mode}_host_us']['median']:.0f}" if f"{mode}_host_us" in row else ""
                          for mode in ("fwd", "fwd+bwd"))
        lines.append(f"    | {case['name']} | {name} | {row['fwd_ms']['median']:.4g} | "
                     f"{row['fwd+bwd_ms']['median']:.4g} | {ratio['fwd']:.3f} | {ratio['fwd+bwd']:.3f} | {host} |")
    if case.get("goals_not_judged"):
        lines.append(f"    goals: not judged ({case['goals_not_judged']})")
    elif case.get("goals"):
        lines.append("    goals: " + "; ".join(f"{goal}: {'met' if met else 'NOT met'}"
                                              for goal, met in case["goals"].items()))
    return lines


def _angular_line(item: dict) -> str:
    if "skipped" in item or "error" in item:
        return f"(d) angular distance: {item.get('skipped') or item.get('error')}"
    fraction = item.get("fraction_of_copy_bandwidth", float("nan"))
    return f"(d) angular distance: {item['gbps']:.4g} GB/s read, {fraction:.2f} of the copy rate"


def summary(data: dict) -> str:
    """The run as a few lines and one table per performance case (medians, ratios to base)."""
    phases, env = data["phases"], data["environment"]
    stopped = ", stopped by the budget" if data.get("stopped") else ""
    lines = [f"gpu-check on {env['device_name']} (torch {env['torch']}, triton {env['triton']}), "
             f"{data['elapsed_s']:.0f} s of a {data['budget_s']:g} s budget{stopped}"]
    lines += [f"({LABELS.get(key, key)}) phase {phase['status']}" for key, phase in phases.items()
              if phase.get("status") != "done"]
    for item in phases.get("a_ceilings", {}).get("items", []):
        rate = f"{item['tflops']:.4g} TFLOP/s" if "tflops" in item else f"{item['gbps']:.4g} GB/s"
        lines.append(f"(a) {item['name']}: {rate}")
    for key, what in (("b_correctness", "correctness"), ("b_perf_configs", "(c)'s configs at (c)'s shapes")):
        if key in phases:
            checks = phases[key]["items"]
            na = sum("not_applicable" in r for r in checks)
            lines.append(f"({LABELS[key]}) {what}: {sum(r['passed'] for r in checks) - na}/{len(checks) - na} checks "
                         f"passed" + (f", {na} not applicable (no TMA)" if na else ""))
    cases = phases.get("c_performance", {}).get("items", [])
    if cases:
        lines.append("(c) device time | case | variant | fwd ms | fwd+bwd ms | fwd / base | fwd+bwd / base "
                     "| host µs fwd | host µs fwd+bwd |")
    lines += [line for case in cases for line in _case_lines(case)]
    lines += [_angular_line(item) for item in phases.get("d_angular", {}).get("items", [])]
    lines += [f"FAILED {line}" for line in failures(data)] or ["no failure"]
    return "\n".join(lines)


def process_start() -> float:
    """The ``time.monotonic()`` of this process's start (Linux, from /proc; elsewhere: now), so that
    --budget counts Python's start and the imports too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        since = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()
    return time.monotonic() - max(0.0, since)


def _reexec_interpreted(args: argparse.Namespace) -> int:
    """--tiny needs the kernels built by Triton's interpreter, chosen when triton is first imported:
    run the command again in a child process with TRITON_INTERPRET=1."""
    argv = [sys.executable, "-m", "sharelora_kernels", "gpu-check", "--tiny", "--budget", str(args.budget)]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    child = subprocess.Popen(argv, env={**os.environ, "TRITON_INTERPRET": "1"}, preexec_fn=die_with_parent)
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the child too: it stops its phase and reports
        return child.wait()
    except BaseException:  # a SIGTERM (sigterm_as_exit): passed on, the child stops its phase
        child.terminate()
        child.wait()
        raise


def run(args: argparse.Namespace) -> int:
    """Validate every option, then run the phases; returns the exit status. A SIGTERM stops the
    running phase's process too."""
    with sigterm_as_exit():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    require_positive(args, "budget")
    if args.budget < MIN_BUDGET:
        raise CommandError(f"--budget {args.budget:g} s is too small: gpu-check needs at least {MIN_BUDGET:g} s "
                           f"(each phase runs in its own process and needs at least {MIN_PHASE_S:g} s; the "
                           f"smallest gets {min(PHASE_SHARES.values()):.0%} of the budget)")
    import torch

    from .. import ops
    from ..benchmarks import OUT_ROOT
    from ..benchmarks.environment import describe, device_label, loadavg
    from .outputs import check_out_dir, numbered_dir

    check_settings()  # a bad SHARELORA_BACKEND / SHARELORA_AUTOTUNE now, not after every phase ran
    if not ops.HAS_TRITON:
        raise CommandError("gpu-check needs triton, which cannot be imported here")
    if args.tiny and not ops.INTERPRET:
        return _reexec_interpreted(args)
    if not args.tiny and not torch.cuda.is_available():
        raise CommandError("gpu-check needs a CUDA GPU (--tiny runs it on the CPU through the Triton interpreter)")
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.out is not None:
        phase_files = [f"phase-{key}.{ext}" for key in PHASES for ext in ("json", "log")]
        out = check_out_dir(args.out, ("gpu_check.json", *phase_files, "dispatch_cache/"))
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "dispatch_cache", ignore_errors=True)  # auto measures its choices anew
    else:  # like bench: a new folder per run, never an earlier result overwritten
        out = numbered_dir(OUT_ROOT, f"gpu-check-{device_label(device)}-{datetime.date.today().isoformat()}")
    argv = ["--tiny"] * args.tiny + ["--budget", f"{args.budget:g}"] + (["--out", str(args.out)] if args.out else [])
    data = {"tool": "sharelora_kernels gpu-check", "tiny": args.tiny, "budget_s": args.budget, "stopped": None,
            "environment": describe(device, argv, prog="python -m sharelora_kernels gpu-check"), "phases": {},
            "dispatch_table": [], "compile_counts": []}
    report = Report(out / "gpu_check.json", args.budget, data, process_start())
    report.save()
    keys = list(PHASES)
    for i, key in enumerate(keys):
        remaining = args.budget - report.elapsed()
        limit = phase_limits(remaining, keys[i:])
        if limit < MIN_PHASE_S:
            report.phase(key)["status"] = f"stopped: --budget {args.budget:g} s spent"
            data["stopped"] = "budget"
            continue
        run_phase(report, key, args.tiny, out, limit)
    data["failures"] = failures(data)
    data["environment"]["loadavg_after"] = loadavg()
    report.save()
    print(summary(data))
    print(f"wrote {report.path}")
    return 1 if data["failures"] else 0


__all__ = ["HELP", "add_arguments", "run"]
