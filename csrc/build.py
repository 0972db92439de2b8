"""Compile the csrc/ kernels into plain shared libraries with a C ABI.

Standard library only (no torch, no setuptools): setup.py loads this file by path at
install time, and sharelora_kernels/extension.py loads it for the just-in-time build.
Each library is one translation unit, so the compiler is called directly (no ninja).
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent
LIBRARIES = {"cpu": "libsharelora_angular_cpu.so", "cuda": "libsharelora_angular_cuda.so"}
SOURCES = {"cpu": CSRC / "angular_distance_cpu.cpp", "cuda": CSRC / "angular_distance.cu"}
HEADERS = [CSRC / "angular_common.h"]
# SASS for A100 / H100, plus sm_90 PTX so that newer GPUs can JIT-compile it.
CUDA_ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME, $PATH or /usr/local/cuda, or None."""
    candidates = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def compile_command(kind: str, output: Path) -> list[str]:
    """The compiler command line that builds library `kind` ("cpu" or "cuda") at `output`; the
    library records `sources_digest()` (its C function `sharelora_sources_digest`)."""
    source = str(SOURCES[kind])
    digest = f'-DSL_SOURCES_DIGEST="{sources_digest()}"'
    if kind == "cpu":
        cxx = shlex.split(os.environ.get("CXX", "c++"))  # e.g. "ccache c++"
        # -Wno-psabi: the 32-byte vector type never crosses a function boundary (inlined).
        return [*cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-Wall",
                "-Wno-psabi", digest, source, "-o", str(output)]
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")
    # The CUDA runtime is linked statically (nvcc's default), so the library does not
    # depend on where torch's wheel keeps libcudart; streams are shared through the driver.
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
            *gencode, digest, source, "-o", str(output)]


def build(kinds: list[str], out_dir: Path) -> dict[str, str | None]:
    """Build every library in `kinds` into `out_dir`, in parallel.

    Returns {kind: None on success, else a one-paragraph error message}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, errors = {}, {}
    for kind in kinds:
        try:
            command = compile_command(kind, out_dir / LIBRARIES[kind])
            jobs[kind] = (command, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True))
        except OSError as exc:  # no compiler at all
            errors[kind] = str(exc)
    for kind, (command, process) in jobs.items():
        log, _ = process.communicate()
        errors[kind] = None if process.returncode == 0 else (
            f"`{' '.join(command)}` failed with exit code {process.returncode}:\n{log[-4000:]}")
    return errors


def sources_digest() -> str:
    """A short hash of the sources and this script: what a library is built from (each records it)."""
    digest = hashlib.sha256()
    for path in [*SOURCES.values(), *HEADERS, Path(__file__)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def sources_fingerprint() -> str:
    """A short hash of the sources and the compilers: names the JIT cache directory."""
    key = repr([sources_digest(), os.environ.get("CXX"), find_nvcc()])
    return hashlib.sha256(key.encode()).hexdigest()[:16]
