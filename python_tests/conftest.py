"""Run Triton kernels through the interpreter on this CPU-only test machine.

Set at import, before anything imports triton, so the ``@triton.jit`` kernels of
``sharelora_kernels.ops`` are built as interpreter kernels. It only changes how Triton kernels run
(on CPU tensors, in numpy); the torch paths of the other test files are unaffected.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
