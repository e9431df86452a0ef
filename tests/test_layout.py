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
            "families": "flowblend/families", "pipelines": "pipelines"}
# What each package may import (besides itself and flowblend.errors). Everything not listed is "above".
ALLOWED = {
    "flowblend": set(),
    "engines": set(),
    "export": {"engines"},
    "runtime": {"engines"},
    "families": {"engines", "export"},  # flowblend/families/: one module per model family, and their registry
    "assembly": {"engines", "runtime", "export", "families"},  # flowblend/assembly.py: the one assembly of a run
    "bench": {"engines", "runtime", "export", "families", "assembly"},
    "toy": {"engines", "runtime", "export", "families", "bench", "assembly"},
    "calibrate": {"engines", "runtime", "export", "families", "bench", "toy", "assembly"},
    "serve": {"engines", "runtime", "export", "families", "bench", "toy", "calibrate", "cli", "assembly"},
    "cli": {"engines", "runtime", "export", "families", "bench", "toy", "calibrate", "serve", "assembly"},
    # pipelines/: diffusers-style classes over the one assembly of a run
    "pipelines": {"engines", "runtime", "export", "families", "assembly"},
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
    return "flowblend" if len(parts) == 1 or parts[1] in ("errors", "atomic") else parts[1]


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


FAMILY_MODULES = "flowblend.families."  # the one place a diffusers model class may be named
REGISTRIES = {"flowblend.engines.kinds"}  # the one place a backend or precision name may be matched


def _diffusers_model_classes() -> set[str]:
    import diffusers

    return set(diffusers._import_structure["models"])  # the lazy import table: no model code is imported


def _names(tree: ast.AST):
    """(line, name) of every identifier, attribute, imported name and whole-string constant in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.alias):
            yield getattr(node, "lineno", 0), node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def model_class_mentions(modules: dict[str, Path]) -> list[str]:
    classes = _diffusers_model_classes()
    return [f"{name}:{line} names {value}" for name, path in modules.items() if not name.startswith(FAMILY_MODULES)
            for line, value in _names(ast.parse(path.read_text())) if value in classes]


def test_no_module_outside_the_family_modules_names_a_diffusers_model_class():
    found = model_class_mentions(_modules())
    assert not found, "model classes named outside flowblend/families/ (ask the family object):\n" + "\n".join(found)


def _about_kinds(node: ast.AST) -> bool:
    """Whether an expression reads a backend, dtype or precision (not, say, `"torch" in sys.modules`)."""
    words = ("backend", "dtype", "precision", "kind")
    return any(isinstance(n, (ast.Name, ast.Attribute, ast.Constant)) and any(
        w in str(getattr(n, "id", None) or getattr(n, "attr", None) or (n.value if isinstance(n, ast.Constant) and
                                                                          isinstance(n.value, str) else "")).lower()
        for w in words) for n in ast.walk(node))


def kind_matches(modules: dict[str, Path]) -> list[str]:
    """Comparisons (==, !=, in) of a backend, dtype or precision against one of their names outside
    engines/kinds.py."""
    from flowblend.engines.kinds import ENGINE_KINDS, PRECISIONS

    names, found = set(ENGINE_KINDS) | set(PRECISIONS), []
    for name, path in modules.items():
        if name in REGISTRIES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare) or not _about_kinds(node):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hits = [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]
                found += [f"{name}:{node.lineno} matches {hit!r}" for hit in hits]
    return found


def test_backend_and_precision_names_are_matched_only_in_their_registries():
    found = kind_matches(_modules())
    assert not found, "backend/precision names matched outside engines/kinds.py (read the tables):\n" + "\n".join(found)


def test_the_registry_checks_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from diffusers import WanTransformer3DModel\n\ndef f(backend):\n    return backend == 'tensorrt'\n")
    modules = {"flowblend.bench.probe": probe}
    assert model_class_mentions(modules) == ["flowblend.bench.probe:1 names WanTransformer3DModel"]
    assert kind_matches(modules) == ["flowblend.bench.probe:4 matches 'tensorrt'"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
