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


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _sharelora_settings_follow_monkeypatch(monkeypatch):
    """The package reads SHARELORA_BACKEND / SHARELORA_AUTOTUNE once (``ops.refresh_settings()``
    reads them again): each test starts from the environment as it is, and a test that changes
    them with ``monkeypatch.setenv`` / ``delenv`` has them read again right after, as a user calls
    ``refresh_settings()`` after changing them."""
    from sharelora_kernels.ops import dispatch

    dispatch.set_backend(None)
    dispatch.refresh_settings()
    setenv, delenv = monkeypatch.setenv, monkeypatch.delenv

    def setenv_and_refresh(*args, **kwargs):
        setenv(*args, **kwargs)
        dispatch.refresh_settings()

    def delenv_and_refresh(*args, **kwargs):
        delenv(*args, **kwargs)
        dispatch.refresh_settings()

    monkeypatch.setenv, monkeypatch.delenv = setenv_and_refresh, delenv_and_refresh
    yield
    monkeypatch.undo()  # the environment as it was, read again: a module-scoped fixture that runs
    dispatch.set_backend(None)  # before the next test's setup must not see this test's settings
    dispatch.refresh_settings()
