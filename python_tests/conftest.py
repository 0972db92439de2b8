"""Where the tests run the Triton kernels: Triton's interpreter on the CPU (default), or a GPU.

Set at import, before anything imports triton, so the ``@triton.jit`` kernels of
``sharelora_kernels.ops`` are built as interpreter kernels: they run on CPU tensors, in numpy; the
torch paths are unaffected. On a GPU machine, ``SHARELORA_TEST_DEVICE=cuda`` leaves the compiled
kernels in place and makes CUDA the default device of every tensor the tests create (meant for the
kernel tests: ``test_ops_*``, ``test_properties``, ``test_extension``).
"""
import os

DEVICE = os.environ.get("SHARELORA_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    import torch

    torch.set_default_device(DEVICE)
