"""The layout's rules, checked on the source: data flows export -> engines -> runtime, the packages on
top are never imported from below, no two modules import each other (directly or in a loop, lazy
imports included), no module grows past the size a reader takes in at once, and the linter is clean.
"""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"flowblend": "flowblend", "export": "export", "engines": "engines", "runtime": "runtime",
            "calibrate": "calibrate", "bench": "bench", "toy": "toy", "serve": "serve", "cli": "cli",
            "pipelines": "pipelines"}
# What each package may import (besides itself and flowblend.errors). Everything not listed is "above".
ALLOWED = {
    "flowblend": set(),
    "engines": set(),
    "export": {"engines"},
    "runtime": {"engines"},
    "bench": {"engines", "runtime", "export"},
    "toy": {"engines", "runtime", "export", "bench"},
    "calibrate": {"engines", "runtime", "export", "bench", "toy"},
    "serve": {"engines", "runtime", "export", "bench", "toy", "calibrate", "cli"},
    "cli": {"engines", "runtime", "export", "bench", "toy", "calibrate", "serve"},
    "pipelines": {"engines", "runtime", "export"},  # diffusers-style classes over the runtime (toy via export)
}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    mods = {}
    for package, folder in PACKAGES.items():
        base = "flowblend" if package == "flowblend" else f"flowblend.{package}"
        for path in sorted((ROOT / folder).glob("*.py")):
            mods[base if path.stem == "__init__" else f"{base}.{path.stem}"] = path
    return mods


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """flowblend modules that `name` imports anywhere in its file (function-level imports too)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return "flowblend" if len(parts) == 1 or parts[1] == "errors" else parts[1]


def test_no_package_imports_one_above_it():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        src = _package(name)
        for target in _imports(name, path, modules):
            dst = _package(target)
            if dst not in (src, "flowblend") and dst not in ALLOWED[src]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the layering (DESIGN.md):\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    for pkg_init in [m for m, p in modules.items() if p.stem == "__init__"]:
        graph[pkg_init] = {t for t in graph[pkg_init] if not t.startswith(pkg_init + ".")}  # a package's own modules
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_can_fail(tmp_path):
    """The two checks above are only worth having if they see a cycle and an upward import."""
    modules = _modules()
    assert "flowblend.export.record" in _imports("flowblend.export.verify", modules["flowblend.export.verify"], modules)
    fake = tmp_path / "engines_probe.py"
    fake.write_text("from flowblend.runtime import sampler\n\ndef f():\n    from ..cli import main\n")
    found = _imports("flowblend.engines.engines_probe", fake, modules)
    assert {"flowblend.runtime.sampler", "flowblend.cli.main"} <= found


def test_no_module_is_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split by concept): {long}"


def test_linter_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    result = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
