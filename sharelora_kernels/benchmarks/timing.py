"""Timing and memory primitives: interleaved repeats, device time of calls back to back, robust
statistics, saved-activation bytes.

Variants of one case are timed round-robin (variant 1, 2, 3, then again), so that load from other
processes, frequency changes and cache state hit every variant alike; ratios between variants of
one case are therefore fairer than ratios between two separate runs.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

from ..ops.dispatch import call_ms

MODES = ("fwd", "bwd", "fwd+bwd")


class Timer:
    """Milliseconds of one call: CUDA events on a GPU, ``time.perf_counter`` on the CPU (``dispatch.call_ms``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        return call_ms(fn, self.device)


def step_timer(device: str) -> Callable[[Callable[[], object], list[Tensor]], float]:
    """``time(step, params) -> ms`` for the standalone bench scripts, resetting ``params``' grads.

    CUDA: triton's ``do_bench`` (warm-up 25 ms, 100 ms of repeats, median). CPU: one warm-up call,
    then the mean of two calls (the CPU figures only show that a script runs).
    """
    if device == "cuda":
        import triton.testing

        return lambda step, params: triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=params)

    def cpu_time(step, params, reps=2):
        step()
        start = time.perf_counter()
        for _ in range(reps):
            for p in params:
                p.grad = None
            step()
        return (time.perf_counter() - start) / reps * 1e3

    return cpu_time


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of the samples (ms), and how many there were."""
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": median, "q1": q1, "q3": q3, "min": min(samples), "max": max(samples), "n": len(samples)}


def time_mode(mode: str, forwards: Mapping[str, Callable[[], Tensor]], grad_out: Tensor, timer: Timer,
              warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Time ``mode`` (fwd, bwd or fwd+bwd) of every variant, interleaved; returns name -> stats (ms).

    Each forward builds a fresh autograd graph (training mode); bwd times ``backward`` alone on a
    graph built untimed just before. Gradients are reset to None before every call.
    """
    return interleaved({name: (lambda f=forward: _one(mode, f, grad_out, timer)) for name, forward in forwards.items()},
                       warmup, repeats)


def interleaved(calls: Mapping[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Run every call round-robin, ``warmup`` untimed rounds then ``repeats`` timed ones; each call
    returns its own time in ms. Returns name -> stats (``summarize``)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(warmup + repeats):
        for name, call in calls.items():
            ms = call()
            if rep >= warmup:
                samples[name].append(ms)
    return {name: summarize(s) for name, s in samples.items()}


def device_time_mode(mode: str, forwards: Mapping[str, Callable[[], Tensor]], grad_out: Tensor, device: torch.device,
                     warmup: int, repeats: int, calls: int) -> dict[str, dict[str, dict[str, float]]]:
    """Time ``mode`` (fwd or fwd+bwd) of every variant as the device sees it: per round and variant,
    ``calls`` calls back to back between two CUDA events and one synchronisation (a host clock on
    the CPU), variants interleaved round by round. Returns name -> {"device_ms": stats of ms per
    call, "host_us": stats of the host's time to issue one call (no sync: Python and launches)}.
    Each forward builds its autograd graph, as in training (``time_mode``)."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"device time covers fwd and fwd+bwd, got {mode!r}")

    def step(forward):
        return forward() if mode == "fwd" else forward().backward(grad_out)

    cuda = device.type == "cuda"
    samples = {name: {"device_ms": [], "host_us": []} for name in forwards}
    for rep in range(warmup + repeats):
        for name, forward in forwards.items():
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(calls):
                step(forward)
            host = time.perf_counter() - t0
            if cuda:
                end.record()
                end.synchronize()
                device_ms = start.elapsed_time(end) / calls
            else:
                device_ms = host * 1e3 / calls
            if rep >= warmup:
                samples[name]["device_ms"].append(device_ms)
                samples[name]["host_us"].append(host * 1e6 / calls)
    return {name: {key: summarize(v) for key, v in s.items()} for name, s in samples.items()}


def _one(mode: str, forward: Callable[[], Tensor], grad_out: Tensor, timer: Timer) -> float:
    timer.sync()
    if mode == "fwd":
        return timer.time(forward)
    if mode == "fwd+bwd":
        return timer.time(lambda: forward().backward(grad_out))
    if mode == "bwd":
        y = forward()
        timer.sync()
        return timer.time(lambda: y.backward(grad_out))
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")


def saved_bytes(forward: Callable[[], Tensor], exclude: Iterable[Tensor]) -> int:
    """Bytes autograd saves for backward in one forward, beyond the tensors in ``exclude``.

    Counts each distinct storage once; inputs and parameters (``exclude``) are not counted since
    they live anyway. This is the activation memory a layer adds per call, measurable on any device.
    """
    known = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    return sum(seen.values())


def cuda_peak_bytes(step: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during ``step`` above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
