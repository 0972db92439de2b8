"""Run one step of a long command in a child process with its own time limit.

A CUDA fault (illegal address) poisons its process's context for good, a hang never returns and an
out-of-memory can leave memory behind: in a child, each costs that step only, and the next step
starts on a fresh context. ``run_isolated`` starts ``python -m sharelora_kernels.cli.isolated
module:function PAYLOAD.json``, which calls ``function(payload)``; the child reports through files it
writes (the payload says where), so what it wrote before it died is kept.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple


class Outcome(NamedTuple):
    """How a child ended: status ``ok``, ``fault`` (a signal, a non-zero exit or an exception: detail
    names it) or ``timeout`` (stopped at its limit), and the seconds it ran."""

    status: str
    detail: str
    seconds: float


def _last_error(log: Path) -> str:
    """The last non-empty line of the child's output (a Python traceback ends with the exception)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def die_with_parent() -> None:
    """In a child before it runs its program (``preexec_fn``): the kernel kills it when its parent
    dies (Linux's parent-death signal), so a parent killed with SIGKILL leaves no orphan working on."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stopped_on_exit(child: subprocess.Popen) -> None:
    """Kill ``child``'s process group (after Ctrl-C, a SIGTERM turned into an exception, any error in
    the parent): no step goes on working, or holding the GPU, after the command ended."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside the block a SIGTERM raises SystemExit(143) in the main thread, so that cleanups run
    (``run_isolated`` stops its child) instead of the process ending on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, exit_on)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_isolated(target: str, payload: dict, timeout_s: float, log: Path, env: dict | None = None) -> Outcome:
    """Run ``target`` ("module:function") on ``payload`` in a child process, its stdout and stderr in
    ``log``; stopped (its whole process group) after ``timeout_s`` seconds, or when this process is
    interrupted or dies."""
    fd, payload_path = tempfile.mkstemp(prefix="payload-", suffix=".json", dir=log.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    start = time.monotonic()
    try:
        with open(log, "w") as out:
            child = subprocess.Popen([sys.executable, "-m", "sharelora_kernels.cli.isolated", target, payload_path],
                                     stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=die_with_parent)
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                stopped_on_exit(child)
                return Outcome("timeout", f"stopped at its time limit of {timeout_s:.0f} s",
                               time.monotonic() - start)
            except BaseException:
                stopped_on_exit(child)
                raise
    finally:
        os.unlink(payload_path)
    seconds = time.monotonic() - start
    if code == 0:
        return Outcome("ok", "", seconds)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        return Outcome("fault", f"killed by {name}", seconds)
    error = _last_error(log)
    return Outcome("fault", f"exit status {code}" + (f": {error}" if error else ""), seconds)


def call(target: str, payload: dict) -> None:
    """``target``'s function ("module:function") called on ``payload``."""
    module, _, name = target.partition(":")
    getattr(importlib.import_module(module), name)(payload)


if __name__ == "__main__":
    call(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()))
