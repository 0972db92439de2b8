"""gpu-check phases (a) and (d): the device's ceilings, and the angular-distance kernel against them.

(a) the bf16 GEMM rate of the vendor library (``torch.mm``: cuBLAS on a GPU) at n x n x n, and the
device-to-device copy bandwidth (bytes read + written per second) of a large tensor.
(d) the compiled angular-distance kernel (``extension.angular_sums``) on (L, n, d) bf16
representations: bytes read per second against that copy bandwidth, and its largest difference
from the torch float64 reference on a small slice.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops.dispatch import measure_ms


class Sizes(NamedTuple):
    gemm_n: int  # the n of the n x n x n GEMM
    copy_bytes: int
    angular: tuple[int, int, int]  # L, n samples, d
    repeats: int


GPU = Sizes(8192, 2**30, (33, 65536, 4096), 10)
TINY = Sizes(256, 2**24, (5, 64, 64), 2)


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count}


def gemm_rate(sizes: Sizes, device: torch.device) -> dict:
    """TFLOP/s of one bf16 n x n x n ``torch.mm`` (median of ``repeats``)."""
    n = sizes.gemm_n
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = measure_ms(lambda: torch.mm(a, b), device, warmup=2, repeats=sizes.repeats)
    return {"name": "bf16 GEMM (torch.mm)", "n": n, "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9}


def copy_bandwidth(sizes: Sizes, device: torch.device) -> dict:
    """GB/s (bytes read + bytes written) of one device-to-device ``copy_``."""
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), device, warmup=2, repeats=sizes.repeats)
    return {"name": "device copy", "bytes": sizes.copy_bytes, "ms": ms, "gbps": 2 * sizes.copy_bytes / ms / 1e6}


def angular(sizes: Sizes, device: torch.device, copy_gbps: float | None) -> dict:
    """The compiled kernel's read rate on (L, n, d) bf16, against ``copy_gbps``; agreement with the
    float64 torch reference on the first 256 samples."""
    from .. import extension
    from ..similarity.distance import angular_sums_torch

    num_layers, n, d = sizes.angular
    if not extension.available(device):
        return {"skipped": f"no compiled angular-distance kernel for {device.type}"}
    reps = torch.randn(num_layers, n, d, device=device, dtype=torch.bfloat16)
    ms = measure_ms(lambda: extension.angular_sums(reps), device, warmup=1, repeats=max(2, sizes.repeats // 3))
    read = reps.numel() * reps.element_size()
    small = reps[:, :256]
    diff = (extension.angular_sums(small) - angular_sums_torch(small)).abs().max().item()
    row = {"L": num_layers, "n": n, "d": d, "dtype": "bfloat16", "ms": ms, "bytes_read": read,
           "gbps": read / ms / 1e6, "max_abs_difference_vs_float64": diff}
    if copy_gbps:
        row["fraction_of_copy_bandwidth"] = row["gbps"] / copy_gbps
    return row
