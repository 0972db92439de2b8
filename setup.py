"""Build script. Metadata lives in pyproject.toml; this file only adds the csrc/ extension build.

The csrc/ kernels are built as plain shared libraries with a C ABI (no torch, no Python
headers; see csrc/README.md), so they build inside pip's isolated environment where torch
is not importable: the CPU library with the system C++ compiler everywhere, the CUDA library
where nvcc is found (unless SHARELORA_KERNELS_NO_CUDA=1). A failed build never fails the
install: extension.py then tries a just-in-time build (from a source checkout), and else uses
the torch reference. Each library records the digest of the sources it was built from, so that
extension.py builds anew once a csrc/ source is edited. MANIFEST.in puts csrc/ into the sdist.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_CSRC_BUILD = Path(__file__).resolve().parent / "csrc" / "build.py"


def _csrc_build():
    spec = importlib.util.spec_from_file_location("_sharelora_csrc_build", _CSRC_BUILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SharedLibrary(Extension):
    """A C-ABI shared library loaded with ctypes (not a Python module); `kind` is cpu/cuda."""

    def __init__(self, kind: str):
        super().__init__(f"sharelora_kernels.libsharelora_angular_{kind}", sources=[])
        self.kind = kind


class BuildSharedLibraries(build_ext):
    def get_ext_filename(self, fullname):
        # Plain "lib*.so" names, not Python-extension suffixes: ctypes loads them by path.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extensions(self):
        for ext in self.extensions:  # a library left by an earlier build must not be installed instead
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        if not _CSRC_BUILD.is_file():
            print(f"WARNING: sharelora_kernels: no {_CSRC_BUILD}; kernels not built (the torch reference runs)")
            self.extensions = []
            return
        build = _csrc_build()
        wanted = [ext for ext in self.extensions
                  if ext.kind == "cpu" or (build.find_nvcc() and
                                           os.environ.get("SHARELORA_KERNELS_NO_CUDA") != "1")]
        out_dir = Path(self.build_temp) / "sharelora_libs"
        errors = build.build([ext.kind for ext in wanted], out_dir)
        built = []
        for ext in wanted:
            if errors[ext.kind]:
                print(f"WARNING: sharelora_kernels {ext.kind} kernel not built (an editable install tries a "
                      f"JIT build on first use; else the torch reference runs): {errors[ext.kind]}")
                continue
            target = Path(self.get_ext_fullpath(ext.name))
            target.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(out_dir / build.LIBRARIES[ext.kind]), str(target))
            built.append(ext)
        self.extensions = built  # the editable-install copy step must only see real files


setup(
    ext_modules=[SharedLibrary("cpu"), SharedLibrary("cuda")],
    cmdclass={"build_ext": BuildSharedLibraries},
)
