"""The layout's rules, checked on the source: data flows export -> engines -> runtime, the packages on
top are never imported from below, no two modules import each other (directly or in a loop, lazy
imports included), no module grows past the size a reader takes in at once, and the linter is clean.
"""
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every top-level folder named here is the package flowblend.<folder> (pyproject.toml's package-dir);
# flowblend/ itself holds only the root modules every layer may import (errors, atomic).
PACKAGES = ("families", "export", "engines", "runtime", "resolve", "assembly", "pipelines", "calibrate", "bench",
            "toy", "serve", "cli")
# What each package may import (besides itself and the root modules). Everything not listed is "above".
ALLOWED = {
    "flowblend": set(),
    "engines": set(),
    "export": {"engines"},
    "runtime": {"engines"},
    "families": {"engines", "export"},  # one module per model family, and their registry
    "resolve": {"runtime", "families"},  # a request's checks and defaults, resolved into plain values
    "assembly": {"engines", "runtime", "export", "families", "resolve"},  # the one assembly of a run
    "bench": {"engines", "runtime", "export", "families", "resolve", "assembly"},
    "toy": {"engines", "runtime", "export", "families", "resolve", "bench", "assembly"},
    "calibrate": {"engines", "runtime", "export", "families", "resolve", "bench", "toy", "assembly"},
    "serve": {"engines", "runtime", "export", "families", "resolve", "bench", "toy", "calibrate", "cli", "assembly"},
    "cli": {"engines", "runtime", "export", "families", "resolve", "bench", "toy", "calibrate", "serve", "assembly"},
    # pipelines/: diffusers-style classes over the one assembly of a run
    "pipelines": {"engines", "runtime", "export", "families", "resolve", "assembly"},
}
# Calls that import the module their first argument names (a by-name import the graph must see too).
BY_NAME = {"import_module", "__import__", "find_spec"}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "flowblend").glob("*.py")):
        mods["flowblend" if path.stem == "__init__" else f"flowblend.{path.stem}"] = path
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            base = f"flowblend.{package}"
            mods[base if path.stem == "__init__" else f"{base}.{path.stem}"] = path
    return mods


def _named_module(value: str, modules: dict[str, Path]) -> str | None:
    """The flowblend module a string names ("flowblend.x.y" or "flowblend.x.y:attr"), if any."""
    name = value.partition(":")[0]
    return name if name in modules else None


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """flowblend modules that `name` imports anywhere in its file: import statements (function-level ones
    too), calls such as importlib.import_module("flowblend.x"), and module names held as strings in code
    (a table of "module:attr" an import_module later resolves); docstrings aside."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            targets = [t] if (t := _named_module(node.value, modules)) else []
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in PACKAGES) else "flowblend"


def test_every_package_is_the_folder_of_its_name():
    """One rule for where code lives: pyproject maps flowblend.<folder> to <folder>/ for each top-level package,
    and flowblend/ holds no subpackage, so a reader (or a tool) that takes the folders as they stand sees the
    true packages."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    expected = {"flowblend": "flowblend", **{f"flowblend.{p}": p for p in PACKAGES}}
    assert config["package-dir"] == expected
    assert sorted(config["packages"]) == sorted(expected)
    nested = [str(d.relative_to(ROOT)) for d in (ROOT / "flowblend").iterdir() if d.is_dir() and any(d.glob("*.py"))]
    assert not nested, f"subpackages under flowblend/ (give each its own top-level folder): {nested}"
    top = {d.name for d in ROOT.iterdir() if d.is_dir() and (d / "__init__.py").is_file()} - {"flowblend", "tests"}
    assert top == set(PACKAGES), f"top-level packages not in the layout (or listed but missing): {top ^ set(PACKAGES)}"


def test_packages_import_each_other_as_their_folders_stand():
    """A reader that knows no package-dir (a folder tool, an editor) resolves an import by path: `..engines`
    from runtime/ is engines/ once the checkout root stands for `flowblend` (its __init__.py), and
    `flowblend.engines` would be flowblend/engines/, which does not exist. So between packages the imports are
    relative, and absolute `flowblend.` imports inside a package name only the root modules in flowblend/."""
    assert (ROOT / "__init__.py").is_file(), "the checkout root needs its __init__.py (it stands for flowblend)"
    absolute = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                absolute += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                             if n.split(".")[:2][-1] in PACKAGES and n.startswith("flowblend.")]
    assert not absolute, "import these relatively (from ..<package> import ...):\n" + "\n".join(absolute)


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


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    # A module importing its own package's namespace (`from . import x`, `from flowblend.families import y`
    # inside families/) is how a package is read, not a circle; everything else counts, a package's __init__
    # importing its modules included (an outside import of the package runs them).
    inits = [m for m in graph if any(o.startswith(m + ".") for o in graph)]
    graph = {name: {t for t in targets if not (t in inits and name.startswith(t + "."))} for name, targets in graph.items()}
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
    return cycles


def test_no_import_cycles_between_modules():
    modules = _modules()
    cycles = _cycles({name: _imports(name, path, modules) for name, path in modules.items()})
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_can_fail(tmp_path):
    """The two checks above are only worth having if they see a cycle and an upward import, by name too."""
    modules = _modules()
    assert "flowblend.export.record" in _imports("flowblend.export.verify", modules["flowblend.export.verify"], modules)
    fake = tmp_path / "engines_probe.py"
    fake.write_text('"""flowblend.serve.app is named in this docstring only."""\n'
                    "import importlib\nfrom flowblend.runtime import sampler\n\n"
                    "def f():\n    from ..cli import main\n    importlib.import_module('flowblend.families')\n"
                    "    return {'trt': 'flowblend.toy.data:make_batch'}\n")
    found = _imports("flowblend.engines.engines_probe", fake, modules)
    assert {"flowblend.runtime.sampler", "flowblend.cli.main", "flowblend.families", "flowblend.toy.data"} <= found
    assert "flowblend.serve.app" not in found, "a docstring that mentions a module does not import it"


def test_the_cycle_check_sees_the_by_name_circle_of_2026_12_07(tmp_path):
    """engines/architectures.py once imported flowblend.families by name while families/ -> export/ -> engines/
    imported it back: the control replays that line and the graph must show the circle."""
    modules = _modules()
    probe = tmp_path / "architectures.py"
    probe.write_text(modules["flowblend.engines.architectures"].read_text()
                     + "\n\ndef _lazy():\n    import importlib\n    importlib.import_module('flowblend.families')\n")
    modules = {**modules, "flowblend.engines.architectures": probe}
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "flowblend.families" in graph["flowblend.engines.architectures"]
    assert _cycles(graph), "the by-name import from engines/ back to families/ closes a circle"


def test_no_module_is_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split by concept): {long}"


def _ruff_command() -> list[str]:
    if importlib.util.find_spec("ruff") is None:
        pytest.fail(f"ruff is not installed for {sys.executable}: pip install -e '.[test]'")
    return [sys.executable, "-m", "ruff"]


def test_a_missing_linter_fails_the_check(monkeypatch):
    """Control: without ruff the linter check fails with the install line (it skipped, unless a venv was active)."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(pytest.fail.Exception, match=r"pip install -e '\.\[test\]'"):
        _ruff_command()


def test_linter_is_clean():
    """Runs the ruff of this interpreter (no activated venv needed); a missing ruff fails, never skips."""
    result = subprocess.run(_ruff_command() + ["check", "--no-cache", str(ROOT)], capture_output=True,
                            text=True, cwd=ROOT)
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
    assert not found, "model classes named outside families/ (ask the family object):\n" + "\n".join(found)


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
