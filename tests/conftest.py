"""Test modules that need an optional extra are skipped, with the install line, where it is missing.

The GPU image (docs/gpu-runs/2026-12-04-h200) has CUDA torch but no fastapi, uvicorn or ray, and
nothing can be installed there; `pytest -m "gpu or tensorrt" tests` stopped at collection because
the serve tests import fastapi through flowblend.serve at module level. A module is matched by its
name (test_serve_*) or by what it imports (serve_support, flowblend.serve), so a new serve test is
covered without a line of its own.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

# Before any test module loads torch (libgomp reads it once): the suite runs servers, replicas and CLI children
# beside its own process on 2 cores, and OpenMP's default busy-waiting makes each of them tens of times slower
# (DEVELOPERS.md: a toy generate loop ~27 s instead of ~0.7 s). The CLI sets the same default (cli/main.py);
# a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXTRAS = {  # what a test module imports -> (the extra that installs it, the modules it needs)
    "serve": ("serve", ("fastapi", "uvicorn", "httpx", "prometheus_client")),
}
NEEDS = {"serve": ("serve_support", "flowblend.serve")}  # imports that bring the extra in


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


def _imports(source: str, names) -> bool:
    return any(f"import {n}" in source or f"from {n} " in source or f"from {n}." in source for n in names)


def pytest_pycollect_makemodule(module_path, parent):
    source = None
    for key, (extra, modules) in EXTRAS.items():
        if not (missing := missing_modules(modules)):
            continue
        source = module_path.read_text() if source is None else source
        if module_path.name.startswith(f"test_{key}_") or _imports(source, NEEDS[key]):
            module = MissingExtraModule.from_parent(parent, path=module_path)
            module.reason = (f"needs the {extra} extra ({', '.join(missing)} not installed): "
                             f"pip install 'flowblend[{extra}]'")
            return module
    return None
