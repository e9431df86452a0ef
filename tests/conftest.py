"""Test modules that need an optional extra are skipped, with the install line, where it is missing.

The GPU image (docs/gpu-runs/2026-12-04-h200) has CUDA torch but no fastapi, uvicorn or ray, and
nothing can be installed there; `pytest -m "gpu or tensorrt" tests` stopped at collection because
the serve tests import fastapi through flowblend.serve at module level. A module is matched by its
name's prefix, so a new serve test is covered without a line of its own.
"""
from __future__ import annotations

import importlib.util

import pytest

EXTRAS = {  # test module prefix -> (the extra that installs it, the modules it needs)
    "test_serve_": ("serve", ("fastapi", "uvicorn", "httpx", "prometheus_client")),
}


def missing_modules(names) -> list[str]:
    """Modules of `names` that cannot be imported (absent, or hidden as None in sys.modules)."""
    import sys

    missing = []
    for name in names:
        try:
            found = sys.modules[name] is not None if name in sys.modules else importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


class MissingExtraModule(pytest.Module):
    """A test module reported skipped, with its reason, instead of imported."""

    reason = ""

    def collect(self):
        raise pytest.skip.Exception(self.reason, allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    for prefix, (extra, modules) in EXTRAS.items():
        if module_path.name.startswith(prefix) and (missing := missing_modules(modules)):
            module = MissingExtraModule.from_parent(parent, path=module_path)
            module.reason = (f"needs the {extra} extra ({', '.join(missing)} not installed): "
                             f"pip install 'flowblend[{extra}]'")
            return module
    return None
