"""Python side of the compiled angular-distance kernels in csrc/.

The kernels are plain shared libraries with a C ABI (raw pointers, strides in elements,
dtype codes; no torch or Python headers), called here through ctypes on the tensors'
memory (`Tensor.data_ptr()`) and, on GPU, on torch's current CUDA stream. Libraries are
looked up in this order (see csrc/README.md):

1. ``sharelora_kernels/libsharelora_angular_{cpu,cuda}.so``: built by ``pip install`` (setup.py; CUDA only where nvcc
   was found at install time), if it records the digest of the ``csrc/`` sources present (an edited
   source in an editable install makes it stale), or as it is outside the package's own source tree
   (a wheel: a ``csrc/`` folder beside the installed package is not ours and is never run);
2. a just-in-time build from ``csrc/`` (source checkouts and editable installs) into
   ``$SHARELORA_KERNELS_CACHE`` (default ``~/.cache/sharelora_kernels``), once per source
   version;
3. otherwise `available()` is False, with ONE warning per device type, and callers
   (`similarity.distance.angular_distance`) use the torch reference.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent


def _own_csrc() -> Path | None:
    """csrc/ of this package's own source tree (a checkout, an editable install), or None: installed
    in site-packages, a csrc/ folder beside the package belongs to something else and is never run."""
    root = _PACKAGE_DIR.parent
    try:
        ours = 'name = "sharelora_kernels"' in (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root / "csrc" if ours and (root / "csrc" / "build.py").is_file() else None


_CSRC_DIR = _own_csrc()
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc: SlDtype
_NO_ERROR = 2**63 - 1  # csrc: SL_NO_ERROR
_CUDA_MAX_LAYERS = 128  # csrc/angular_distance.cu: kMaxLayers (shared-memory Gram)
_CUDA_MIN_CAPABILITY = (8, 0)  # csrc/build.py: CUDA_ARCHS (SASS for sm_80 / sm_90, PTX for later GPUs)
_STATUS = {1: "invalid argument", 2: "CUDA error", 3: "internal error (out of memory?)"}
_I64, _I32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
_SIGNATURES = {
    "cpu": {"sharelora_angular_sums_cpu": [_PTR, _I32] + [_I64] * 6 + [_PTR, _PTR, _I32]},
    "cuda": {
        "sharelora_angular_cuda_partials": [_I64, _I64, _I32, _I32],
        "sharelora_angular_sums_cuda": [_PTR, _I32] + [_I64] * 6 + [_PTR] * 3 + [_I32, _PTR],
    },
}


class RepresentationError(ValueError):
    """A representation vector the angular distance cannot measure: zero norm (no direction), NaN or
    Inf. Raised by this module's kernels and by the torch reference alike, naming the sample and layer."""


def _csrc_build_module():
    spec = importlib.util.spec_from_file_location("_sharelora_csrc_build", _CSRC_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_build(kind: str, why: str = "not built at install time") -> Path:
    """Build library `kind` from csrc/ into the cache (once per source version); `why` the install-time
    library is not used (named in errors)."""
    if _CSRC_DIR is None:
        raise RuntimeError(f"{why}, and no csrc/ sources to build it from")
    if os.environ.get("SHARELORA_KERNELS_JIT", "1") == "0":
        raise RuntimeError(f"{why}, and SHARELORA_KERNELS_JIT=0")
    build = _csrc_build_module()
    cache = Path(os.environ.get("SHARELORA_KERNELS_CACHE",
                                Path.home() / ".cache" / "sharelora_kernels"))
    out_dir = cache / build.sources_fingerprint()
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / build.LIBRARIES[kind]
    with open(out_dir / f"{kind}.lock", "w") as lock:  # one builder per process tree
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.is_file():
            with tempfile.TemporaryDirectory(dir=out_dir) as scratch:  # no half-written file
                error = build.build([kind], Path(scratch))[kind]
                if error:
                    raise RuntimeError(f"just-in-time build failed: {error}")
                os.replace(Path(scratch) / library.name, library)
    return library


def _load(kind: str, path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES[kind].items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = _I64 if name.endswith("partials") else _I32
    return library


def _stale(library: Path) -> bool:
    """Whether an install-time library was built from other sources than the csrc/ present (it
    records their digest; a library built before it did records none). False without csrc/."""
    if _CSRC_DIR is None:
        return False
    recorded = getattr(ctypes.CDLL(str(library)), "sharelora_sources_digest", None)
    if recorded is None:
        return True
    recorded.restype = ctypes.c_char_p
    return recorded().decode() != _csrc_build_module().sources_digest()


@functools.cache
def _library(kind: str) -> ctypes.CDLL | None:
    """The loaded library for "cpu" or "cuda", or None after one warning."""
    prebuilt = _PACKAGE_DIR / f"libsharelora_angular_{kind}.so"
    try:
        if not prebuilt.is_file():
            path = _jit_build(kind)
        elif _stale(prebuilt):
            path = _jit_build(kind, f"{prebuilt.name} was built from other csrc/ sources")
        else:
            path = prebuilt
        return _load(kind, path)
    except (OSError, RuntimeError, AttributeError) as exc:  # AttributeError: stale library
        warnings.warn(f"sharelora_kernels: the compiled {kind} angular-distance kernel is "
                      f"unavailable ({exc}); using the slower torch reference instead.",
                      RuntimeWarning, stacklevel=3)
        return None


def available(device: torch.device | str) -> bool:
    """Whether `angular_sums` can run on `device` ("cpu", "cuda", "cuda:1", a torch.device)."""
    device = torch.device(device)
    kind = device.type
    if kind == "cuda" and not (torch.cuda.is_available() and _builds_for(torch.cuda.get_device_capability(device))):
        return False
    return kind in _SIGNATURES and _library(kind) is not None


@functools.cache
def _builds_for(capability: tuple[int, int]) -> bool:
    """Whether the CUDA library holds code for a GPU of ``capability`` (one warning if not: a launch
    there would fail with a CUDA error; the torch reference runs instead)."""
    if tuple(capability) >= _CUDA_MIN_CAPABILITY:
        return True
    warnings.warn(f"sharelora_kernels: the compiled CUDA angular-distance kernel is built for compute capability "
                  f"{'.'.join(map(str, _CUDA_MIN_CAPABILITY))} and later, this GPU is "
                  f"{'.'.join(map(str, capability))}; using the slower torch reference instead.", RuntimeWarning,
                  stacklevel=3)
    return False


def takes(reps: torch.Tensor, layer_dim: int = 0) -> bool:
    """Whether `angular_sums` runs on `reps` as it is: the extension is built for its device, and
    it takes its dtype (float32, bfloat16, float16) and, on CUDA, its layer count."""
    if reps.dtype not in _DTYPE_CODES or not available(reps.device):
        return False
    return reps.device.type == "cpu" or reps.shape[layer_dim] <= _CUDA_MAX_LAYERS


def angular_sums(reps: torch.Tensor, layer_dim: int = 0) -> torch.Tensor:
    """Sum over samples of the angular distances theta_ij / pi between layers.

    reps: (L, n, d) if layer_dim == 0 or (n, L, d) if layer_dim == 1; float32, bfloat16 or
    float16; any strides (read in place, never copied). Returns an (L, L) float64 tensor on
    reps' device: symmetric, zero diagonal. Norms and Gram are accumulated in float64.
    Raises RepresentationError naming the first (sample, layer) whose vector is zero or not finite.
    """
    if not isinstance(reps, torch.Tensor) or reps.dim() != 3:
        raise ValueError(f"reps must be a 3-D tensor, got {getattr(reps, 'shape', type(reps))}")
    if reps.dtype not in _DTYPE_CODES:
        raise ValueError(f"reps must be float32, bfloat16 or float16, got {reps.dtype}")
    if layer_dim not in (0, 1):
        raise ValueError(f"layer_dim must be 0 or 1, got {layer_dim}")
    if not available(reps.device):
        raise RuntimeError(f"no compiled angular-distance kernel for {reps.device}")
    view = reps.detach() if layer_dim == 0 else reps.detach().transpose(0, 1)  # (L, n, d)
    num_layers, num_samples, dim = view.shape
    if dim == 0:
        raise RepresentationError("reps has d = 0: every vector has zero norm")
    args = (view.data_ptr(), _DTYPE_CODES[view.dtype], num_layers, num_samples, dim, *view.stride())
    out = torch.empty((num_layers, num_layers), dtype=torch.float64, device=view.device)
    error_key = torch.full((1,), _NO_ERROR, dtype=torch.int64, device=view.device)
    if view.device.type == "cpu":
        status = _library("cpu").sharelora_angular_sums_cpu(
            *args, out.data_ptr(), error_key.data_ptr(), torch.get_num_threads())
    else:
        status = _run_cuda(view, args, out, error_key)
    if status != 0:
        raise RuntimeError(f"angular-distance kernel failed: {_STATUS.get(status, status)}")
    _raise_on_bad_input(int(error_key.item()), num_layers)
    return out


def _run_cuda(view, args, out, error_key) -> int:
    library, index = _library("cuda"), view.device.index
    if view.shape[0] > _CUDA_MAX_LAYERS:
        raise ValueError(f"the CUDA kernel handles at most {_CUDA_MAX_LAYERS} layers, "
                         f"got {view.shape[0]}; use the torch reference")
    with torch.cuda.device(view.device):
        size = library.sharelora_angular_cuda_partials(view.shape[0], view.shape[1], args[1], index)
        if size < 0:
            return 2  # CUDA error while sizing the launch
        partials = torch.empty(max(size, 1), dtype=torch.float64, device=view.device)
        stream = torch.cuda.current_stream(view.device).cuda_stream
        return library.sharelora_angular_sums_cuda(
            *args, out.data_ptr(), partials.data_ptr(), error_key.data_ptr(), index, stream)


def _raise_on_bad_input(key: int, num_layers: int) -> None:
    if key == _NO_ERROR:
        return
    position, kind = divmod(key, 2)  # csrc: sl_error_key
    sample, layer = divmod(position, num_layers)
    # Same wording as the torch reference (similarity.distance.angular_sums_torch).
    problem = "has zero norm (no direction)" if kind == 0 else "contains NaN or Inf"
    raise RepresentationError(f"representation of sample {sample} at layer {layer} {problem}")
