"""Which backend runs a call: the env override, and ``auto``'s measured choice with its on-disk cache.

``SHARELORA_BACKEND`` = ``torch`` | ``compose`` | ``triton`` | ``auto``; unset: ``auto`` on CUDA,
``DEFAULT_CPU`` on the CPU. ``auto`` times the fused Triton kernels against ``compose`` once per
call signature on first use, as an autotuner does, and keeps the faster: in memory (a table that
threads share under a lock) and in one JSON file per device under ``cache_dir()`` (``dispatch_cache``
reads and merges it). So the package is never slower than ``compose`` on a GPU,
whatever the kernels achieve there.

A signature (``Signature``) is the device name, x / W / adapter dtypes, the M bucket (next power of
two), K, N, the total rank, the path kinds, dropout on or off, and the mode: ``fwd`` (no gradient
will be taken: inference) or ``fwd+bwd`` (training). Forward and backward are chosen as one pair:
the two backends save incompatible state for backward (the kernels a dropout seed they regenerate
the mask from and an fp32 h; ``compose`` a bool mask and h in the low-rank dtype), so a forward of
one is differentiated by its own backward. A training signature is timed as forward + backward.

Timing runs on detached copies of the call's own tensors (no gradient reaches the real ones), with
the random state forked (a user's seeded run draws the same numbers whether or not it measured).
The timer is injectable (``set_timer``) for tests. Where nothing can be timed (a CUDA graph capture,
or dynamo tracing a compiled call) ``auto`` runs an earlier choice for the signature (eager calls of
this process, or the cache file; the compiled graph keeps it, a dynamic batch size guarded to its
M bucket), else ``compose``. A compiled inference call needs none: it traces one
opaque op that chooses when it runs (``auto_op``).

``auto`` verifies before it trusts: on the same inputs it compares the kernels' results with
``compose``'s (the output; for a training signature also dx and every adapter gradient, one shared
random output gradient), with dropout off for the comparison (the two draw different masks). The
error is the largest element difference over the largest magnitude of compose's tensor; above
``TOLERANCE`` for the dtype (or not finite) the kernels are ruled out for that signature: one
warning naming it and the error, the reason in ``dispatch_table()`` and the cache file (``rejected``),
``compose`` from then on.
"""
from __future__ import annotations

import datetime
import os
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..reference import LoRAPath
from .dispatch_cache import (CACHE_ENV, CACHE_FORMAT, CACHE_VERSION, cache_dir, cache_file,  # noqa: F401 (named here too)
                             read_cache, write_cache)
from .encoding import check_linear
from .function import wants_grad

BACKEND_ENV, AUTOTUNE_ENV = "SHARELORA_BACKEND", "SHARELORA_AUTOTUNE"
BACKENDS = ("torch", "compose", "triton", "auto")
AUTOTUNE_MODES = ("small", "perf", "full")
DEFAULT_CPU = "compose"  # measured: as fast as torch in fp32, faster on bf16 bases and under autocast (README)
CANDIDATES = ("triton", "compose")  # what auto chooses between, in this order on a tie
# Whether auto also times the kernels on CPU tensors when Triton's interpreter runs them (tests and
# ``gpu-check --tiny`` set it; off, auto on the CPU has compose alone to run).
TIME_INTERPRETED_KERNELS = False

Timer = Callable[[str, Callable[[], object], torch.device], float]
# Largest |kernels - compose| / max |compose| per tensor that auto accepts, by the lowest-precision
# dtype among x and the adapters (float32 allows tf32 operands in the kernels' GEMMs).
TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def env_choice(name: str, allowed: Sequence[str], default: str) -> str:
    """The value of env var ``name`` (stripped, lower case), ``default`` when unset or empty;
    ValueError naming the variable when it is not one of ``allowed``."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- settings (read once)
class _Settings:
    """``SHARELORA_BACKEND`` and ``SHARELORA_AUTOTUNE`` as read by the last ``refresh_settings()``
    (at import, and again only when asked), or the ValueError a bad value gave, raised on use (a bad
    ``SHARELORA_BACKEND`` only while ``set_backend`` names no backend, which wins over it).
    ``version`` changes whenever anything a call plan took from here may have changed (a refresh,
    ``set_backend``, ``clear``), so layers rebuild their plans then and only then."""

    def __init__(self):
        self.backend: str | None = None  # None: the device's default
        self.forced: str | None = None  # set_backend's value, which wins over the variable
        self.autotune = "perf"
        self.backend_error: ValueError | None = None
        self.autotune_error: ValueError | None = None
        self.version = 0


SETTINGS = _Settings()


def _read(name: str, allowed: Sequence[str], default: str) -> tuple[str, ValueError | None]:
    """(``env_choice``'s value, None), or (``default``, the ValueError it raised)."""
    try:
        return env_choice(name, allowed, default), None
    except ValueError as e:
        return default, e


def refresh_settings() -> None:
    """Read ``SHARELORA_BACKEND`` and ``SHARELORA_AUTOTUNE`` again (the package reads them once, at
    import; call this after changing them in a running process). A bad value is kept as its
    ValueError, raised by the next call that needs the setting."""
    SETTINGS.version += 1
    backend, SETTINGS.backend_error = _read(BACKEND_ENV, BACKENDS, "")
    SETTINGS.backend = backend or None
    SETTINGS.autotune, SETTINGS.autotune_error = _read(AUTOTUNE_ENV, AUTOTUNE_MODES, "perf")


def set_backend(name: str | None) -> None:
    """Run every later call on backend ``name`` (one of ``BACKENDS``), whatever ``SHARELORA_BACKEND``
    says (a bad value included); None goes back to the variable (or the device's default). Layers
    rebuild their call plans."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    SETTINGS.forced = name
    SETTINGS.version += 1


def backend_setting(device: torch.device) -> str:
    """``set_backend``'s choice, else ``SHARELORA_BACKEND`` (its ValueError when bad), else the default
    for ``device``: auto on CUDA, ``DEFAULT_CPU`` elsewhere."""
    s = SETTINGS
    if s.forced:
        return s.forced
    if s.backend_error is not None:
        raise s.backend_error
    return s.backend or ("auto" if device.type == "cuda" else DEFAULT_CPU)


def autotune_mode() -> str:
    """``SHARELORA_AUTOTUNE`` (small, perf or full; default perf), checked here so a bad value fails early."""
    if SETTINGS.autotune_error is not None:
        raise SETTINGS.autotune_error
    return SETTINGS.autotune


refresh_settings()


# ----------------------------------------------------------------------------- signatures
def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@dataclass(frozen=True)
class Signature:
    device: str
    x_dtype: str
    weight_dtype: str
    adapter_dtypes: tuple[str, ...]
    m_bucket: int
    k: int
    n: int
    rank: int
    kinds: tuple[str, ...]
    dropout: bool
    mode: str  # "fwd" or "fwd+bwd"

    def key(self) -> str:
        """The cache key within one device's file."""
        return (f"x={self.x_dtype} w={self.weight_dtype} a={'+'.join(self.adapter_dtypes)} M<={self.m_bucket} "
                f"K={self.k} N={self.n} R={self.rank} paths={'+'.join(self.kinds)} "
                f"dropout={int(self.dropout)} {self.mode}")


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (0 stays 0)."""
    return 1 << (m - 1).bit_length() if m > 0 else 0


def signature(x: Tensor, weight: Tensor, paths: Sequence[LoRAPath], dropout: bool, mode: str) -> Signature:
    """The signature of a call: x (..., K), weight (N, K)."""
    return _signature(*_signature_fields(x, weight, paths, dropout, mode))


def _signature_fields(x: Tensor, weight: Tensor, paths: Sequence[LoRAPath], dropout: bool, mode: str) -> tuple:
    """What a signature is made of, as torch objects and Python numbers (M: a SymInt while dynamo
    traces a dynamic batch): the device, x's, W's and the adapters' dtypes, M, K, N, R, kinds, dropout, mode."""
    k = weight.shape[1]  # x's K as well (checked), and a constant where x's sizes are dynamic
    m = x.numel() // k if k else 0
    return (x.device, x.dtype, weight.dtype, tuple({t.dtype for p in paths for t in p.tensors}), m, k,
            weight.shape[0], sum(p.rank for p in paths), tuple(p.kind for p in paths), dropout, mode)


def _signature(device: torch.device, x_dtype: torch.dtype, weight_dtype: torch.dtype,
               adapter_dtypes: tuple[torch.dtype, ...], m: int, *rest) -> Signature:
    return Signature(device_name(device), _dtype(x_dtype), _dtype(weight_dtype),
                     tuple(sorted({_dtype(d) for d in adapter_dtypes})), m_bucket(m), *rest)


def call_mode(x: Tensor, paths: Sequence[LoRAPath]) -> str:
    """``fwd+bwd`` when autograd will take a gradient of this call, else ``fwd``."""
    return "fwd+bwd" if wants_grad(x, (t for p in paths for t in p.tensors)) else "fwd"


# ----------------------------------------------------------------------------- timing
def call_ms(run: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Milliseconds per call of ``calls`` calls of ``run`` back to back: CUDA events around all of
    them and one synchronisation at the end (the device time of a stream of calls, not Python's
    per-call latency), ``time.perf_counter`` elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - t0) * 1e3 / calls


def measure_ms(run: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 3,
               calls: int = 5) -> float:
    """Median over ``repeats`` rounds of ``call_ms(run, device, calls)`` (``calls`` back to back, one
    sync), after ``warmup`` calls (the first compiles and autotunes) and a sync."""
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(call_ms(run, device, calls) for _ in range(repeats))


def _default_timer(candidate: str, run: Callable[[], object], device: torch.device) -> float:
    return measure_ms(run, device)


_timer: Timer = _default_timer


def set_timer(timer: Timer | None) -> Timer:
    """Replace the timer ``auto`` measures with, ``timer(candidate, run, device) -> ms`` (None: the
    default, ``measure_ms``); returns the previous one."""
    global _timer
    previous, _timer = _timer, (timer or _default_timer)
    return previous


Backend = Callable[..., Tensor]  # (x, weight, bias, paths, dropout_p, training) -> y


def timed_run(backend: Backend, x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath],
              dropout_p: float, training: bool, mode: str, grad_out: list[Tensor] | None = None,
              results: list | None = None) -> Callable[[], object]:
    """One call of ``backend`` on detached copies of the call's tensors: forward, or forward and
    backward (a random output gradient, every gradient the real call would take). ``grad_out``: a
    list holding the output gradient to use (filled on the first call when empty: pass one list to
    every backend and they share it); ``results``: where each call appends {"y": y, name: gradient}
    (``dx``, ``d path<i> tensor<j>``)."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                y = backend(x, weight, bias, paths, dropout_p, training)
            if results is not None:
                results.append({"y": y})
            return y
        return forward
    copies = {id(t): t.detach().requires_grad_(t.requires_grad) for t in (x, *(t for p in paths for t in p.tensors))}
    xs = copies[id(x)]
    ps = [p._replace(tensors=tuple(copies[id(t)] for t in p.tensors)) for p in paths]
    named: dict[int, tuple[str, Tensor]] = {}  # a tensor two paths share: one gradient
    for name, t in [("dx", xs), *((f"d path{i} tensor{j}", t) for i, p in enumerate(ps) for j, t in enumerate(p.tensors))]:
        if t.requires_grad:
            named.setdefault(id(t), (name, t))
    names, leaves = [n for n, _ in named.values()], [t for _, t in named.values()]
    grad_out = [] if grad_out is None else grad_out

    def forward_backward():
        y = backend(xs, weight, bias, ps, dropout_p, training)
        if not grad_out:
            grad_out.append(torch.randn_like(y))
        grads = torch.autograd.grad(y, leaves, grad_out[0])
        if results is not None:
            results.append({"y": y.detach(), **dict(zip(names, grads))})
    return forward_backward


def tolerance(x: Tensor, paths: Sequence[LoRAPath]) -> float:
    """``TOLERANCE`` of the least precise dtype among x and the adapters."""
    return max(TOLERANCE.get(t.dtype, TOLERANCE[torch.float32]) for t in (x, *(t for p in paths for t in p.tensors)))


def result_error(got: Mapping[str, Tensor], want: Mapping[str, Tensor]) -> tuple[float, str]:
    """(largest error, which tensor) over ``want``'s tensors: max |got - want| / max |want| each (inf
    where ``got`` lacks it, has another shape or is not finite). An adapter gradient is judged
    against at least 0.1 x the largest adapter gradient: a gate core's is a cancelling sum, tiny
    next to its neighbours, whose rounding is not an error."""
    adapters = [w.abs().max().item() for name, w in want.items() if name.startswith("d path") and w.numel()]
    floor = 0.1 * max(adapters, default=0.0)
    worst, where = 0.0, "y"
    for name, w in want.items():
        g = got.get(name)
        if g is None or g.shape != w.shape or not torch.isfinite(g).all():
            err = float("inf")
        elif w.numel() == 0:
            err = 0.0
        else:
            scale = max(w.double().abs().max().item(), floor if name.startswith("d path") else 0.0)
            diff = (g.double() - w.double()).abs().max().item()
            err = diff / scale if scale > 0 else diff
        if err > worst:
            worst, where = err, name
    return worst, where


# ----------------------------------------------------------------------------- the table and its cache
@dataclass
class Choice:
    """What auto chose for one signature, with both timings (ms) and where the choice came from."""

    signature: Signature
    choice: str
    times_ms: dict[str, float]
    source: str  # "measured" or the cache file it was read from
    measured_at: str
    errors: dict[str, str] = field(default_factory=dict)  # backends that raised when timed
    rejected: dict[str, str] = field(default_factory=dict)  # backends whose results differed from compose's
    verified_error: dict[str, float] = field(default_factory=dict)  # result_error vs compose per backend

    def reason(self) -> str:
        times = ", ".join(f"{name} {ms:.4g} ms" for name, ms in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        failed = "".join(f"; {name} failed: {error}" for name, error in self.errors.items())
        wrong = "".join(f"; {name} ruled out: {why}" for name, why in self.rejected.items())
        how = "measured in this process" if self.source == "measured" else f"read from {self.source}"
        verdict = "was chosen" if self.rejected else "was faster"
        return f"{self.choice} {verdict} ({times}{failed}{wrong}; {self.signature.mode}), {how}"

    def to_json(self) -> dict:
        return {"choice": self.choice, "times_ms": self.times_ms, "errors": self.errors, "rejected": self.rejected,
                "verified_error": self.verified_error, "measured_at": self.measured_at,
                "signature": asdict(self.signature)}


_table: dict[Signature, Choice] = {}
_loaded: set[str] = set()  # device names whose cache file has been read
_lock = threading.RLock()  # guards _table and _loaded: threads meeting new signatures at once


def _load(device: str) -> None:
    """Read the device's cache file into the table once per process; a bad file gives one warning
    naming it (it is rewritten with the next measurement)."""
    if device in _loaded:
        return
    _loaded.add(device)
    path = cache_file(device)
    entries, problem = read_cache(path, device)
    if problem:
        warnings.warn(f"sharelora_kernels dispatch cache {path} {problem}: ignored, it will be rewritten",
                      stacklevel=3)
        return
    for entry in (entries or {}).values():
        try:
            sig = Signature(**{**entry["signature"], "adapter_dtypes": tuple(entry["signature"]["adapter_dtypes"]),
                               "kinds": tuple(entry["signature"]["kinds"])})
            choice = Choice(sig, entry["choice"], dict(entry["times_ms"]), str(path), entry["measured_at"],
                            dict(entry.get("errors") or {}), dict(entry.get("rejected") or {}),
                            dict(entry.get("verified_error") or {}))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # an entry of another layout: measured again when needed
        if choice.choice in CANDIDATES:
            _table.setdefault(sig, choice)


def _save(device: str) -> None:
    """Merge the device's choices into its cache file (``write_cache``); a warning if it cannot be written."""
    records = {c.signature.key(): c.to_json() for c in _table.values() if c.signature.device == device}
    try:
        write_cache(device, records)
    except OSError as e:  # a read-only home: keep the choice in memory only
        warnings.warn(f"sharelora_kernels could not write its dispatch cache {cache_file(device)} ({e}); set {CACHE_ENV}",
                      stacklevel=3)


def auto_choice(x: Tensor, weight: Tensor, bias: Tensor | None, paths: Sequence[LoRAPath], dropout_p: float,
                training: bool, backends: Mapping[str, Backend]) -> str:
    """The backend ``auto`` runs this call on, among ``backends`` (name -> function, those that take it):
    the remembered choice for its signature, else each is timed once (``timed_run``) and the
    fastest kept (ties: ``CANDIDATES`` order), in memory and in the device's cache file."""
    if len(backends) == 1:
        return next(iter(backends))
    dropout = False
    if training and dropout_p > 0:  # a branch, so a constant where dynamo traces dropout_p as a SymFloat
        dropout = True
    if torch.compiler.is_compiling():  # dynamo traces: nothing can be timed, a remembered choice is used
        fields = _signature_fields(x, weight, paths, dropout, call_mode(x, paths))
        m = fields[4]  # a SymInt for a dynamic batch: the comparisons below become the graph's guards
        for bucket, choice in _remembered_choices(fields[:4] + fields[5:], tuple(backends)):
            if m <= bucket:
                return choice if 2 * m > bucket else "compose"  # M's own bucket, or none remembered
        return "compose"
    sig = signature(x, weight, paths, dropout, call_mode(x, paths))
    known = _table.get(sig)
    if known is None and (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return "compose"  # a CUDA graph capture: nothing can be timed
    if known is None:
        with _lock:
            _load(sig.device)
            known = _table.get(sig)
    if known is not None and known.choice in backends:
        return known.choice
    check_linear(x, weight, bias, paths, dropout_p)  # bad inputs are named, never timed nor remembered
    times, errors, results = _time_backends(sig, backends, x, weight, bias, paths, dropout_p, training)
    rejected, verified = _verify(sig, results, tolerance(x, paths))
    allowed = [name for name in times if name not in rejected] or ["compose"]
    best = min(allowed, key=lambda name: (times.get(name, float("inf")), CANDIDATES.index(name)))
    with _lock:
        _table[sig] = Choice(sig, best, times, "measured", datetime.datetime.now().isoformat(timespec="seconds"),
                             errors, rejected, verified)
        _save(sig.device)
    return best


@torch.compiler.assume_constant_result
def _remembered_choices(fields: tuple, names: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """(M bucket, choice) of every choice among ``names`` that auto made for a signature (``fields``:
    those of ``_signature_fields`` without M) in eager calls of this process or read from the cache
    file, by bucket: what a call traced by dynamo runs (the compiled graph keeps it)."""
    rest = _signature(*fields[:4], 0, *fields[4:])
    with _lock:
        _load(rest.device)
        return tuple(sorted((sig.m_bucket, c.choice) for sig, c in _table.items()
                            if c.choice in names and replace(sig, m_bucket=0) == rest))


def _verify(sig: Signature, results: Mapping[str, Sequence[Tensor]], tol: float) -> tuple[dict, dict]:
    """(reason per backend ruled out, error per backend compared) of each backend's results against
    compose's; one warning per backend ruled out."""
    rejected, verified = {}, {}
    want = results.get("compose")
    if want is None or not all(torch.isfinite(t).all() for t in want.values()):
        return rejected, verified  # nothing trustworthy to compare with: the times decide
    for name, got in results.items():
        if name == "compose":
            continue
        err, where = result_error(got, want)
        verified[name] = err
        if not err <= tol:
            rejected[name] = f"results differ from compose ({where}: relative error {err:.3g} > {tol:g})"
            warnings.warn(f"sharelora_kernels auto: the {name} backend's results differ from compose's on "
                          f"{sig.key()} ({where}: relative error {err:.3g} > {tol:g}); using compose for this "
                          f"signature", stacklevel=4)
    return rejected, verified


def _time_backends(sig: Signature, backends: Mapping[str, Backend], x: Tensor, weight: Tensor, bias: Tensor | None,
                   paths: Sequence[LoRAPath], dropout_p: float, training: bool) -> tuple[dict, dict, dict]:
    """(ms per backend that ran, error per backend that raised, results per backend that ran), the
    random state forked. Each backend first runs once with dropout off (its results, compared by
    ``_verify``; one shared output gradient), then is timed on the call itself. A backend that raises
    is left out with a warning (the kernels failing to compile on some GPU, say); if every one
    raises, the first error propagates."""
    times, errors, results, first = {}, {}, {}, None
    grad_out: list[Tensor] = []
    with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
        for name, fn in backends.items():
            try:
                out: list = []
                timed_run(fn, x, weight, bias, paths, 0.0, training, sig.mode, grad_out, out)()
                results[name] = out[0]
                times[name] = float(_timer(name, timed_run(fn, x, weight, bias, paths, dropout_p, training, sig.mode),
                                           x.device))
            except Exception as e:  # noqa: BLE001 - auto falls back to what runs
                errors[name], first = f"{type(e).__name__}: {e}", first or e
                results.pop(name, None)
    if not times:
        raise first
    for name, error in errors.items():
        warnings.warn(f"sharelora_kernels auto: the {name} backend failed on {sig.key()} ({error}); "
                      f"using {min(times, key=times.get)}", stacklevel=4)
    return times, errors, results


def dispatch_table() -> list[dict]:
    """Every choice auto made or read in this process: signature fields, ``choice``, ``times_ms``
    (both backends), ``errors`` (a backend that raised when timed), ``rejected`` (a backend ruled out:
    its results differed from compose's), ``verified_error`` (each compared backend's error),
    ``reason`` and ``source``
    (``measured`` or the cache file)."""
    return [{**asdict(c.signature), "choice": c.choice, "times_ms": dict(c.times_ms), "errors": dict(c.errors),
             "rejected": dict(c.rejected), "verified_error": dict(c.verified_error), "reason": c.reason(),
             "source": c.source, "measured_at": c.measured_at} for c in _choices()]


def clear() -> None:
    """Forget every choice in memory (the cache files stay); the next call per signature reads or measures again."""
    with _lock:
        _table.clear()
        _loaded.clear()
    SETTINGS.version += 1  # call plans keep auto's choices: rebuilt


def _choices() -> list[Choice]:
    with _lock:
        return list(_table.values())
