"""Where and how a run happened: device, library versions, CPU model, command and machine load."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import sys

import torch


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_warning(machine: dict) -> str | None:
    """One line when the machine's load average (1 minute, before or after the timing) exceeded its
    cores, i.e. other work competed for them; None otherwise. ``machine`` holds ``cpu_count``,
    ``loadavg_before`` and ``loadavg_after`` (as ``describe`` records them), and ``torch_threads``:
    "--threads 1" is suggested only when the run used more than one thread."""
    loads = [load[0] for load in (machine.get("loadavg_before"), machine.get("loadavg_after")) if load]
    cores = machine.get("cpu_count") or 0
    if not loads or not cores or max(loads) <= cores:
        return None
    rerun = "on a quiet machine" if machine.get("torch_threads") == 1 else "on a quiet machine, or with --threads 1"
    return (f"warning: load average {max(loads):.1f} exceeded the {cores} cores while timing: other work shared them, "
            f"so step times are not comparable (rerun {rerun})")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model()}"


def device_label(device: torch.device) -> str:
    """Short label for the results folder: ``cpu`` or e.g. ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _version_of(package: str) -> str | None:
    """An installed package's version, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: torch.device, argv: list[str], prog: str = "python -m sharelora_kernels bench") -> dict:
    """Everything the JSON records about the run's environment (load 'after' is filled in at the end).

    ``prog`` and ``argv`` make the recorded command line.
    """
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from ..version import __version__
    return {
        "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "sharelora_kernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "peft": _version_of("peft"),
        "settings": {name: os.environ.get(name) for name in ("SHARELORA_BACKEND", "SHARELORA_AUTOTUNE")},
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": f"{prog} {shlex.join(argv)}".rstrip(),
        "python_argv": shlex.join(sys.argv),
        "loadavg_before": loadavg(),
        "loadavg_after": None,
    }
