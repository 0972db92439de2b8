"""The one GPU check from a checkout: same command and options as ``python -m sharelora_kernels gpu-check``.

    python bench/gpu_check.py [--out DIR] [--budget SECONDS] [--tiny]
"""
import sys

from sharelora_kernels.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["gpu-check", *sys.argv[1:]]))
