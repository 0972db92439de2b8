"""Run the benchmark suite from a checkout: same harness, arguments and exit statuses as
``python -m sharelora_kernels bench``."""
import sys

from sharelora_kernels.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
