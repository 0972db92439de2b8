"""Register the PEFT method when PEFT is imported, without importing PEFT before then.

``import sharelora_kernels`` calls ``install()``: if PEFT is already imported the method is
registered at once; otherwise a one-shot finder on ``sys.meta_path`` lets PEFT's own import run and
registers right after it (PEFT's import takes seconds, which users who never use it should not pay).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _register() -> None:
    if f"{__package__}.peft_method" in sys.modules:  # being imported (it imported PEFT): it registers itself
        return
    try:
        from .peft_method import register
    except Exception as e:  # e.g. a PEFT whose tables moved: only this method is unavailable, PEFT still imports
        warnings.warn(f"sharelora_kernels' PEFT method is not registered: {e}", stacklevel=2)
        return
    register()


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds ``peft`` through the other finders and registers the method once its import finished."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot, and the lookup below must not come back here
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if PEFT is imported, else when it is."""
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
