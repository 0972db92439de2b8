"""Run the benchmark suite from a checkout: same harness and arguments as ``python -m sharelora_kernels bench``."""
import sys

from sharelora_kernels.benchmarks import main

if __name__ == "__main__":
    main(sys.argv[1:])
