"""Benchmark the compiled angular-distance kernels against the torch reference; write JSON.

    python bench/bench_angular_distance.py --out bench/results/angular_distance_cpu.json
    python bench/bench_angular_distance.py --device cuda --out bench/results/angular_distance_h100.json

CPU: n = 4096, L = 33, d = 1024, float32, (L, n, d) contiguous: extension.angular_sums (csrc/
C++ kernel) against similarity.distance.angular_sums_torch (float64 batched Gram via torch.bmm +
atan2), timed in the same run (median of --repeats), and their largest difference.
GPU: n in {4096, 65536}, L = 33, d = 4096, bfloat16: the CUDA kernel's achieved input bandwidth
(bytes read once / time) against the HBM peak (from the device's memory clock and bus width,
or --hbm-peak-gbs), and the torch reference on the same GPU (skipped at n = 65536 unless
--reference-at-scale: it upcasts 64-sample chunks to float64 and takes minutes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from sharelora_kernels import extension
from sharelora_kernels.cli.options import out_file, positive_int
from sharelora_kernels.cli.outputs import write_json
from sharelora_kernels.benchmarks.environment import describe, loadavg
from sharelora_kernels.similarity.distance import angular_sums_torch

LAYERS = 33


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and, on first use, library loading)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hbm_peak_bytes_per_s(override_gbs: float | None) -> float | None:
    """Override, else 2 (double data rate) x memory clock x bus width, when torch reports them."""
    if override_gbs:
        return override_gbs * 1e9
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def bench_case(device: str, n: int, d: int, dtype, repeats: int, with_reference: bool,
               peak: float | None) -> dict:
    reps = torch.randn(LAYERS, n, d, device=device).to(dtype)
    kernel = median_seconds(lambda: extension.angular_sums(reps), device, repeats)
    bytes_read = reps.numel() * reps.element_size()
    row = {"device": device, "n": n, "L": LAYERS, "d": d, "dtype": str(dtype).removeprefix("torch."),
           "extension_s": kernel, "extension_bytes_per_s": bytes_read / kernel,
           "extension_samples_per_s": n / kernel}
    if peak:
        row["hbm_peak_bytes_per_s"] = peak
        row["fraction_of_hbm_peak"] = bytes_read / kernel / peak
    if with_reference:
        reference = median_seconds(lambda: angular_sums_torch(reps), device, repeats)
        diff = (extension.angular_sums(reps) - angular_sums_torch(reps)).abs().max().item()
        row.update(reference_s=reference, speedup_vs_reference=reference / kernel,
                   max_abs_difference=diff)
    print(json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU and the CUDA kernel are available, else cpu")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--hbm-peak-gbs", type=float, default=None)
    parser.add_argument("--reference-at-scale", action="store_true")
    parser.add_argument("--out", type=out_file, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and extension.available("cuda")
                             else "cpu")
    if not extension.available(device):
        sys.exit(f"no compiled angular-distance kernel for {device}")
    environment = describe(torch.device(device), sys.argv[1:] if argv is None else argv,
                           prog="python bench/bench_angular_distance.py")
    if device == "cpu":
        results = [bench_case("cpu", 4096, 1024, torch.float32, args.repeats, True, None)]
    else:
        peak = hbm_peak_bytes_per_s(args.hbm_peak_gbs)
        results = [bench_case("cuda", n, 4096, torch.bfloat16, args.repeats,
                              n <= 4096 or args.reference_at_scale, peak) for n in (4096, 65536)]
    environment["loadavg_after"] = loadavg()
    write_json(args.out, {"environment": environment, "results": results}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
