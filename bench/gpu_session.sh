#!/usr/bin/env bash
# What a session lent an H100/H200 runs, one stage per device call (each well under its 10 minutes).
#
#   bash bench/gpu_session.sh STAGE [OUT_DIR]
#
# STAGE: tests    the kernel tests on the GPU (compiled Triton kernels, CUDA angular distance)
#        bench    python -m sharelora_kernels bench --device cuda (ops, grouped q/k/v, end-to-end step)
#        fused    bench/bench_fused_lora.py: issue 5's shapes and ranks vs cuBLAS and PEFT
#        grouped  bench/bench_grouped.py: issue 6's per-layer grouping and shared-gradient memory
#        angular  bench/bench_angular_distance.py --device cuda: issue 7's bandwidth vs HBM peak
# OUT_DIR defaults to $OUT (the device tool's folder that comes back), else bench/results/gpu-DATE.
# The device image has torch, triton and every dependency but no network: install without fetching.
# The first call of a stage autotunes (compiles every config per shape): expect minutes, once per machine.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:?usage: bash bench/gpu_session.sh tests|bench|fused|grouped|angular [OUT_DIR]}"
out="${2:-${OUT:-bench/results/gpu-$(date +%F)}}"
mkdir -p "$out"
python3 -c "import sharelora_kernels" 2>/dev/null ||
    python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
case "$stage" in
    tests)
        SHARELORA_TEST_DEVICE=cuda python3 -m pytest -q -x python_tests/test_ops_fused_lora_linear.py \
            python_tests/test_ops_grouped.py python_tests/test_properties.py python_tests/test_extension.py \
            2>&1 | tee "$out/tests.log" | tail -25 ;;
    bench) python3 -m sharelora_kernels bench --device cuda --out "$out" ;;
    fused) python3 bench/bench_fused_lora.py --out "$out/fused_lora.json" | tail -15 ;;
    grouped) python3 bench/bench_grouped.py --out "$out/grouped.json" ;;
    angular) python3 bench/bench_angular_distance.py --device cuda --out "$out/angular_distance.json" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
