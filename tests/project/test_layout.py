"""The package's layout rules (CONTRIBUTING.md): every module imports on its own, in a fresh
interpreter and in any order; the modules' imports of each other form no circle, none hidden in a
function; no module reaches for another module's private names; no test imports another test
file."""

from __future__ import annotations

import ast
import os
import pathlib
import random
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fused_optim"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(
    _module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"
)


def _package_imports(path: pathlib.Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, names imported from it, whether at module level) of each import of a
    fused_optim module in `path`."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    module_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        top = id(node) in module_level
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fused_optim"):
                continue
            names = [a.name for a in node.names]
            if node.module is None or f"{target}.{names[0]}" in MODULES:  # `from . import x`
                found += [(f"{target}.{n}" if f"{target}.{n}" in MODULES else target, [], top) for n in names]
            else:
                found.append((target, names, top))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], top) for a in node.names if a.name.startswith("fused_optim")]
    return found


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    # Each module first in its own interpreter, then all the others in a random order.
    rng = random.Random(0)
    scripts = [
        f"import importlib; [importlib.import_module(m) for m in {[m, *rng.sample(MODULES, len(MODULES))]!r}]"
        for m in MODULES
    ]
    failed, running = [], []
    for script in scripts:  # a few at a time: each pays torch's import
        running.append((script, subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)))
        while len(running) >= 4 or (script is scripts[-1] and running):
            done, proc = running.pop(0)
            if proc.wait(timeout=600):
                failed.append(f"{done[:120]}: {proc.stderr.read()[-600:]}")
    assert not failed, failed


def test_no_import_circle_and_none_hidden_in_a_function():
    graph: dict[str, set[str]] = {}
    lazy = []
    for path in PACKAGE.rglob("*.py"):
        me = _module_name(path)
        for target, _, top in _package_imports(path):
            if not top:
                lazy.append(f"{me} imports {target} inside a function")
            elif target != me and target != "fused_optim":
                graph.setdefault(me, set()).add(target)
    assert not lazy, lazy
    # `fused_optim/__init__.py` imports the public modules; a module importing the package root
    # would go back through it: none does (checked by leaving the root's own edges out above and
    # asserting no module imports "fused_optim" itself).
    assert not [m for m, ts in graph.items() if "fused_optim" in ts]
    visiting, done, circle = set(), set(), []

    def visit(m: str, path: list[str]) -> None:
        if m in done or circle:
            return
        if m in visiting:
            circle.extend(path[path.index(m):] + [m])
            return
        visiting.add(m)
        for t in sorted(graph.get(m, ())):
            visit(t, path + [m])
        visiting.discard(m)
        done.add(m)

    for m in sorted(graph):
        if m != "fused_optim":
            visit(m, [])
    assert not circle, " -> ".join(circle)


def test_private_names_stay_in_their_module():
    crossings = []
    for path in PACKAGE.rglob("*.py"):
        me = _module_name(path)
        imported_modules = {}
        for target, names, _ in _package_imports(path):
            # `_C` is the compiled extension, a module (loaded once, by _library), not a private name.
            crossings += [f"{me}: from {target} import {n}" for n in names if n.startswith("_") and n != "_C" and target != me]
            imported_modules[target.rsplit(".", 1)[-1]] = target
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported_modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                crossings.append(f"{me}: {node.value.id}.{node.attr}")
    assert not crossings, crossings


def test_no_test_imports_another_test_file():
    tests = {p.stem for p in (ROOT / "tests").rglob("test_*.py")} | {"conftest"}
    found = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [f"{path.name} imports {n}" for n in names if n.split(".")[-1] in tests]
    assert not found, found


@pytest.mark.parametrize("module", ["fused_optim.flat"])
def test_flat_parameters_import_the_public_functions_at_the_top(module):
    path = ROOT / (module.replace(".", "/") + ".py")
    targets = {t for t, _, top in _package_imports(path) if top}
    assert {"fused_optim.clip_grad", "fused_optim.regularization", "fused_optim.pre_step"} <= targets
